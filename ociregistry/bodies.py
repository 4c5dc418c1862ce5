"""HTTP bodies streamed with backpressure: bytes sent as a request body, and a response
body handed to a consumer that paces the connection it arrives on."""

from __future__ import annotations

from typing import cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IDelayedCall, IProducer, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

# How much of a request body is written to the connection at a time.
SLICE = 64 * 1024
_DONE = Failure(ResponseDone())


@implementer(IBodyProducer)
class BytesBody:
    """Bytes in memory sent as a request body, in slices, as fast as the connection takes them."""

    def __init__(self, data: bytes) -> None:
        self.length = len(data)
        self._view = memoryview(data)
        self._offset = 0
        self._paused = False
        self._pumping = False
        self._consumer: IConsumer | None = None
        self._done: Deferred[None] = Deferred()

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._consumer = consumer
        self._pump()
        return self._done

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            while not self._paused and self._consumer is not None and self._offset < self.length:
                chunk = bytes(self._view[self._offset:self._offset + SLICE])
                self._offset += len(chunk)
                self._consumer.write(chunk)
        finally:
            self._pumping = False
        if self._consumer is not None and self._offset >= self.length:
            self._consumer = None
            self._done.callback(None)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        # The connection is gone; the request fails on its own, so _done never fires.
        self._consumer = None


@implementer(IPushProducer)
class Relay(Protocol):
    """Hands a response body to a consumer, which paces the connection through us.

    ``done`` fires when the body is complete, or fails with why it is not.  A
    body that stops arriving for ``idle`` seconds while the consumer is not
    the one pausing it is dropped (``stalled``), so that it can be resumed; a
    consumer that stops producing drops it too (``stopped``).
    """

    def __init__(self, consumer: IConsumer, clock: IReactorTime, idle: float) -> None:
        self.received = 0
        self.stopped = False
        self.stalled = False
        self.done: Deferred[None] = Deferred(lambda _: self._drop())
        self._consumer = consumer
        self._clock = clock
        self._idle = idle
        self._paused = False
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._consumer.registerProducer(self, True)
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self._arm()
        self._consumer.write(data)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self._disarm()
        self._consumer.unregisterProducer()
        if self.done.called:
            return
        if reason.check(ResponseDone):
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def pauseProducing(self) -> None:
        self._paused = True
        self._disarm()
        if self.transport is not None:
            _producer(self.transport).pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        self._arm()
        if self.transport is not None:
            _producer(self.transport).resumeProducing()

    def stopProducing(self) -> None:
        self.stopped = True
        self._drop()

    def _drop(self) -> None:
        self._disarm()
        if self.transport is not None:
            _producer(self.transport).stopProducing()

    def _stall(self) -> None:
        self._timer = None
        self.stalled = True
        self._drop()

    def _arm(self) -> None:
        self._disarm()
        if not self._paused:
            self._timer = self._clock.callLater(self._idle, self._stall)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


@implementer(IConsumer)
class Collector:
    """Keeps a small body in memory, in ``chunks``."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.chunks.append(data)


class _Discard(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        _producer(self.transport).stopProducing()


def discard(response: IResponse) -> None:
    """Drop a response body that will not be read (closes its connection)."""
    response.deliverBody(_Discard())


def _producer(transport: object) -> IPushProducer:
    """A response body's transport: the producer of its bytes."""
    return cast(IPushProducer, transport)
