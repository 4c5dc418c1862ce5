"""The client for upstream registries: TLS per registry, auth, redirects, errors.

One persistent connection pool serves every upstream.  Tokens from a bearer
challenge are cached per registry and scope and refreshed before they expire;
a 401 on a cached token fetches a new one once.
"""

from __future__ import annotations

import base64
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence
from urllib.parse import urlencode, urljoin, urlsplit

import treq
from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IHostnameResolver, IOpenSSLClientConnectionCreator, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    optionsForClientTLS,
)
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, PotentialDataLoss, ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS, IResponse
from zope.interface import implementer

from ociregistry.allowlist import Allowlist, CheckedResolver, ReactorWithResolver
from ociregistry.config import RegistrySettings, registry_settings
from ociregistry.credentials import Credentials
from ociregistry.errors import OCIError
from ociregistry.grammar import DOCKER_HUB
from ociregistry.inflight import InFlight
from ociregistry.metrics import Metrics

log = Logger()

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
_ACCEPT_MANIFESTS = ", ".join(MANIFEST_TYPES).encode("ascii")
_REDIRECTS = (301, 302, 303, 307, 308)
_RETRY_STATUSES = (500, 502, 503, 504)
_MAX_REDIRECTS = 5
_DEFAULT_TOKEN_LIFETIME = 60
_USER_AGENT = b"ociregistry"


class UpstreamNotFound(Exception):
    """The upstream says the thing does not exist (or will not say, anonymously)."""


@dataclass
class _Token:
    value: str
    expires: float


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


def api_host(registry: str) -> str:
    """The host that serves a registry's API: Docker Hub's is not docker.io."""
    return "registry-1.docker.io" if registry == DOCKER_HUB else registry


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def _split_host(host: str, scheme: str) -> tuple[str, int]:
    parsed = urlsplit(f"//{host}")
    return parsed.hostname or host, parsed.port or _default_port(scheme)


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """TLS without verifying the server, for ``insecureSkipVerify`` registries."""

    def __init__(self, hostname: str, options: CertificateOptions) -> None:
        self._hostname = hostname.encode("idna")
        self._options = options

    def clientConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._options.getContext(), None)
        connection.set_app_data(protocol)
        if not re.match(rb"[0-9.:\[\]]+\Z", self._hostname):
            connection.set_tlsext_host_name(self._hostname)
        return connection


@implementer(IPolicyForHTTPS)
class TLSPolicy:
    """Chooses TLS options by the host being contacted, from the registries' settings."""

    def __init__(self, registries: Sequence[RegistrySettings]) -> None:
        self._by_netloc: dict[tuple[str, int], RegistrySettings] = {}
        for settings in registries:
            host, port = _split_host(api_host(settings.name), settings.scheme)
            self._by_netloc[(host.lower(), port)] = settings

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        host = hostname.decode("ascii")
        settings = self._by_netloc.get((host.lower(), port))
        if settings is None:
            return optionsForClientTLS(host)
        tls = settings.tls
        client = None
        if tls.cert and tls.key:
            with open(tls.cert, "rb") as cert, open(tls.key, "rb") as key:
                client = PrivateCertificate.loadPEM(cert.read() + b"\n" + key.read())
        if tls.insecure_skip_verify:
            if client is None:
                options = CertificateOptions(verify=False)
            else:
                options = CertificateOptions(
                    privateKey=client.privateKey.original,
                    certificate=client.original,
                    verify=False,
                )
            return _Unverified(host, options)
        trust = None
        if tls.ca:
            with open(tls.ca, "rb") as ca:
                trust = Certificate.loadPEM(ca.read())
        return optionsForClientTLS(host, trustRoot=trust, clientCertificate=client)


class _BodyReader(Protocol):
    """Delivers a response body to a sink; aborts when the upstream stalls or on cancel."""

    def __init__(self, sink: Callable[[bytes], None], clock: IReactorTime, idle: float, source: str) -> None:
        self.done: Deferred[None] = Deferred(lambda _: self._abort())
        self._sink = sink
        self._clock = clock
        self._idle = idle
        self._source = source
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(self._idle, self._stalled)

    def dataReceived(self, data: bytes) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._idle)
        try:
            self._sink(data)
        except Exception:
            self._fail(Failure())

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(OCIError(502, "UNAVAILABLE", f"upstream {self._source} broke off: {_describe(reason.value)}"))

    def _stalled(self) -> None:
        self._fail(Failure(OCIError(504, "UNAVAILABLE", f"upstream {self._source} stalled for {self._idle:g} s")))

    def _fail(self, failure: Failure) -> None:
        if not self.done.called:
            self.done.errback(failure)
        self._abort()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()


