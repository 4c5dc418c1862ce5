"""The administrative HTTP API, on a listener of its own (loopback by default).

The Go server's endpoints, parameters and text output, plus ``?format=json``:
``GET /cmd/manifest/list``, ``GET /cmd/image/list``, ``GET /cmd/blob/list``,
``DELETE /cmd/prune`` and ``POST /cmd/stop``.  With a token, every request
must carry ``Authorization: Bearer <token>``.

Web pages must not drive it: requests naming a foreign ``Host`` (DNS rebinding)
or coming from another origin (``Origin``, ``Sec-Fetch-Site``) are refused, and
what changes state needs a method (``POST``, ``DELETE``) that a page cannot send
cross-site without these headers giving it away.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
from collections.abc import Callable
from functools import partial
from typing import Any, TypeAlias

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ociregistry.config import PruneSettings, parse_duration, parse_size
from ociregistry.index import CachedImage, Index, IndexConnection, Removal
from ociregistry.manifests import IMAGE_TYPES
from ociregistry.prune import (
    ToThread,
    criteria_for,
    delete_pruned,
    describe_removal,
    inline,
    local_time,
    log_removal,
    on_own_connection,
    parse_patterns,
    prune,
    removal_store,
)
from ociregistry.s3 import S3Store
from ociregistry.site import ClientLimits, LimitedSite
from ociregistry.store import BlobStore

log = Logger()

DEFAULT_LISTEN = "tcp:8081:interface=127.0.0.1"
# What a command answers: text and a JSON document, at once or later.
Answer: TypeAlias = "tuple[str, Any] | Deferred[tuple[str, Any]]"
_DEFAULT_COUNT = 50


class BadRequest(Exception):
    """A parameter the API cannot use; the message says which."""


def read_token(path: str) -> str:
    """The admin bearer token: the first line of a file, which must not be empty."""
    with open(path, encoding="utf-8") as f:
        token = f.readline().strip()
    if not token:
        raise ValueError(f"{path}: the token file is empty")
    return token


class AdminAPI(Resource):
    """Everything under /cmd."""

    isLeaf = True

    def __init__(self, index: Index, store: BlobStore, clock: IReactorTime,
                 stop: Callable[[], None], token: str | None = None, listen_host: str = "",
                 to_thread: ToThread = inline, bucket: S3Store | None = None) -> None:
        super().__init__()
        self._index = index
        self._store = store
        self._bucket = bucket
        self._clock = clock
        self._stop = stop
        self._token = token
        self._listen_host = listen_host
        self._to_thread = to_thread
        self._routes: dict[tuple[str, bytes], Callable[[dict[str, str]], Answer]] = {
            ("manifest/list", b"GET"): self._manifest_list,
            ("image/list", b"GET"): self._image_list,
            ("blob/list", b"GET"): self._blob_list,
            ("prune", b"DELETE"): self._prune,
            ("stop", b"POST"): self._stop_server,
        }

    def render(self, request: Request) -> bytes | int:
        """Refuse other sites, check the token, route, and answer in text or JSON."""
        refusal = self._cross_site(request)
        if refusal is not None:
            log.warn("Refused an admin request: {why}", why=refusal)
            request.setResponseCode(403)
            request.setHeader(b"Content-Type", b"application/json")
            return json.dumps({"errors": [{"code": "DENIED", "message": refusal}]}).encode("utf-8") + b"\n"
        if not self._authorized(request):
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="ociregistry-admin"')
            return _answer(request, 401, "unauthorized\n")
        path = "/".join(p.decode("utf-8", "replace") for p in request.postpath or []).strip("/")
        method = request.method
        if method == b"HEAD":
            method = b"GET"
        handler = self._routes.get((path, method))
        if handler is None:
            known = [m.decode() for (p, m) in self._routes if p == path]
            if known:
                request.setHeader(b"Allow", ", ".join(known).encode())
                return _answer(request, 405, f"use {' or '.join(known)} for /cmd/{path}\n")
            return _answer(request, 404, f"no such command: /cmd/{path}\n")
        query = {k.decode("utf-8", "replace"): v[0].decode("utf-8", "replace")
                 for k, v in (request.args or {}).items() if v}
        try:
            answer = handler(query)
        except BadRequest as e:
            return _answer(request, 400, f"{e}\n")
        if isinstance(answer, Deferred):
            answer.addCallbacks(lambda result: _finish(request, _body(request, query, result)),
                                lambda failure: _finish(request, _failed(request, failure)))
            return NOT_DONE_YET
        return _body(request, query, answer)

    def _on_thread(self, work: Callable[[IndexConnection], tuple[str, Any]]) -> Deferred[tuple[str, Any]]:
        """Work that reads or prunes the whole index, on a thread with a connection of its own."""
        return on_own_connection(self._index, self._to_thread, work)

    def _cross_site(self, request: Request) -> str | None:
        """Why a request may come from a web page of another site, or None."""
        host = _header(request, b"host")
        if not self._own_host(request, _host_name(host)):
            return f"Host {host!r} is not a name of this listener: use a loopback address or {self._listen_host!r}"
        origin = _header(request, b"origin")
        scheme = "https" if request.isSecure() else "http"
        if origin and origin != f"{scheme}://{host}":
            return f"Origin {origin!r} is another site than {scheme}://{host}"
        fetch_site = _header(request, b"sec-fetch-site")
        if fetch_site not in ("", "same-origin", "none"):
            return f"Sec-Fetch-Site {fetch_site!r}: the request comes from another site"
        return None

    def _own_host(self, request: Request, name: str) -> bool:
        """Whether a Host names this listener: loopback, its configured address, or the address connected to."""
        if not name:
            return True  # only clients other than browsers leave out Host
        if name in ("localhost", self._listen_host) or name.endswith(".localhost"):
            return True
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            return False
        local = getattr(request.getHost(), "host", None)
        return address.is_loopback or str(address) == local

    def _authorized(self, request: Request) -> bool:
        if self._token is None:
            return True
        given = request.getHeader(b"authorization") or b""
        return hmac.compare_digest(given, b"Bearer " + self._token.encode("utf-8"))

    def _images(self, index: IndexConnection, query: dict[str, str]) -> list[CachedImage]:
        images = index.cached_images(every_manifest=True)
        if "pattern" in query:
            patterns = _parameter(parse_patterns, query["pattern"], "pattern")
            images = [i for i in images if any(p.search(i.reference) for p in patterns)]
        return images

    def _manifest_list(self, query: dict[str, str]) -> Answer:
        count = _count(query)
        _check_pattern(query)

        def listing(index: IndexConnection) -> tuple[str, Any]:
            images = self._images(index, query)[:count]
            if not images:
                return "no manifests found\n", []
            lines = ["URL DIGEST CREATED PULLED"]
            lines += [f"{i.reference} {i.digest} {local_time(i.created)} {local_time(i.pulled)}" for i in images]
            return "\n".join(lines) + "\n", [_image_document(i) for i in images]

        return self._on_thread(listing)

    def _image_list(self, query: dict[str, str]) -> Answer:
        count = _count(query)
        _check_pattern(query)

        def listing(index: IndexConnection) -> tuple[str, Any]:
            images = [i for i in self._images(index, query) if i.media_type in IMAGE_TYPES]
            with_blobs = [(i, [r.child for r in index.references(i.digest) if r.kind != "manifest"])
                          for i in images]
            if "digest" in query:
                with_blobs = [(i, blobs) for i, blobs in with_blobs if any(query["digest"] in b for b in blobs)]
            with_blobs = with_blobs[:count]
            if not with_blobs:
                return "no manifests found\n", []
            lines = ["URL DIGEST CREATED PULLED"]
            for image, blobs in with_blobs:
                lines.append(f"{image.reference} {image.digest} {local_time(image.created)} "
                             f"{local_time(image.pulled)}")
                lines += [f"- {blob}" for blob in blobs]
            return "\n".join(lines) + "\n", [{**_image_document(i), "blobs": b} for i, b in with_blobs]

        return self._on_thread(listing)

    def _blob_list(self, query: dict[str, str]) -> Answer:
        count = _count(query)

        def listing(index: IndexConnection) -> tuple[str, Any]:
            blobs = index.blob_refcounts(query.get("substr", ""))[:count]
            if not blobs:
                return "no blobs found\n", []
            lines = ["URL REFCNT"] + [f"{digest} {refcount}" for digest, _, refcount in blobs]
            return "\n".join(lines) + "\n", [
                {"digest": digest, "size": size, "refcount": refcount} for digest, size, refcount in blobs]

        return self._on_thread(listing)

    def _prune(self, query: dict[str, str]) -> Answer:
        kind = query.get("type", "")
        if kind not in ("accessed", "created", "pattern", "size"):
            raise BadRequest("type must be accessed, created, pattern or size")
        dry_run = query.get("dryRun", "true").lower() not in ("false", "0", "no")
        settings = PruneSettings(
            type=kind,
            duration=_parameter(parse_duration, query["dur"], "dur") if "dur" in query else None,
            expr=query.get("expr"),
            max_size=_parameter(parse_size, query["maxSize"], "maxSize") if "maxSize" in query else None,
            count=_count(query),
            dry_run=dry_run,
        )
        grace = _parameter(parse_duration, query["grace"], "grace") if "grace" in query else None
        try:
            criteria = criteria_for(settings, self._clock.seconds())
        except ValueError as e:
            raise BadRequest(str(e)) from None

        def pruning(index: IndexConnection) -> tuple[list[str], Any, Removal]:
            removal = prune(index, self._store, criteria, dry_run, grace)
            return describe_removal(removal, dry_run), {
                "dryRun": dry_run,
                "images": [i.reference for i in removal.images],
                "manifests": [{"digest": d, "size": s} for d, s in removal.manifests],
                "blobs": [{"digest": d, "size": s} for d, s in removal.blobs],
                "bytes": removal.size,
            }, removal

        async def pruned() -> tuple[str, Any]:
            lines, document, removal = await on_own_connection(self._index, self._to_thread, pruning)
            log_removal(lines, f"Admin prune ({kind})")
            if self._bucket is not None and not dry_run:
                await delete_pruned(self._index, self._bucket, removal, self._to_thread)
            return "\n".join(lines) + "\n", document

        return Deferred.fromCoroutine(pruned())

    def _stop_server(self, query: dict[str, str]) -> Answer:
        log.info("Stopping, as the admin API was asked to")
        self._clock.callLater(0, self._stop)
        return "stopping\n", {"stopping": True}


def _check_pattern(query: dict[str, str]) -> None:
    """Refuse a bad pattern before any work starts."""
    if "pattern" in query:
        _parameter(parse_patterns, query["pattern"], "pattern")


def _body(request: Request, query: dict[str, str], answer: tuple[str, Any]) -> bytes:
    """An answer in text, or in JSON when asked for."""
    text, document = answer
    if query.get("format") == "json":
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(document, indent=2).encode("utf-8") + b"\n"
    return _answer(request, 200, text)


def _failed(request: Request, failure: Failure) -> bytes:
    log.failure("Admin request {uri} failed", failure, uri=request.uri)
    return _answer(request, 500, f"failed: {failure.getErrorMessage()}\n")


def _finish(request: Request, body: bytes) -> None:
    """Send an answer worked out later, unless the client has gone."""
    if request.finished or request.channel is None:
        return
    request.write(body)
    request.finish()


def _parameter(parse: Callable[[str], Any], value: str, name: str) -> Any:
    try:
        return parse(value)
    except ValueError as e:
        raise BadRequest(f"{name}: {e}") from None


def _count(query: dict[str, str]) -> int | None:
    """The Go server's ``count``: 50 by default, -1 (None) for no limit."""
    text = query.get("count", str(_DEFAULT_COUNT))
    if not re.fullmatch(r"-1|[0-9]+", text):
        raise BadRequest("count must be a number of items, or -1 for no limit")
    return None if text == "-1" else int(text)


