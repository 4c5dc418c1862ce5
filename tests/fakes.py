"""Fakes for unit tests: an upstream registry written as a Twisted resource."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import treq
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from ociregistry.config import RegistrySettings
from ociregistry.errors import OCIError
from ociregistry.index import Index, IndexConnection
from ociregistry.sqlite import SqliteEngine
from ociregistry.upstream import UpstreamNotFound

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
def connection_of(index: Index) -> IndexConnection:
    """The sqlite connection an index answers the reactor with, to look at it (and prune) at once in tests."""
    assert isinstance(index.engine, SqliteEngine)
    return index.engine.connection


OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def digest_of(content: bytes) -> str:
    """The sha256 digest of some bytes."""
    return "sha256:" + hashlib.sha256(content).hexdigest()


@dataclass
class Image:
    """A small single-platform OCI image: manifest, config and layers."""

    manifest: bytes
    digest: str
    config: bytes
    layers: list[bytes]

    @property
    def blobs(self) -> dict[str, bytes]:
        """Every blob of the image by digest."""
        return {digest_of(b): b for b in [self.config, *self.layers]}


def make_image(*layers: bytes, config: bytes = b'{"architecture":"amd64","os":"linux"}') -> Image:
    """Build an OCI image manifest around the given layer contents."""
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest_of(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest_of(layer), "size": len(layer)} for layer in layers],
    }).encode()
    return Image(manifest, digest_of(manifest), config, list(layers))


def make_index(*images: Image) -> bytes:
    """An OCI index of the given images, one platform each."""
    return json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": image.digest, "size": len(image.manifest),
                       "platform": {"os": "linux", "architecture": arch}}
                      for image, arch in zip(images, ["amd64", "arm64", "ppc64le", "s390x"])],
    }).encode()


@dataclass
class Behaviour:
    """How the fake answers a blob: which bytes, how fast, and what goes wrong."""

    chunk: int = 64 * 1024
    delay: float = 0.0
    wrong_bytes: bool = False
    drop_after: int | None = None
    status: int = 200


class FakeRegistry(Resource):
    """A registry serving manifests and blobs from memory, recording every request.

    ``auth`` may be ``("basic", user, password)`` or ``("bearer", realm_url)``;
    ``redirect_blobs`` sends blob GETs to another base URL, as registries do
    with their storage.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.manifests: dict[tuple[str, str], tuple[str, bytes]] = {}
        self.blobs: dict[str, bytes] = {}
        self.behaviour: dict[str, Behaviour] = {}
        self.requests: list[tuple[str, str]] = []
        self.authorizations: list[str | None] = []
        self.user_agents: list[str | None] = []
        self.manifest_status = 200
        self.manifest_digest_header: str | None = None
        self.auth: tuple[str, ...] | None = None
        self.valid_tokens: set[str] = set()
        self.redirect_blobs: str | None = None
        self.next_statuses: list[int] = []
        self.connections = 0
        # Paces trickled blobs; unit tests give a Clock.
        self.clock: IReactorTime = reactor  # type: ignore[assignment]
        # While holding, requests wait unanswered until ``release``.
        self.holding = False
        self._held: list[Any] = []

    def release(self) -> None:
        """Answer the requests held back, and stop holding."""
        self.holding = False
        held, self._held = self._held, []
        for request in held:
            body = self.render(request)
            if body is not NOT_DONE_YET:
                request.write(body)
                request.finish()

    def add_image(self, repository: str, tag: str, image: Image) -> None:
        """Serve an image under a tag and its digest."""
        for ref in (tag, image.digest):
            self.manifests[(repository, ref)] = (OCI_MANIFEST, image.manifest)
        self.blobs.update(image.blobs)

    def add_manifest(self, repository: str, ref: str, media_type: str, content: bytes) -> None:
        """Serve raw manifest bytes under a reference and their digest."""
        for key in (ref, digest_of(content)):
            self.manifests[(repository, key)] = (media_type, content)

    def count(self, method: str, fragment: str) -> int:
        """How many requests of a method had a path containing ``fragment``."""
        return sum(1 for m, path in self.requests if m == method and fragment in path)

    def _authorized(self, request: Any) -> bool:
        header = request.getHeader(b"authorization")
        self.authorizations.append(header.decode() if header else None)
        if self.auth is None:
            return True
        if self.auth[0] == "basic":
            expected = "Basic " + base64.b64encode(f"{self.auth[1]}:{self.auth[2]}".encode()).decode()
            if header and header.decode() == expected:
                return True
            request.setHeader(b"WWW-Authenticate", b'Basic realm="fake"')
        else:
            if header and header.decode().removeprefix("Bearer ") in self.valid_tokens:
                return True
            request.setHeader(b"WWW-Authenticate",
                              f'Bearer realm="{self.auth[1]}",service="fake"'.encode())
        request.setResponseCode(401)
        return False

    def render(self, request: Any) -> Any:
        if self.holding:
            self._held.append(request)
            return NOT_DONE_YET
        path = request.path.decode()
        self.requests.append((request.method.decode(), path))
        agent = request.getHeader(b"user-agent")
        self.user_agents.append(agent.decode() if agent else None)
        request.setHeader(b"Docker-Distribution-API-Version", b"registry/2.0")
        if not self._authorized(request):
            return b'{"errors":[{"code":"UNAUTHORIZED","message":"no"}]}'
        if self.next_statuses:
            request.setResponseCode(self.next_statuses.pop(0))
            request.setHeader(b"Retry-After", b"7")
            return b'{"errors":[{"code":"UNKNOWN","message":"injected fault"}]}'
        if path in ("/v2/", "/v2"):
            return b"{}"
        parts = path[len("/v2/"):].split("/")
        repository, kind, ref = "/".join(parts[:-2]), parts[-2], parts[-1]
        if kind == "manifests":
            return self._manifest(request, repository, ref)
        if kind == "blobs":
            return self._blob(request, ref)
        if parts[-2:] == ["tags", "list"]:
            repository = "/".join(parts[:-2])
            tags = sorted({r for (repo, r) in self.manifests if repo == repository and ":" not in r})
            if not tags:
                request.setResponseCode(404)
                return b'{"errors":[{"code":"NAME_UNKNOWN","message":"no"}]}'
            return json.dumps({"name": repository, "tags": tags}).encode()
        request.setResponseCode(404)
        return b""

    def _manifest(self, request: Any, repository: str, ref: str) -> bytes:
        if self.manifest_status != 200:
            request.setResponseCode(self.manifest_status)
            return b'{"errors":[{"code":"UNKNOWN","message":"fault"}]}'
        found = self.manifests.get((repository, ref))
        if found is None:
            request.setResponseCode(404)
            return b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"no"}]}'
        media_type, content = found
        request.setHeader(b"Content-Type", media_type.encode())
        request.setHeader(b"Docker-Content-Digest", (self.manifest_digest_header or digest_of(content)).encode())
        return content

    def _blob(self, request: Any, digest: str) -> Any:
        content = self.blobs.get(digest)
        behaviour = self.behaviour.get(digest, Behaviour())
        if content is None or behaviour.status != 200:
            request.setResponseCode(404 if content is None else behaviour.status)
            return b'{"errors":[{"code":"BLOB_UNKNOWN","message":"no"}]}'
        if self.redirect_blobs and request.method == b"GET":
            request.redirect(f"{self.redirect_blobs}/v2/storage/blobs/{digest}".encode())
            return b""
        if behaviour.wrong_bytes:
            content = bytes(255 - b for b in content[:1]) + content[1:]
        request.setHeader(b"Content-Length", str(len(content)).encode())
        request.setHeader(b"Docker-Content-Digest", digest.encode())
        if request.method == b"HEAD":
            return b""
        pending: list[Any] = []
        request.notifyFinish().addErrback(lambda _: [call.cancel() for call in pending if call.active()])
        self._stream(request, content, 0, behaviour, pending)
        return NOT_DONE_YET

    def _stream(self, request: Any, content: bytes, offset: int, behaviour: Behaviour, pending: list[Any]) -> None:
        if request._disconnected:
            return
        if behaviour.drop_after is not None and offset >= behaviour.drop_after:
            request.channel.transport.abortConnection()
            return
        if offset >= len(content):
            request.finish()
            return
        end = offset + behaviour.chunk
        if behaviour.drop_after is not None:
            end = min(end, behaviour.drop_after)
        request.write(content[offset:end])
        if end >= len(content) and behaviour.drop_after is None:
            request.finish()
            return
        pending[:] = [self.clock.callLater(behaviour.delay, self._stream, request, content, end, behaviour, pending)]


