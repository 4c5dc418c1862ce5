"""Request bodies sent as the connection takes them, and response bodies paced by their consumer."""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from zope.interface import implementer

from ociregistry.bodies import SLICE, BytesBody, Collector, Relay


@implementer(IConsumer)
class Consumer:
    """Records what it is given; pauses its producer after ``pause_after`` writes."""

    def __init__(self, pause_after: int | None = None) -> None:
        self.written: list[bytes] = []
        self.producer: IPushProducer | None = None
        self.registered = 0
        self._pause_after = pause_after

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        self.producer = producer
        self.registered += 1

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.written.append(data)
        if self._pause_after is not None and len(self.written) % self._pause_after == 0:
            assert self.producer is not None
            self.producer.pauseProducing()


class Transport:
    """The transport a response body's protocol sees: it only records what it is told."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


class BytesBodyTests(SynchronousTestCase):
    """Bytes in memory go out in slices, only while the connection wants more."""

    def test_pause_holds_the_rest(self) -> None:
        """A paused body writes nothing more until resumed, and is done after its last byte."""
        data = bytes(range(256)) * (3 * SLICE // 256 + 1)
        body = BytesBody(data)
        consumer = Consumer(pause_after=1)
        consumer.producer = body
        done = body.startProducing(consumer)
        self.assertEqual(len(consumer.written), 1)
        self.assertNoResult(done)
        while not done.called:
            body.resumeProducing()
        self.assertEqual(b"".join(consumer.written), data)
        self.assertEqual(max(map(len, consumer.written)), SLICE)
        self.assertEqual(body.length, len(data))

    def test_stopped_body_writes_no_more(self) -> None:
        """A body whose connection went away writes nothing more and never reports done."""
        body = BytesBody(b"x" * (2 * SLICE))
        consumer = Consumer(pause_after=1)
        consumer.producer = body
        done = body.startProducing(consumer)
        body.stopProducing()
        body.resumeProducing()
        self.assertEqual(len(consumer.written), 1)
        self.assertNoResult(done)


class RelayTests(SynchronousTestCase):
    """A response body reaches its consumer, which pauses the connection; a stalled one is dropped."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.consumer = Consumer()
        self.transport = Transport()
        self.relay = Relay(self.consumer, self.clock, idle=5)
        self.relay.makeConnection(self.transport)  # type: ignore[arg-type]

    def test_consumer_paces_the_connection(self) -> None:
        """The consumer's pause and resume reach the connection, and a pause is not a stall."""
        self.assertIs(self.consumer.producer, self.relay)
        self.relay.dataReceived(b"abc")
        self.relay.pauseProducing()
        self.clock.advance(60)
        self.assertFalse(self.relay.stalled)
        self.relay.resumeProducing()
        self.assertEqual(self.transport.calls, ["pause", "resume"])
        self.relay.dataReceived(b"def")
        self.relay.connectionLost(Failure(ResponseDone()))
        self.successResultOf(self.relay.done)
        self.assertEqual((b"".join(self.consumer.written), self.relay.received), (b"abcdef", 6))
        self.assertIsNone(self.consumer.producer)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_silence_is_a_stall(self) -> None:
        """A body that stops arriving while nobody paused it is dropped after the idle time."""
        self.relay.dataReceived(b"abc")
        self.clock.advance(4)
        self.relay.dataReceived(b"def")
        self.clock.advance(4)
        self.assertFalse(self.relay.stalled)
        self.clock.advance(1)
        self.assertTrue(self.relay.stalled)
        self.assertEqual(self.transport.calls, ["stop"])
        self.relay.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(self.relay.done, ConnectionLost)

    def test_consumer_stops(self) -> None:
        """A consumer that stops producing drops the body: stopped, not stalled."""
        self.relay.stopProducing()
        self.assertEqual((self.relay.stopped, self.relay.stalled), (True, False))
        self.assertEqual(self.transport.calls, ["stop"])

    def test_cancel_drops_the_body(self) -> None:
        """Cancelling the wait for a body drops its connection."""
        self.relay.done.cancel()
        self.assertEqual(self.transport.calls, ["stop"])
        self.relay.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(self.relay.done, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class CollectorTests(SynchronousTestCase):
    """A small body kept in memory."""

    def test_collects(self) -> None:
        """What is written is kept in order."""
        collector = Collector()
        collector.write(b"a")
        collector.write(b"b")
        self.assertEqual(collector.chunks, [b"a", b"b"])