def _image_document(image: CachedImage) -> dict[str, Any]:
    return {"url": image.reference, "digest": image.digest, "mediaType": image.media_type,
            "created": image.created, "pulled": image.pulled, "size": image.size}


def _header(request: Request, name: bytes) -> str:
    return (request.getHeader(name) or b"").decode("latin-1").strip()


def _host_name(host: str) -> str:
    """The name or address of a Host header, without the port or an IPv6 address's brackets."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _answer(request: Request, status: int, text: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return text.encode("utf-8")


def admin_site(index: Index, image_path: str, clock: IReactorTime, stop: Callable[[], None],
               token: str | None = None, listen_host: str = "", to_thread: ToThread = inline,
               limits: ClientLimits = ClientLimits(), bucket: S3Store | None = None) -> LimitedSite:
    """The admin web site: /cmd/..., answering requests for a loopback name or ``listen_host``.

    Its connections have the ``limits`` of every other listener's: header size
    and deadline, idle time and connections per address.
    """
    root = Resource()
    root.putChild(b"cmd", AdminAPI(index, removal_store(image_path), clock, stop, token, listen_host, to_thread,
                                   bucket))
    return LimitedSite(root, limits, reactor=clock)


def _interface(listen: str) -> str:
    """The address an endpoint string listens on, if it names one (``interface=``)."""
    for part in re.split(r"(?<!\\):", listen)[1:]:
        key, _, value = part.partition("=")
        if key == "interface":
            return value.replace("\\:", ":")
    return ""


def make_admin_service(index: Index, image_path: str, listen: str, reactor: Any, stop: Callable[[], None],
                       token: str | None = None, limits: ClientLimits = ClientLimits(),
                       bucket: S3Store | None = None) -> StreamServerEndpointService:
    """The admin API listening where ``listen`` (a Twisted endpoint string) says, its clients held to ``limits``."""
    to_thread = partial(deferToThreadPool, reactor, reactor.getThreadPool())
    service = StreamServerEndpointService(
        serverFromString(reactor, listen),
        admin_site(index, image_path, reactor, stop, token, _interface(listen), to_thread, limits, bucket))
    service.setName("admin")
    return service
