"""The Twisted Web resources of the pull API: /v2/ and everything below it."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from typing import cast
from urllib.parse import urlencode

from twisted.internet import tcp
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer, ITCPTransport
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from ociregistry.allowlist import lookups_on_behalf_of
from ociregistry.cache import Cache
from ociregistry.cluster import PEER_HEADER
from ociregistry.content import BlobSource, RemoteBlob, StoredBlob
from ociregistry.downloads import BlobDownload
from ociregistry.errors import (
    Internal,
    InvalidParameter,
    NotFound,
    OCIError,
    RangeNotSatisfiable,
    answer_for,
    unsupported,
)
from ociregistry.grammar import Route, Upstream, check_digest, check_reference, parse_path, resolve_upstream
from ociregistry.metrics import Metrics
from ociregistry.site import RegistryRequest, plain_tcp

log = Logger()

# Buffered writes (TLS) are small: each response holds about this much for a client that stalls.
_CHUNK = 64 * 1024
_SENDFILE_BURST = 8 * 1024 * 1024
_RANGE = re.compile(r"bytes=(\d*)-(\d*)\Z")
# Range positions of more digits than this are beyond any blob; they are not parsed (Python
# refuses to parse numbers of more than 4,300 digits, and a long one is slow to parse).
_POSITION_DIGITS = 19
_BEYOND = 10**_POSITION_DIGITS
_API_VERSION = (b"Docker-Distribution-API-Version", b"registry/2.0")


def parse_range(header: str | None, size: int) -> tuple[int, int] | RangeNotSatisfiable | None:
    """The byte range a Range header asks for, as (first, end exclusive).

    None means "send the whole blob" (no header, or one we may ignore per
    RFC 9110: malformed, several ranges); RangeNotSatisfiable means 416.
    A position too long to be a size is beyond the end of the blob, as RFC
    9110 reads it: a last position past the end means "to the end".
    """
    if header is None:
        return None
    match = _RANGE.match(header.strip().replace(" ", ""))
    if match is None or match.group(0) == "bytes=-":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":
        suffix = _position(last)
        if suffix == 0:
            return RangeNotSatisfiable(size)
        return max(0, size - suffix), size
    start = _position(first)
    end = size if last == "" else min(_position(last) + 1, size)
    if last != "" and _position(last) < start:
        return RangeNotSatisfiable(size)
    if start >= size:
        return RangeNotSatisfiable(size)
    return start, end


def _position(digits: str) -> int:
    """A Range position; any number too long to be a size counts as one past every size."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= _POSITION_DIGITS else _BEYOND


