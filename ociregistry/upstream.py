"""The client for upstream registries, as the cache sees it: manifests, blobs, tags.

Each job lives in a module of its own: ``transport`` (TLS, the allow-list,
redirects, timeouts, retries, body limits) and ``auth`` (challenges, tokens,
credentials); this module puts them together and turns answers into results.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from urllib.parse import urlencode

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHostnameResolver, IReactorTime
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from ociregistry.allowlist import Allowlist
from ociregistry.auth import Authenticator
from ociregistry.config import RegistrySettings, registry_settings
from ociregistry.credentials import Credentials
from ociregistry.errors import Denied, RateLimited, TooLarge, Unavailable
from ociregistry.metrics import Metrics
from ociregistry.transport import DEFAULT_MIN_RATE, DEFAULT_RATE_WINDOW, Sink, Transport, header

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
_ACCEPT_MANIFESTS = ", ".join(MANIFEST_TYPES).encode("ascii")


class UpstreamNotFound(Exception):
    """The upstream says the thing does not exist (or will not say, anonymously)."""


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
        min_rate: float = DEFAULT_MIN_RATE,
        rate_window: float = DEFAULT_RATE_WINDOW,
        retries: int = 2,
        backoff: float = 0.5,
        max_manifest_size: int = 8 * 1024 * 1024,
        metrics: Metrics | None = None,
        name_resolver: IHostnameResolver | None = None,
    ) -> None:
        self._registries = tuple(registries)
        self.max_manifest_size = max_manifest_size
        self._credentials = credentials or Credentials(reactor, self.settings)
        self._transport = Transport(
            reactor, self._registries, allowlist,
            connect_timeout=connect_timeout, response_timeout=response_timeout, idle_timeout=idle_timeout,
            min_rate=min_rate, rate_window=rate_window, retries=retries, backoff=backoff,
            metrics=metrics, name_resolver=name_resolver,
        )
        self._auth = Authenticator(reactor, self._transport, self._credentials, self.settings)

    def stop_retrying(self) -> None:
        """Shutdown is under way: failed requests are not tried again."""
        self._transport.stop_retrying()

    async def close(self) -> None:
        """Close the pooled connections (at shutdown)."""
        await self._transport.close()

    def settings(self, registry: str) -> RegistrySettings:
        """The configured settings for a registry, or the defaults."""
        return registry_settings(self._registries, registry)

    def read_body(self, response: IResponse, sink: Sink, source: str) -> Deferred[None]:
        """Feed a response body to ``sink``; fails if the upstream stalls, trickles or breaks off.

        Cancelling the Deferred aborts the connection.
        """
        return self._transport.read_body(response, sink, source)

    async def fetch_manifest(
        self, registry: str, repository: str, reference: str
    ) -> tuple[bytes, str | None, str | None]:
        """GET a manifest: (bytes, Content-Type, Docker-Content-Digest)."""
        response = await self.request(
            "GET", registry, repository, f"manifests/{reference}", accept=_ACCEPT_MANIFESTS
        )
        await self._check(response, registry)
        content = await self.read_manifest(response, registry)
        return content, header(response, b"content-type"), header(response, b"docker-content-digest")

    async def read_manifest(self, response: IResponse, source: str) -> bytes:
        """A manifest's body, from an upstream or a peer; TooLarge past the manifest size limit."""
        limit = self.max_manifest_size
        if isinstance(response.length, int) and response.length > limit:
            await self._transport.discard(response, source)
            raise _too_large(source, limit)
        return await self._transport.content(response, source, limit, lambda: _too_large(source, limit))

    async def manifest_digest(self, registry: str, repository: str, tag: str) -> str | None:
        """The digest a tag points at upstream, from one HEAD (Docker Hub does not count HEADs)."""
        response = await self.request(
            "HEAD", registry, repository, f"manifests/{tag}", accept=_ACCEPT_MANIFESTS
        )
        await self._check(response, registry)
        await self._transport.discard(response, registry)
        return header(response, b"docker-content-digest")

    async def head_blob(self, registry: str, repository: str, digest: str) -> int | None:
        """The size of an upstream blob from a HEAD, without downloading it."""
        response = await self.request("HEAD", registry, repository, f"blobs/{digest}")
        await self._check(response, registry)
        await self._transport.discard(response, registry)
        # A HEAD response has no body, so the client reports length 0: read the header.
        length = header(response, b"content-length")
        return int(length) if length and length.isdigit() else None

    async def open_blob(self, registry: str, repository: str, digest: str) -> IResponse:
        """GET a blob and return the response whose body is still to be read."""
        response = await self.request("GET", registry, repository, f"blobs/{digest}")
        await self._check(response, registry)
        return response

    async def list_tags(self, registry: str, repository: str, query: dict[str, str]) -> tuple[list[str], bool]:
        """The upstream's tags for a repository, and whether it has more pages."""
        path = "tags/list"
        if query:
            path += "?" + urlencode(query)
        response = await self.request("GET", registry, repository, path)
        await self._check(response, registry)
        content = await self._transport.content(response, registry, self.max_manifest_size)
        try:
            tags = json.loads(content)["tags"] or []
            if not all(isinstance(tag, str) for tag in tags):
                raise ValueError("tags must be strings")
        except (ValueError, KeyError, TypeError) as e:
            raise Unavailable(f"upstream {registry} sent an invalid tag list: {e}") from None
        return tags, response.headers.hasHeader(b"link")

    async def request(
        self,
        method: str,
        registry: str,
        repository: str,
        path: str,
        accept: bytes | None = None,
    ) -> IResponse:
        """Send a request for ``path`` under a repository's API, with whatever authentication the registry asks for.

        The request goes where the registry's settings say it really is, with
        the repository as that upstream names it; the response is unbuffered:
        the caller reads or discards its body.
        """
        settings = self.settings(registry)
        name = settings.upstream_repository(repository)
        scope = f"repository:{name}:pull"
        url = f"{settings.scheme}://{settings.api_host}/v2/{name}/{path}"
        for attempt in (1, 2):
            headers = Headers({b"User-Agent": [settings.user_agent.encode("ascii")]})
            if accept:
                headers.setRawHeaders(b"Accept", [accept])
            authorization = await self._auth.authorization(registry, scope)
            if authorization:
                headers.setRawHeaders(b"Authorization", [authorization])
            response = await self._transport.send(registry, method, url, headers)
            if response.code != 401 or attempt == 2:
                return response
            challenge = header(response, b"www-authenticate")
            await self._transport.discard(response, registry)
            if not await self._auth.answer(registry, scope, challenge):
                return response
        raise AssertionError("unreachable")

    async def _check(self, response: IResponse, registry: str) -> None:
        """Raise for anything but 200; the caller names what was not found."""
        code = response.code
        if code == 200:
            return
        await self._transport.discard(response, registry)
        if code == 404:
            raise UpstreamNotFound()
        if code in (401, 403):
            if code == 401 and not self._credentials.configured(registry):
                # Docker Hub answers unknown repositories this way to anonymous clients.
                raise UpstreamNotFound()
            raise Denied(f"upstream {registry} refused access ({code})")
        if code == 429:
            retry = header(response, b"retry-after")
            raise RateLimited(f"upstream {registry} is rate limiting", retry if retry and retry.isascii() else None)
        raise Unavailable(f"upstream {registry} answered {code}")


def _too_large(registry: str, limit: int) -> TooLarge:
    return TooLarge(f"manifest from {registry} is larger than {limit} bytes")
