"""The HTTP server side of every listener: typed requests, and limits on what a client may send and hold.

A client must send its request within a deadline, may stay idle (or leave a
response unread) only so long, and may hold only so many connections from
one address.  A request too large or malformed to serve is answered (414,
431, 400, 408, 429, with an OCI error body) before the connection closes,
rather than dropped without a word.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from http import HTTPStatus
from typing import cast

from twisted.internet import tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IConsumer, IDelayedCall, IReactorTime, ISSLTransport, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IAccessLogFormatter
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from ociregistry.errors import (
    BadRequest,
    HeadersTooLarge,
    OCIError,
    RequestTimeout,
    TooManyConnections,
    URITooLong,
    answer_for,
)

log = Logger()

# A refused request's connection keeps reading (and dropping) what the client still sends
# for this long, so that the client reads our answer instead of a connection reset.
_LINGER_SECONDS = 2.0


@dataclass(frozen=True)
class ClientLimits:
    """What one client connection may take.

    ``header_timeout``: seconds to send a whole request (line, headers, body);
    ``idle_timeout``: seconds a connection may wait for the next request, or
    leave a response unread; ``max_per_client``: connections open at once
    from one address.
    """

    header_timeout: float = 30.0
    idle_timeout: float = 60.0
    max_per_client: int = 256


class RegistryRequest(Request):
    """A request, with what the access log and the metrics read about it."""

    started: float | None = None
    """When the whole request had arrived (monotonic seconds)."""
    route: str = "other"
    """Which part of the API answered: base, manifest, blob, tag or other."""
    cache_status: str = "-"
    """Where a pull was served from: hit, miss, stale, ..."""

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self.started = time.monotonic()
        super().requestReceived(command, path, version)


class LimitedChannel(HTTPChannel):
    """An HTTP/1.1 connection that keeps to its site's `ClientLimits`."""

    site: LimitedSite
    _peer: str | None = None
    _deadline: IDelayedCall | None = None
    _stall: IDelayedCall | None = None
    _linger: IDelayedCall | None = None
    _refused = False
    # Whether the current request's first line has arrived, and its method (for HEAD answers).
    _in_head = False
    _method = b""

    @property
    def _connection(self) -> ITCPTransport:
        """The connected transport: TCP, or TLS over TCP."""
        assert self.transport is not None, "used only while connected"
        return cast(ITCPTransport, self.transport)

    def connectionMade(self) -> None:
        super().connectionMade()
        peer = self._connection.getPeer()
        host = peer.host if isinstance(peer, (IPv4Address, IPv6Address)) else "local"
        if not self.site.admit(host):
            self._refuse(TooManyConnections(f"too many connections from {host}", retry_after=1))
            return
        self._peer = host
        self._start_deadline()

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._deadline is None and not self._handlingRequest:
            self._start_deadline()
        super().dataReceived(data)

    def rawDataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().rawDataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._refuse_oversized()
            return
        if line and not self._in_head:
            self._in_head = True
            self._method = line.split(b" ", 1)[0]
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if not self._in_head:
            self._method = line.split(b" ", 1)[0]
        self._refuse_oversized()

    def headerReceived(self, line: bytes) -> bool:
        if self._refused:
            return False
        if self._receivedHeaderCount >= self.maxHeaders:
            self._refuse(HeadersTooLarge(f"more than {self.maxHeaders} header fields"))
            return False
        ok: bool = super().headerReceived(line)
        return ok

    def allContentReceived(self) -> None:
        self._cancel(self._deadline)
        self._deadline = None
        self._in_head = False
        super().allContentReceived()

    def _respondToBadRequestAndDisconnect(self) -> None:
        self._refuse(BadRequest("malformed HTTP request"))

    def pauseProducing(self) -> None:
        super().pauseProducing()
        # The client is not reading our response: it may leave it unread only as long as it may idle.
        if self._handlingRequest and self._stall is None:
            self._stall = self.callLater(self.site.limits.idle_timeout, self._stalled)

    def resumeProducing(self) -> None:
        self._cancel(self._stall)
        self._stall = None
        super().resumeProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        for call in (self._deadline, self._stall, self._linger):
            self._cancel(call)
        self._deadline = self._stall = self._linger = None
        if self._peer is not None:
            self.site.release(self._peer)
            self._peer = None
        super().connectionLost(reason)

    def _start_deadline(self) -> None:
        self._deadline = self.callLater(self.site.limits.header_timeout, self._too_slow)

    def _too_slow(self) -> None:
        self._deadline = None
        log.info("Closing a connection from {peer}: no whole request in {seconds:g} s",
                 peer=self._peer, seconds=self.site.limits.header_timeout)
        self._refuse(RequestTimeout(f"the request did not arrive within {self.site.limits.header_timeout:g} s"))

    def _stalled(self) -> None:
        self._stall = None
        log.info("Closing a connection from {peer}: the response was left unread for {seconds:g} s",
                 peer=self._peer, seconds=self.site.limits.idle_timeout)
        self._connection.abortConnection()

    def _refuse_oversized(self) -> None:
        limit = self.totalHeadersSize
        if self._in_head:
            self._refuse(HeadersTooLarge(f"the request's header fields exceed {limit} bytes"))
        else:
            self._refuse(URITooLong(f"the request line exceeds {limit} bytes"))

    def _refuse(self, error: OCIError) -> None:
        """Answer a request we will not serve, then close, after dropping what the client still sends."""
        self._refused = True
        self._cancel(self._deadline)
        self._deadline = None
        self.setTimeout(None)
        self.setRawMode()
        answer = answer_for(error)
        body = answer.body()
        reason = HTTPStatus(answer.status).phrase.encode("ascii")
        headers = {b"Content-Type": b"application/json", b"Content-Length": str(len(body)).encode("ascii"),
                   b"Connection": b"close", **answer.headers}
        head = b"HTTP/1.1 %d %s\r\n" % (answer.status, reason)
        head += b"".join(b"%s: %s\r\n" % item for item in headers.items())
        # What the client still sends is dropped, so no backpressure is wanted; and TLS, holding
        # an answer written before its handshake, would pause our reading and so the handshake.
        # The network producer is the transport, or Twisted's stand-in with the same methods.
        cast(IConsumer, self._networkProducer).unregisterProducer()
        self._networkProducer.resumeProducing()
        self._connection.write(head + b"\r\n" + (b"" if self._method == b"HEAD" else body))
        connection = plain_tcp(self.transport)
        if connection is not None:
            # The end of our answer is the end of the connection, for clients that read until then.
            # (TLS has no half-close: there the client closes, or the linger ends it.)
            connection.loseWriteConnection()
        self._linger = self.callLater(_LINGER_SECONDS, self._connection.abortConnection)

    @staticmethod
    def _cancel(call: IDelayedCall | None) -> None:
        if call is not None and call.active():
            call.cancel()