@implementer(IPushProducer)
class BlobSender:
    """Streams part of a blob to a client with backpressure, waiting for bytes in flight."""

    def __init__(
        self, request: RegistryRequest, source: BlobSource, start: int, end: int | None, metrics: Metrics
    ) -> None:
        self._request = request
        self._source = source
        self._metrics = metrics
        self._from = "cache" if isinstance(source, StoredBlob) else "upstream"
        self._served = metrics.bytes_served.labels(self._from)
        self._fd = source.open()
        self._position = start
        self._end = end
        self._paused = False
        self._stopped = False
        self._waiting: Deferred[None] | None = None
        self._socket = _plain_tcp(request)

    def start(self) -> None:
        """Begin sending; the sender finishes the request itself."""
        if self._from == "upstream":
            self._metrics.waiters.inc()
        self._request.registerProducer(self, True)
        if self._socket is not None:
            # The headers go into the transport's buffer now; sendfile waits until it is empty.
            self._request.write(b"")
        self._pump()

    def _pump(self) -> None:
        burst = 0
        while not self._paused and not self._stopped:
            limit = self._source.available()
            if self._end is not None:
                limit = min(limit, self._end)
            if self._position >= limit:
                if self._end is not None and self._position >= self._end:
                    self._finish()
                    return
                if self._source.size is None and self._position >= limit and self._complete():
                    self._finish()
                    return
                self._waiting = self._source.wait_for(self._position)
                self._waiting.addCallbacks(self._more, self._failed)
                return
            if self._socket is not None:
                if burst < _SENDFILE_BURST and _drained(self._socket):
                    sent = self._sendfile(min(limit - self._position, _SENDFILE_BURST - burst))
                    if sent:
                        burst += sent
                        continue
                if self._socket is not None:
                    # The socket is full (or we have sent a burst): nothing is copied into
                    # the transport's buffer, so a slow or vanished client holds no memory.
                    _resume_when_writable(self._socket)
                    return
            # A buffered write: the transport sends it when the socket is writable and
            # resumes us once its buffer is empty, so the reactor is never held for long.
            data = os.pread(self._fd, min(_CHUNK, limit - self._position), self._position)
            if not data:
                self._failed(Failure(OSError(f"blob file of {self._source.digest} is shorter than recorded")))
                return
            self._position += len(data)
            self._served.inc(len(data))
            self._request.write(data)

    def _sendfile(self, count: int) -> int:
        """Let the kernel copy file bytes straight to the socket; 0 when it is full or the client is gone."""
        assert self._socket is not None
        try:
            sent = os.sendfile(self._socket.fileno(), self._fd, self._position, count)
        except (BlockingIOError, ConnectionError):
            # A client that is gone is noticed by the transport, which then stops us.
            return 0
        except OSError:
            # Not every file system or socket supports it: the buffered path always works.
            self._socket = None
            return 0
        self._position += sent
        self._served.inc(sent)
        self._request.sentLength += sent
        return sent

    def _complete(self) -> bool:
        return self._source.size is not None and self._position >= self._source.size

    def _more(self, _: None) -> None:
        self._waiting = None
        if self._source.size is not None and self._end is None:
            self._end = self._source.size
        if self._source.size is None and self._source.available() <= self._position:
            # The download finished without a known length: what we have is everything.
            self._end = self._position
        self._pump()

    def _failed(self, failure: Failure) -> None:
        self._waiting = None
        if failure.check(CancelledError):
            return
        log.warn("Aborting a response for {digest}: {why}", digest=self._source.digest, why=failure.getErrorMessage())
        self._close()
        # Abort rather than end cleanly: the client must not take a short or wrong body as whole.
        transport = self._request.channel.transport if self._request.channel else None
        if transport is not None:
            cast(ITCPTransport, transport).abortConnection()

    def _finish(self) -> None:
        self._close()
        self._request.unregisterProducer()
        self._request.finish()

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            if self._from == "upstream":
                self._metrics.waiters.dec()
        self._stopped = True

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._waiting is None and not self._stopped:
            self._pump()

    def stopProducing(self) -> None:
        if self._waiting is not None:
            self._waiting.cancel()
        self._close()


def _plain_tcp(request: RegistryRequest) -> tcp.Connection | None:
    """The TCP connection under a plain HTTP/1.1 response of known length, for sendfile.

    TLS, HTTP/2 and chunked responses must go through their transports.
    """
    channel = request.channel
    if not isinstance(channel, HTTPChannel) or not request.responseHeaders.hasHeader(b"content-length"):
        return None
    return plain_tcp(channel.transport)


def _drained(transport: tcp.Connection) -> bool:
    """Whether the transport has written everything it was given (headers included)."""
    return not transport._tempDataLen and transport.offset == len(transport.dataBuffer)


def _resume_when_writable(transport: tcp.Connection) -> None:
    """Pause the transport's producer (the channel, and so the sender) until the socket takes more.

    This is what the transport does when its own buffer is full; with its buffer empty it
    resumes the producer as soon as the socket is writable, on a later reactor turn.
    """
    # The channel is registered as the transport's push producer while it sends.
    transport.producerPaused = True
    cast(IPushProducer, transport.producer).pauseProducing()
    transport.startWriting()


