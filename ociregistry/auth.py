"""Authentication to upstream registries: challenges, bearer tokens, credentials on requests.

A registry's request carries a static token when one is configured, else a
cached bearer token for its scope, else basic credentials once the registry
asked for them.  Tokens come from the realm of a bearer challenge, fetched
with the registry's credentials and trusted per the registry's TLS settings;
they are cached per registry and scope, refreshed before they expire, and
the cache is bounded.

Credentials never travel in clear text from a registry configured for HTTPS:
redirects drop them on any change of origin (see ``transport``), and a
bearer challenge naming a plain-HTTP realm gets no credentials (the token
fetch fails instead).  A registry configured as plain HTTP already sends
them in clear, so its realm may be plain HTTP too.
"""

from __future__ import annotations

import base64
import json
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers

from ociregistry.config import RegistrySettings
from ociregistry.credentials import Credentials, Login
from ociregistry.errors import Unauthorized, Unavailable
from ociregistry.inflight import InFlight
from ociregistry.transport import Transport

_DEFAULT_TOKEN_LIFETIME = 60
_TOKEN_ANSWER_LIMIT = 1024 * 1024
MAX_TOKENS = 1024


@dataclass(frozen=True)
class Challenge:
    """A parsed WWW-Authenticate header."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)


_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


def parse_challenge(header: str) -> Challenge:
    """Parse ``Bearer realm="...",service="...",scope="..."`` and the like."""
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    for match in _PARAM.finditer(rest):
        value = match.group(2) if match.group(2) is not None else match.group(3)
        params[match.group(1).lower()] = value.replace('\\"', '"')
    return Challenge(scheme.lower(), params)


def basic(login: Login) -> bytes:
    """An ``Authorization`` value for basic auth."""
    return b"Basic " + base64.b64encode(f"{login.user}:{login.password}".encode())


class TokenCache:
    """Bearer tokens by (registry, scope) until they expire; beyond ``limit`` the least recently used go."""

    def __init__(self, clock: IReactorTime, limit: int = MAX_TOKENS) -> None:
        self._clock = clock
        self._limit = limit
        self._tokens: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tokens)

    def get(self, key: tuple[str, str]) -> str | None:
        """The token, while it is valid; it becomes the most recently used."""
        entry = self._tokens.get(key)
        if entry is None:
            return None
        if entry[1] <= self._clock.seconds():
            del self._tokens[key]
            return None
        self._tokens.move_to_end(key)
        return entry[0]

    def put(self, key: tuple[str, str], token: str, expires: float) -> None:
        """Keep a token until ``expires`` (clock seconds)."""
        self._tokens[key] = (token, expires)
        self._tokens.move_to_end(key)
        if len(self._tokens) > self._limit:
            now = self._clock.seconds()
            for stale in [k for k, (_, until) in self._tokens.items() if until <= now]:
                del self._tokens[stale]
            while len(self._tokens) > self._limit:
                self._tokens.popitem(last=False)

    def forget(self, key: tuple[str, str]) -> None:
        """Drop a token the registry no longer accepts."""
        self._tokens.pop(key, None)


class Authenticator:
    """What a request to a registry authenticates with, and how a challenge is answered."""

    def __init__(
        self,
        clock: IReactorTime,
        transport: Transport,
        credentials: Credentials,
        settings: Callable[[str], RegistrySettings],
        max_tokens: int = MAX_TOKENS,
    ) -> None:
        self._clock = clock
        self._transport = transport
        self._credentials = credentials
        self._settings = settings
        self._tokens = TokenCache(clock, max_tokens)
        # Entries live while a fetch runs, each bounded by the transport's timeouts.
        self._token_fetches: InFlight[tuple[str, str], str] = InFlight()
        # Registries that asked for basic auth; only those with credentials get in.
        self._basic: set[str] = set()

    async def authorization(self, registry: str, scope: str) -> bytes | None:
        """The ``Authorization`` value for a request in ``scope``, if any is due."""
        static = self._credentials.token(registry)
        if static:
            return b"Bearer " + static.encode("utf-8")
        token = self._tokens.get((registry, scope))
        if token is not None:
            return b"Bearer " + token.encode("utf-8")
        if registry in self._basic:
            login = await self._credentials.login(registry)
            return basic(login) if login is not None else None
        return None

    async def answer(self, registry: str, scope: str, header: str | None) -> bool:
        """Answer a 401's challenge; whether sending the request again may now succeed."""
        challenge = parse_challenge(header or "")
        if challenge.scheme == "bearer" and "realm" in challenge.params:
            key = (registry, scope)
            self._tokens.forget(key)
            await self._token_fetches.run(key, lambda: self._fetch_token(registry, scope, challenge))
            return True
        if challenge.scheme == "basic" and await self._credentials.login(registry) is not None:
            self._basic.add(registry)
            return True
        return False

    async def _fetch_token(self, registry: str, scope: str, challenge: Challenge) -> str:
        realm = challenge.params["realm"]
        parsed = urlsplit(realm)
        if parsed.scheme not in ("http", "https") or not parsed.netloc or not realm.isascii():
            raise Unavailable(f"upstream {registry} named an invalid token realm")
        query = {"scope": scope}
        if "service" in challenge.params:
            query["service"] = challenge.params["service"]
        url = realm + ("&" if parsed.query else "?") + urlencode(query)
        settings = self._settings(registry)
        headers = Headers({b"User-Agent": [settings.user_agent.encode("ascii")]})
        login = await self._credentials.login(registry)
        if login is not None:
            if parsed.scheme == "http" and settings.scheme == "https":
                raise Unavailable(
                    f"the token realm {parsed.scheme}://{parsed.netloc}{parsed.path} of {registry} is plain HTTP; "
                    "credentials for a registry reached over HTTPS are not sent in clear text",
                )
            headers.setRawHeaders(b"Authorization", [basic(login)])
        response = await self._transport.send_to_realm(registry, settings.tls, url, headers)
        body = await self._transport.content(response, registry, _TOKEN_ANSWER_LIMIT)
        if response.code != 200:
            answered = f"token service of {registry} answered {response.code}"
            raise Unauthorized(answered) if response.code in (401, 403) else Unavailable(answered)
        try:
            document = json.loads(body)
            value = document.get("token") or document.get("access_token")
            if not isinstance(value, str) or not value:
                raise ValueError("no token in the answer")
            lifetime = float(document.get("expires_in") or _DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError) as e:
            raise Unavailable(f"token service of {registry} sent an invalid answer: {e}") from None
        # Refresh well before expiry: a request signed just before the end fails upstream.
        margin = min(30.0, lifetime / 4)
        self._tokens.put((registry, scope), value, self._clock.seconds() + lifetime - margin)
        return value