def _describe(reason: BaseException) -> str:
    if isinstance(reason, (ResponseNeverReceived, ResponseFailed)) and reason.reasons:
        return _describe(reason.reasons[0].value)
    return str(reason) or type(reason).__name__


class Upstream:
    """Requests to upstream registries on behalf of the cache."""

    def __init__(
        self,
        reactor: IReactorTime,
        registries: Sequence[RegistrySettings],
        allowlist: Allowlist,
        *,
        credentials: Credentials | None = None,
        connect_timeout: float = 30.0,
        response_timeout: float = 60.0,
        idle_timeout: float = 60.0,
        retries: int = 2,
        backoff: float = 0.5,
        max_manifest_size: int = 8 * 1024 * 1024,
        metrics: Metrics | None = None,
        name_resolver: IHostnameResolver | None = None,
    ) -> None:
        self._metrics = metrics or Metrics()
        self._clock = reactor
        self._registries = tuple(registries)
        self._allowlist = allowlist
        self._credentials = credentials or Credentials(reactor, self.settings)
        self._response_timeout = response_timeout
        self._idle_timeout = idle_timeout
        self._retries = retries
        self._backoff = backoff
        self.max_manifest_size = max_manifest_size
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 8
        # Connections resolve names through the allow-list, which drops the
        # private addresses of hosts it does not trust.
        checked = ReactorWithResolver(reactor, CheckedResolver(name_resolver or reactor.nameResolver, allowlist))
        agent = Agent(checked, contextFactory=TLSPolicy(self._registries), pool=self._pool,
                      connectTimeout=connect_timeout)
        self._http = HTTPClient(agent)
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._token_fetches: InFlight[tuple[str, str], _Token] = InFlight()
        self._basic: set[str] = set()
        self._closed = False
        self._pauses: set[Deferred[None]] = set()

    def stop_retrying(self) -> None:
        """Shutdown is under way: failed requests are not tried again."""
        self._closed = True
        for pause in list(self._pauses):
            pause.cancel()

    async def close(self) -> None:
        """Close the pooled connections (at shutdown)."""
        self.stop_retrying()
        await self._pool.closeCachedConnections()

    def settings(self, registry: str) -> RegistrySettings:
        """The configured settings for a registry, or the defaults."""
        return registry_settings(self._registries, registry)

    def base_url(self, registry: str) -> str:
        """The scheme and host of a registry's API."""
        return f"{self.settings(registry).scheme}://{api_host(registry)}"

    def read_body(self, response: IResponse, sink: Callable[[bytes], None], source: str) -> "Deferred[None]":
        """Feed a response body to ``sink``; fails if the upstream stalls or breaks off.

        Cancelling the Deferred aborts the connection.
        """
        reader = _BodyReader(sink, self._clock, self._idle_timeout, source)
        response.deliverBody(reader)
        return reader.done

    async def _content(self, response: IResponse, registry: str, limit: int | None = None) -> bytes:
        chunks: list[bytes] = []
        received = [0]

        def collect(data: bytes) -> None:
            received[0] += len(data)
            if limit is not None and received[0] > limit:
                raise _too_large(registry, limit)
            chunks.append(data)

        await self.read_body(response, collect, registry)
        return b"".join(chunks)

    async def fetch_manifest(
        self, registry: str, repository: str, reference: str
    ) -> tuple[bytes, str | None, str | None]:
        """GET a manifest: (bytes, Content-Type, Docker-Content-Digest)."""
        response = await self.request(
            "GET", registry, repository, f"/v2/{repository}/manifests/{reference}", accept=_ACCEPT_MANIFESTS
        )
        await self._check(response, registry)
        limit = self.max_manifest_size
        if isinstance(response.length, int) and response.length > limit:
            await discard(response)
            raise _too_large(registry, limit)
        content = await self._content(response, registry, limit)
        return content, _header(response, b"content-type"), _header(response, b"docker-content-digest")

    async def manifest_digest(self, registry: str, repository: str, tag: str) -> str | None:
        """The digest a tag points at upstream, from one HEAD (Docker Hub does not count HEADs)."""
        response = await self.request(
            "HEAD", registry, repository, f"/v2/{repository}/manifests/{tag}", accept=_ACCEPT_MANIFESTS
        )
        await self._check(response, registry)
        await discard(response)
        return _header(response, b"docker-content-digest")

    async def head_blob(self, registry: str, repository: str, digest: str) -> int | None:
        """The size of an upstream blob from a HEAD, without downloading it."""
        response = await self.request("HEAD", registry, repository, f"/v2/{repository}/blobs/{digest}")
        await self._check(response, registry)
        await discard(response)
        # A HEAD response has no body, so the client reports length 0: read the header.
        length = _header(response, b"content-length")
        return int(length) if length and length.isdigit() else None

    async def open_blob(self, registry: str, repository: str, digest: str) -> IResponse:
        """GET a blob and return the response whose body is still to be read."""
        response = await self.request("GET", registry, repository, f"/v2/{repository}/blobs/{digest}")
        await self._check(response, registry)
        return response

    async def list_tags(self, registry: str, repository: str, query: dict[str, str]) -> tuple[list[str], bool]:
        """The upstream's tags for a repository, and whether it has more pages."""
        path = f"/v2/{repository}/tags/list"
        if query:
            path += "?" + urlencode(query)
        response = await self.request("GET", registry, repository, path)
        await self._check(response, registry)
        content = await self._content(response, registry, self.max_manifest_size)
        try:
            tags = json.loads(content)["tags"] or []
            if not all(isinstance(tag, str) for tag in tags):
                raise ValueError("tags must be strings")
        except (ValueError, KeyError, TypeError) as e:
            raise OCIError(502, "UNAVAILABLE", f"upstream {registry} sent an invalid tag list: {e}")
        return tags, response.headers.hasHeader(b"link")

    async def request(
        self,
        method: str,
        registry: str,
        repository: str,
        path: str,
        accept: bytes | None = None,
    ) -> IResponse:
        """Send a request with whatever authentication the registry asks for.

        The response is unbuffered: the caller reads or discards its body.
        """
        await self._allowlist.check(api_host(registry), via=registry)
        scope = f"repository:{repository}:pull"
        url = self.base_url(registry) + path
        for attempt in (1, 2):
            headers = Headers({b"User-Agent": [_USER_AGENT]})
            if accept:
                headers.setRawHeaders(b"Accept", [accept])
            authorization = await self._authorization(registry, scope)
            if authorization:
                headers.setRawHeaders(b"Authorization", [authorization])
            response = await self._send(registry, method, url, headers)
            if response.code != 401 or attempt == 2:
                return response
            challenge = parse_challenge(_header(response, b"www-authenticate") or "")
            await discard(response)
            if challenge.scheme == "bearer" and "realm" in challenge.params:
                self._tokens.pop((registry, scope), None)
                await self._token(registry, scope, challenge)
            elif challenge.scheme == "basic" and await self._credentials.login(registry) is not None:
                self._basic.add(registry)
            else:
                return response
        raise AssertionError("unreachable")

    async def _send(self, registry: str, method: str, url: str, headers: Headers) -> IResponse:
        """Send, retrying connection failures and 5xx answers with backoff.

        Only requests whose body nobody has read yet are retried.
        """
        for attempt in range(self._retries + 1):
            last = attempt == self._retries or self._closed
            started = time.monotonic()
            try:
                response = await self._guard(registry, self._follow(registry, method, url, headers))
            except OCIError as e:
                self._observe(registry, "error", started)
                if last or e.status not in (502, 504):
                    raise
                log.info("Retrying {method} {url}: {why}", method=method, url=url, why=e.message)
            else:
                self._observe(registry, str(response.code), started)
                if last or response.code not in _RETRY_STATUSES:
                    return response
                await discard(response)
                log.info("Retrying {method} {url} after status {code}", method=method, url=url, code=response.code)
            pause = deferLater(self._clock, self._backoff * 2**attempt, lambda: None)
            self._pauses.add(pause)
            try:
                await pause
            finally:
                self._pauses.discard(pause)
        raise AssertionError("unreachable")

    def _observe(self, registry: str, outcome: str, started: float) -> None:
        self._metrics.upstream_requests.labels(registry, outcome).observe(time.monotonic() - started)

    async def _authorization(self, registry: str, scope: str) -> bytes | None:
        static = self._credentials.token(registry)
        if static:
            return b"Bearer " + static.encode("utf-8")
        token = self._tokens.get((registry, scope))
        if token is not None and token.expires > self._clock.seconds():
            return b"Bearer " + token.value.encode("utf-8")
        if registry in self._basic:
            return await self._basic_credentials(registry)
        return None

    async def _basic_credentials(self, registry: str) -> bytes | None:
        login = await self._credentials.login(registry)
        if login is None:
            return None
        return b"Basic " + base64.b64encode(f"{login.user}:{login.password}".encode("utf-8"))

    async def _token(self, registry: str, scope: str, challenge: Challenge) -> _Token:
        async def fetch() -> _Token:
            token = await self._fetch_token(registry, scope, challenge)
            self._tokens[(registry, scope)] = token
            return token

        return await self._token_fetches.run((registry, scope), fetch)

    async def _fetch_token(self, registry: str, scope: str, challenge: Challenge) -> _Token:
        realm = challenge.params["realm"]
        query = {"scope": scope}
        if "service" in challenge.params:
            query["service"] = challenge.params["service"]
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        headers = Headers({b"User-Agent": [_USER_AGENT]})
        credentials = await self._basic_credentials(registry)
        if credentials:
            headers.setRawHeaders(b"Authorization", [credentials])
        response = await self._send(registry, "GET", url, headers)
        body = await self._content(response, registry, 1024 * 1024)
        if response.code != 200:
            raise OCIError(
                401 if response.code in (401, 403) else 502,
                "UNAUTHORIZED" if response.code in (401, 403) else "UNAVAILABLE",
                f"token service of {registry} answered {response.code}",
            )
        try:
            document = json.loads(body)
            value = document.get("token") or document.get("access_token")
            if not isinstance(value, str) or not value:
                raise ValueError("no token in the answer")
            lifetime = float(document.get("expires_in") or _DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError) as e:
            raise OCIError(502, "UNAVAILABLE", f"token service of {registry} sent an invalid answer: {e}")
        # Refresh well before expiry: a request signed just before the end fails upstream.
        margin = min(30.0, lifetime / 4)
        return _Token(value, self._clock.seconds() + lifetime - margin)

    async def _follow(self, registry: str, method: str, url: str, headers: Headers) -> IResponse:
        """Send, following redirects; Authorization never goes to another host."""
        origin = urlsplit(url).netloc
        for _ in range(_MAX_REDIRECTS + 1):
            netloc = urlsplit(url).netloc
            if netloc != origin or origin != api_host(registry):
                await self._allowlist.check(netloc, via=registry)
            request = self._http.request(method, url, headers=headers, allow_redirects=False, unbuffered=True)
            request.addTimeout(self._response_timeout, self._clock)
            response: IResponse = await request
            location = _header(response, b"location")
            if response.code not in _REDIRECTS or not location:
                return response
            await discard(response)
            url = urljoin(url, location)
            if urlsplit(url).netloc != origin:
                headers = headers.copy()
                headers.removeHeader(b"Authorization")
        raise OCIError(502, "UNAVAILABLE", "upstream redirected too many times")

    async def _guard(self, registry: str, work: Any) -> Any:
        """Turn network failures into OCI errors that say which upstream failed."""
        try:
            return await work
        except (OCIError, CancelledError):
            raise
        except neterror.ConnectingCancelledError:
            raise CancelledError()
        except TimeoutError:
            raise OCIError(504, "UNAVAILABLE", f"upstream {registry} did not answer in time")
        except (ResponseNeverReceived, ResponseFailed) as e:
            if any(reason.check(CancelledError) for reason in e.reasons):
                raise CancelledError()
            raise OCIError(502, "UNAVAILABLE", f"upstream {registry} unreachable: {_describe(e)}")
        except (neterror.ConnectError, neterror.DNSLookupError, neterror.ConnectionLost, SSL.Error) as e:
            raise OCIError(502, "UNAVAILABLE", f"upstream {registry} unreachable: {_describe(e)}")

    async def _check(self, response: IResponse, registry: str) -> None:
        """Raise for anything but 200; the caller names what was not found."""
        code = response.code
        if code == 200:
            return
        await discard(response)
        if code == 404:
            raise UpstreamNotFound()
        if code in (401, 403):
            if code == 401 and not self._credentials.configured(registry):
                # Docker Hub answers unknown repositories this way to anonymous clients.
                raise UpstreamNotFound()
            raise OCIError(403, "DENIED", f"upstream {registry} refused access ({code})")
        if code == 429:
            retry = _header(response, b"retry-after")
            headers = {b"Retry-After": retry.encode("ascii")} if retry else {}
            raise OCIError(429, "TOOMANYREQUESTS", f"upstream {registry} is rate limiting", headers=headers)
        raise OCIError(502, "UNAVAILABLE", f"upstream {registry} answered {code}")


async def discard(response: IResponse) -> None:
    """Read and drop a response body, so the connection can be reused."""
    try:
        await treq.collect(response, lambda data: None)
    except Exception:
        pass


def _header(response: IResponse, name: bytes) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None


def _too_large(registry: str, limit: int) -> OCIError:
    return OCIError(502, "MANIFEST_INVALID", f"manifest from {registry} is larger than {limit} bytes")