class RegistryAPI(Resource):
    """Everything under /v2: the pull endpoints, and OCI errors for the rest."""

    isLeaf = True

    def __init__(self, cache: Cache, default_ns: str, metrics: Metrics) -> None:
        super().__init__()
        self._cache = cache
        self._default_ns = default_ns
        self._metrics = metrics
        self.active = 0

    def render(self, request: RegistryRequest) -> object:
        self.active += 1
        # Asked for before the work starts: a cached answer finishes synchronously,
        # and a request that has finished never fires a later notifyFinish.
        finished = request.notifyFinish()
        work = Deferred.fromCoroutine(self._respond(request))
        work.addErrback(self._unexpected, request)
        finished.addErrback(lambda _: work.cancel())
        finished.addBoth(self._finished, request)
        return NOT_DONE_YET

    def _finished(self, _: object, request: RegistryRequest) -> None:
        self.active -= 1
        status = request.code
        started = request.started if request.started is not None else time.monotonic()
        self._metrics.requests.labels(request.route, str(status)).observe(time.monotonic() - started)
        if status >= 400:
            self._metrics.api_errors.inc()
        elif request.route == "manifest":
            self._metrics.manifest_pulls.inc()
        elif request.route == "blob":
            self._metrics.blob_pulls.inc()

    def _source(self, request: RegistryRequest, where: Upstream, source: str) -> None:
        """Note where a pull was served from, for the access log and metrics."""
        request.cache_status = source
        if source == "miss":
            self._metrics.upstream_pull(where.registry)
        else:
            self._metrics.cached_pulls.labels(where.registry).inc()

    async def _respond(self, request: RegistryRequest) -> None:
        lookups_on_behalf_of(request.getClientAddress())
        request.setHeader(*_API_VERSION)
        segments = [s.decode("utf-8", "replace") for s in request.postpath or []]
        try:
            if request.method not in (b"GET", b"HEAD"):
                raise unsupported("this registry is a pull-only mirror: push and delete are not supported")
            if segments in ([], [""]):
                request.route = "base"
                _send_bytes(request, b"{}", b"application/json")
                return
            route = parse_path(segments)
            request.route = route.kind.rstrip("s")
            namespace = _first(request.args.get(b"ns")) or (request.getHeader(b"x-registry") or b"").decode("latin-1")
            where = resolve_upstream(route.name, namespace.strip() or None, self._default_ns)
            if namespace:
                request.setHeader(b"OCI-Namespace", namespace.encode("latin-1"))
            if route.kind == "manifests":
                await self._manifest(request, route, where)
            elif route.kind == "blobs":
                await self._blob(request, route, where)
            else:
                await self._tags(request, route, where)
        except OCIError as e:
            _send_error(request, e)

    async def _manifest(self, request: RegistryRequest, route: Route, where: Upstream) -> None:
        check_reference(route.reference)
        record, content, source = await self._cache.manifest(where, route.reference, _from_peer(request))
        self._source(request, where, source)
        request.setHeader(b"Docker-Content-Digest", record.digest.encode("ascii"))
        request.setHeader(b"ETag", f'"{record.digest}"'.encode("ascii"))
        _send_bytes(request, content, record.media_type.encode("ascii"))

    async def _blob(self, request: RegistryRequest, route: Route, where: Upstream) -> None:
        digest = check_digest(route.reference)
        request.setHeader(b"Docker-Content-Digest", digest.encode("ascii"))
        request.setHeader(b"ETag", f'"{digest}"'.encode("ascii"))
        request.setHeader(b"Accept-Ranges", b"bytes")
        request.setHeader(b"Content-Type", b"application/octet-stream")
        if request.method == b"HEAD":
            size = await self._cache.blob_size(where, digest)
            if size is not None:
                request.setHeader(b"Content-Length", str(size).encode("ascii"))
            request.finish()
            return
        peer = _from_peer(request)
        source = await self._cache.blob(where, digest, peer)
        self._source(request, where, "miss" if isinstance(source, BlobDownload) else "hit")
        size = source.size
        location = source.redirect() if isinstance(source, RemoteBlob) and not peer else None
        if location is not None:
            # The store serves the blob itself, Range and all, to whoever has the URL for a while.
            request.setResponseCode(307)
            request.setHeader(b"Location", location.encode("ascii"))
            request.responseHeaders.removeHeader(b"Accept-Ranges")
            _send_bytes(request, b"", b"application/octet-stream")
            return
        header = request.getHeader(b"range")
        wanted = parse_range(header.decode("latin-1"), size) if header and size is not None else None
        if isinstance(wanted, RangeNotSatisfiable):
            if isinstance(source, BlobSource):
                source.close()
            raise wanted
        if wanted is None:
            start, end = 0, size
            if size is not None:
                request.setHeader(b"Content-Length", str(size).encode("ascii"))
        else:
            start, end = wanted
            request.setResponseCode(206)
            request.setHeader(b"Content-Range", f"bytes {start}-{end - 1}/{size}".encode("ascii"))
            request.setHeader(b"Content-Length", str(end - start).encode("ascii"))
        if isinstance(source, RemoteBlob):
            assert end is not None
            await self._send_remote(request, source, start, end)
        else:
            BlobSender(request, source, start, end, self._metrics).start()

    async def _send_remote(self, request: RegistryRequest, source: RemoteBlob, start: int, end: int) -> None:
        """Stream bytes the store sends, paced by the client; a store failing midway aborts the response."""
        # A store that fails here is a JSON error: nothing has been sent yet.
        body = await source.open_range(start, end)
        try:
            await body.deliver(request)
        except CancelledError:
            raise
        except Exception as e:
            log.warn("Aborting a response for {digest}: {why}", digest=source.digest, why=str(e))
            # Never end cleanly: the client must not take a short body as whole.
            transport = request.channel.transport if request.channel else None
            if transport is not None:
                cast(ITCPTransport, transport).abortConnection()
            return
        self._metrics.bytes_served.labels("cache").inc(body.length)
        if not request.finished and not request._disconnected:
            request.finish()

    async def _tags(self, request: RegistryRequest, route: Route, where: Upstream) -> None:
        query = {}
        for key in ("n", "last"):
            value = _first(request.args.get(key.encode("ascii")))
            if value:
                query[key] = value
        if "n" in query and not query["n"].isdigit():
            raise InvalidParameter("pagination: n must be a non-negative integer")
        tags, more = await self._cache.tags(where, query)
        if more and tags:
            following = {"n": query["n"], "last": tags[-1]} if "n" in query else {"last": tags[-1]}
            ns = _first(request.args.get(b"ns"))
            if ns:
                following["ns"] = ns
            link = f'</v2/{route.name}/tags/list?{urlencode(following)}>; rel="next"'
            request.setHeader(b"Link", link.encode("utf-8"))
        body = json.dumps({"name": route.name, "tags": tags}).encode("utf-8")
        _send_bytes(request, body, b"application/json")

    def _unexpected(self, failure: Failure, request: RegistryRequest) -> None:
        if failure.check(CancelledError):
            return
        log.failure("Unexpected error answering {path}", failure, path=request.uri)
        if not request.startedWriting and not request.finished:
            _send_error(request, Internal("internal error; see the server log"))