def plain_tcp(transport: object) -> tcp.Connection | None:
    """The TCP connection under a transport, looking through wrappers, or None when TLS is on the way."""
    while isinstance(transport, ProtocolWrapper) and not isinstance(transport, TLSMemoryBIOProtocol):
        transport = transport.transport
    if isinstance(transport, tcp.Connection) and not ISSLTransport.providedBy(transport):
        return transport
    return None


class LimitedSite(Site):
    """The site of a listener: `RegistryRequest`s over `LimitedChannel`s, connections counted per address."""

    protocol = LimitedChannel  # type: ignore[assignment]
    requestFactory = RegistryRequest
    displayTracebacks = False

    def __init__(self, resource: Resource, limits: ClientLimits, *,
                 logFormatter: IAccessLogFormatter | None = None, reactor: IReactorTime | None = None) -> None:
        super().__init__(resource, RegistryRequest, timeout=limits.idle_timeout, logFormatter=logFormatter,
                         reactor=reactor)
        self.limits = limits
        self._connections: Counter[str] = Counter()

    def admit(self, host: str) -> bool:
        """Count a new connection from an address, unless the address has all it may have."""
        if self._connections[host] >= self.limits.max_per_client:
            return False
        self._connections[host] += 1
        return True

    def release(self, host: str) -> None:
        """Forget a connection that has closed."""
        self._connections[host] -= 1
        if self._connections[host] <= 0:
            del self._connections[host]