async def listen(resource: Resource | Site) -> tuple[int, Any]:
    """Serve a resource (or a site as built) on 127.0.0.1 at a free port: (port, listening port to stop)."""
    site = resource if isinstance(resource, Site) else Site(resource)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    return port.getHost().port, port


def wait(seconds: float) -> Deferred[None]:
    """A Deferred that fires after some time on the real reactor."""
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class TokenRealm(Resource):
    """A token endpoint: hands out numbered tokens and remembers them in the registry."""

    isLeaf = True

    def __init__(self, registry: FakeRegistry, expires_in: int = 300) -> None:
        super().__init__()
        self.registry = registry
        self.expires_in = expires_in
        self.requests: list[tuple[str, str | None]] = []
        self.user_agents: list[str | None] = []

    def render_GET(self, request: Any) -> bytes:
        scope = request.args.get(b"scope", [b""])[0].decode()
        header = request.getHeader(b"authorization")
        self.requests.append((scope, header.decode() if header else None))
        agent = request.getHeader(b"user-agent")
        self.user_agents.append(agent.decode() if agent else None)
        token = f"token-{len(self.requests)}"
        self.registry.valid_tokens.add(token)
        return json.dumps({"token": token, "expires_in": self.expires_in}).encode()


class StubUpstream:
    """The upstream client's public methods over fake registries in memory (StubTreq), by registry name.

    What a registry sends after its first answer (a trickle, a released
    request) arrives when ``flush`` pumps it.
    """

    def __init__(self, registries: dict[str, FakeRegistry]) -> None:
        self._stubs = {name: StubTreq(registry) for name, registry in registries.items()}

    def flush(self, *registries: str) -> None:
        """Deliver what the named registries (or every one) have answered so far."""
        for name in registries or list(self._stubs):
            self._stubs[name].flush()

    def settings(self, registry: str) -> RegistrySettings:
        return RegistrySettings(name=registry, scheme="http")

    def stop_retrying(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def _request(self, method: str, registry: str, path: str) -> Any:
        response = await self._stubs[registry].request(method, f"http://{registry}{path}", unbuffered=True)
        if response.code == 404:
            raise UpstreamNotFound()
        if response.code != 200:
            raise OCIError(502, "UNAVAILABLE", f"upstream {registry} answered {response.code}")
        return response

    async def fetch_manifest(self, registry: str, repository: str, reference: str) -> tuple[bytes, str | None, str | None]:
        response = await self._request("GET", registry, f"/v2/{repository}/manifests/{reference}")
        content = await treq.content(response)
        return content, _first_header(response, b"content-type"), _first_header(response, b"docker-content-digest")

    async def manifest_digest(self, registry: str, repository: str, tag: str) -> str | None:
        response = await self._request("HEAD", registry, f"/v2/{repository}/manifests/{tag}")
        return _first_header(response, b"docker-content-digest")

    async def head_blob(self, registry: str, repository: str, digest: str) -> int | None:
        response = await self._request("HEAD", registry, f"/v2/{repository}/blobs/{digest}")
        length = _first_header(response, b"content-length")
        return int(length) if length else None

    async def open_blob(self, registry: str, repository: str, digest: str) -> Any:
        return await self._request("GET", registry, f"/v2/{repository}/blobs/{digest}")

    def read_body(self, response: Any, sink: Any, source: str) -> Deferred[None]:
        return treq.collect(response, sink)  # type: ignore[no-any-return]


def _first_header(response: Any, name: bytes) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None