def _from_peer(request: RegistryRequest) -> bool:
    """Whether another replica asks, to relay what this one fetches: answered here, with the content itself."""
    return request.getHeader(PEER_HEADER) is not None


def _first(values: list[bytes] | None) -> str | None:
    return values[0].decode("utf-8", "replace") if values else None


def _send_bytes(request: IRequest, body: bytes, content_type: bytes) -> None:
    request.setHeader(b"Content-Type", content_type)
    request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
    if request.method != b"HEAD":
        request.write(body)
    request.finish()


def _send_error(request: IRequest, error: OCIError) -> None:
    answer = answer_for(error)
    request.setResponseCode(answer.status)
    for name in (b"Docker-Content-Digest", b"ETag", b"Accept-Ranges"):
        request.responseHeaders.removeHeader(name)
    for name, value in answer.headers.items():
        request.setHeader(name, value)
    _send_bytes(request, answer.body(), b"application/json")


class _RefuseTLS(ProtocolWrapper):
    """Close at once when a TLS handshake arrives on a plain HTTP port.

    Clients such as skopeo and podman with TLS verification off try HTTPS
    first; without this they wait ten seconds for a handshake that never
    comes before falling back to HTTP.
    """

    _first = True

    def dataReceived(self, data: bytes) -> None:
        if self._first:
            self._first = False
            if data[:1] == b"\x16" and self.transport is not None:
                self.transport.loseConnection()
                return
        super().dataReceived(data)


def plain_http(site: Site) -> WrappingFactory:
    """Wrap a site for a plain HTTP listener."""
    factory = WrappingFactory(site)
    factory.protocol = _RefuseTLS
    return factory


class Root(Resource):
    """The site root: /v2, and /health and /metrics where they are served."""

    def __init__(self, children: dict[bytes, Resource]) -> None:
        super().__init__()
        for name, child in children.items():
            self.putChild(name, child)

    def getChild(self, path: bytes, request: IRequest) -> Resource:
        return _NotFound()

    def render(self, request: IRequest) -> bytes:
        return _NotFound().render(request)


class Health(Resource):
    """200 when the cache can be read and written, 503 with the reason otherwise."""

    isLeaf = True

    def __init__(self, check: Callable[[], str | None]) -> None:
        super().__init__()
        self._check = check

    def render_GET(self, request: IRequest) -> bytes:
        problem = self._check()
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        if problem is not None:
            request.setResponseCode(503)
            return json.dumps({"status": "unhealthy", "problem": problem}).encode("utf-8")
        return b'{"status": "ok"}'

    render_HEAD = render_GET


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: IRequest) -> bytes:
        answer = answer_for(NotFound("not part of the registry API"))
        request.setResponseCode(answer.status)
        request.setHeader(b"Content-Type", b"application/json")
        return answer.body()
