"""Every way an upstream can fail ends in an answer within the configured timeouts.

The timing is checked on a MemoryReactorClock, with the upstream's end of each
connection driven by hand; the answers clients get are checked through our
site in front of fake upstreams on loopback.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Awaitable, Callable

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase
from twisted.internet.defer import TimeoutError
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from ociregistry.allowlist import Allowlist
from ociregistry.config import RegistrySettings
from ociregistry.errors import OCIError
from ociregistry.tap import Options
from ociregistry.transport import parse_rate
from ociregistry.upstream import Upstream
from tests.fakes import Behaviour, FakeRegistry, digest_of, make_image
from tests.realparts import free_port, make_ca
from tests.test_pull import ServerTestCase

REGISTRY = "127.0.0.1:5000"
DIGEST = "sha256:" + "a" * 64


class _Transport(StringTransportWithDisconnection):
    """Like a real transport, an abort reports the lost connection later, not from inside the call."""

    def __init__(self, clock: MemoryReactorClock) -> None:
        super().__init__()
        self._clock = clock

    def abortConnection(self) -> None:
        self._clock.callLater(0, self.loseConnection)


class Peer:
    """The upstream's end of one connection the client opened on the memory reactor."""

    def __init__(self, clock: MemoryReactorClock, factory: Any, host: str, port: int) -> None:
        self._factory = factory
        self.protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        self.transport = _Transport(clock)
        self.transport.protocol = self.protocol

    def accept(self) -> None:
        """The upstream accepts the connection."""
        self.protocol.makeConnection(self.transport)

    def refuse(self) -> None:
        """The upstream refuses the connection."""
        self._factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))

    def send(self, data: bytes) -> None:
        """Bytes from the upstream to the client."""
        if self.transport.connected:
            self.protocol.dataReceived(data)

    def reset(self) -> None:
        """The upstream resets the connection."""
        self.transport.connected = False
        self.protocol.connectionLost(Failure(ConnectionLost("Connection reset by peer")))


class Wire:
    """Hands each connection an Upstream opens to a function playing the upstream."""

    def __init__(self, clock: MemoryReactorClock, upstream: Callable[[Peer], Peer | None]) -> None:
        self.clock = clock
        self.upstream = upstream
        self.peers: list[Peer | None] = []

    def step(self) -> None:
        """Answer the connections opened since the last step."""
        while len(self.peers) < len(self.clock.tcpClients):
            host, port, factory, _, _ = self.clock.tcpClients[len(self.peers)]
            self.peers.append(self.upstream(Peer(self.clock, factory, host, port)))

    def run(self, work: Awaitable[Any], limit: float = 120.0, tick: float = 0.125,
            during: Callable[[float], None] = lambda now: None) -> tuple[float, Any]:
        """Advance the clock until ``work`` is done: (when, result or Failure)."""
        done: list[Any] = []
        d = Deferred.fromCoroutine(work)  # type: ignore[arg-type]
        d.addBoth(done.append)
        started = self.clock.seconds()
        while not done and self.clock.seconds() - started < limit:
            self.step()
            during(self.clock.seconds() - started)
            self.clock.advance(tick)
        self.step()
        return round(self.clock.seconds() - started, 3), done[0] if done else None


def silent(peer: Peer) -> Peer:
    """Accept, read the request, never answer."""
    peer.accept()
    return peer


def refusing(peer: Peer) -> None:
    peer.refuse()


def resetting(peer: Peer) -> None:
    peer.accept()
    peer.reset()


def make_upstream(clock: MemoryReactorClock, **options: Any) -> Upstream:
    allowlist = Allowlist(clock, lambda host: succeed(["127.0.0.1"]), [REGISTRY])
    settings = dict(response_timeout=5.0, idle_timeout=10.0, retries=2, backoff=0.5)
    settings.update(options)
    return Upstream(clock, [RegistrySettings(name=REGISTRY, scheme="http")], allowlist, **settings)


# Each request that waits for an answer from the registry, as the cache makes them.
OPERATIONS: dict[str, Callable[[Upstream], Awaitable[Any]]] = {
    "manifest by tag": lambda u: u.manifest_digest(REGISTRY, "app", "v1"),
    "manifest by digest": lambda u: u.fetch_manifest(REGISTRY, "app", DIGEST),
    "blob HEAD": lambda u: u.head_blob(REGISTRY, "app", DIGEST),
    "blob GET": lambda u: u.open_blob(REGISTRY, "app", DIGEST),
    "tags/list": lambda u: u.list_tags(REGISTRY, "app", {}),
}

# Three attempts of 5 s, with pauses of 0.5 s and 1 s between them.
SILENT_BOUND = 3 * 5.0 + 0.5 + 1.0


class AnswerTimeoutTests(SynchronousTestCase):
    """Before the headers: the answer timeout, retries with backoff, and real cancellation."""

    def assert_error(self, result: Any, status: int, fragment: str) -> OCIError:
        self.assertIsInstance(result, Failure)
        self.assertTrue(result.check(OCIError), result)
        error = result.value
        self.assertEqual(error.status, status, error)
        self.assertIn(fragment, error.message)
        return error

    def test_silent_upstream_is_504_after_retries(self) -> None:
        """A silent upstream is a 504 after three answer timeouts and the backoff between them, for every request."""
        for name, operation in OPERATIONS.items():
            clock = MemoryReactorClock()
            wire = Wire(clock, silent)
            when, result = wire.run(operation(make_upstream(clock)))
            self.assert_error(result, 504, "did not answer in 5 s")
            self.assertAlmostEqual(when, SILENT_BOUND, delta=0.15, msg=name)
            self.assertEqual(len(wire.peers), 3, name)

    def test_trickled_headers_are_bounded(self) -> None:
        """Headers trickled a byte a second do not reset the answer timeout."""
        clock = MemoryReactorClock()
        wire = Wire(clock, silent)
        answer = b"HTTP/1.1 200 OK\r\nX-Padding: " + b"x" * 1000 + b"\r\n\r\n"
        sent: dict[int, tuple[int, int]] = {}

        def trickle(now: float) -> None:
            for number, peer in enumerate(wire.peers):
                second, offset = sent.setdefault(number, (int(now) - 1, 0))
                if peer is not None and second < int(now):
                    sent[number] = (int(now), offset + 1)
                    peer.send(answer[offset:offset + 1])

        when, result = wire.run(make_upstream(clock).manifest_digest(REGISTRY, "app", "v1"), during=trickle)
        self.assert_error(result, 504, "did not answer")
        self.assertAlmostEqual(when, SILENT_BOUND, delta=0.15)

    def test_cancel_is_not_a_timeout(self) -> None:
        """Cancelling a request (a client gone, shutdown) is a cancellation: no retry, no error answer."""
        clock = MemoryReactorClock()
        wire = Wire(clock, silent)
        upstream = make_upstream(clock)
        d = Deferred.fromCoroutine(upstream.manifest_digest(REGISTRY, "app", "v1"))
        clock.advance(2)
        wire.step()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        clock.advance(30)
        wire.step()
        self.assertEqual(len(wire.peers), 1)

    def test_shutdown_during_backoff_is_an_answer(self) -> None:
        """A request waiting to be retried when shutdown begins fails with a 503, not a cancellation."""
        clock = MemoryReactorClock()
        wire = Wire(clock, refusing)
        upstream = make_upstream(clock)
        d = Deferred.fromCoroutine(upstream.manifest_digest(REGISTRY, "app", "v1"))
        for _ in range(5):
            wire.step()
            clock.advance(0.125)
        self.assertEqual(len(wire.peers), 1)
        upstream.stop_retrying()
        failure = self.failureResultOf(d, OCIError)
        self.assertEqual(failure.value.status, 503)
        self.assertIn("shutting down", failure.value.message)

    def test_refused_is_502_after_retries(self) -> None:
        """Refused connections are retried with backoff, then a 502 naming the upstream."""
        clock = MemoryReactorClock()
        wire = Wire(clock, refusing)
        when, result = wire.run(make_upstream(clock).manifest_digest(REGISTRY, "app", "v1"))
        self.assert_error(result, 502, f"upstream {REGISTRY} unreachable")
        # The backoff, and the endpoint's own short wait before it gives up on an address.
        self.assertTrue(1.5 <= when <= 3.0, when)
        self.assertEqual(len(wire.peers), 3)

    def test_reset_is_502_after_retries(self) -> None:
        """A connection reset before the headers is retried, then a 502."""
        clock = MemoryReactorClock()
        wire = Wire(clock, resetting)
        when, result = wire.run(make_upstream(clock).head_blob(REGISTRY, "app", DIGEST))
        self.assert_error(result, 502, "unreachable")
        self.assertTrue(1.5 <= when <= 3.0, when)
        self.assertEqual(len(wire.peers), 3)


def answering(head: bytes, body: bytes = b"") -> Callable[[Any], Peer]:
    """An upstream that answers with these headers and body bytes at once."""
    def upstream(peer: Peer) -> Peer:
        peer.accept()
        peer.send(head + body)
        return peer
    return upstream


class RedirectTests(SynchronousTestCase):
    """Redirects are followed without holding their own bodies in memory."""

    def test_redirect_body_dropped(self) -> None:
        """A redirect answer with an endless body is followed at once; its body is dropped and its connection cut."""
        clock = MemoryReactorClock()
        head = (b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:5000/storage/blob\r\n"
                b"Content-Length: 100000000\r\n\r\n")
        answers = iter([head, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nblob!"])

        def upstream(peer: Peer) -> Peer:
            peer.accept()
            peer.send(next(answers))
            return peer

        wire = Wire(clock, upstream)
        redirected = wire.peers

        def flood(now: float) -> None:
            if redirected and redirected[0] is not None and redirected[0].transport.producerState != "stopped":
                redirected[0].send(b"x" * 100_000)

        when, result = wire.run(make_upstream(clock).open_blob(REGISTRY, "app", DIGEST), during=flood)
        self.assertEqual(result.code, 200)
        self.assertEqual(len(wire.peers), 2)
        self.assertEqual(wire.peers[0].transport.producerState, "stopped")
        self.assertTrue(wire.peers[1].transport.value().startswith(b"GET /storage/blob "))


class BodyTests(SynchronousTestCase):
    """After the headers: the idle timeout and the minimum rate."""

    def collect(self, upstream: Upstream) -> Callable[[], Awaitable[bytes]]:
        async def read() -> bytes:
            response = await upstream.open_blob(REGISTRY, "app", DIGEST)
            chunks: list[bytes] = []
            await upstream.read_body(response, chunks.append, REGISTRY)
            return b"".join(chunks)
        return read

    def test_silent_mid_body_is_abandoned(self) -> None:
        """A body that stops is abandoned after the idle timeout, not retried (a client may have bytes)."""
        clock = MemoryReactorClock()
        wire = Wire(clock, answering(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", b"x" * 100))
        when, result = wire.run(self.collect(make_upstream(clock))())
        self.assertTrue(isinstance(result, Failure) and result.check(OCIError), result)
        self.assertEqual(result.value.status, 504)
        self.assertIn("stalled for 10 s", result.value.message)
        self.assertAlmostEqual(when, 10.0, delta=0.15)
        self.assertEqual(len(wire.peers), 1)

    def test_reset_mid_body(self) -> None:
        """A body cut off by a reset fails at once with a 502."""
        clock = MemoryReactorClock()
        wire = Wire(clock, answering(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", b"x" * 100))

        def reset(now: float) -> None:
            if now > 1 and wire.peers[0] is not None and wire.peers[0].transport.connected:
                wire.peers[0].reset()

        when, result = wire.run(self.collect(make_upstream(clock))(), during=reset)
        self.assertTrue(isinstance(result, Failure) and result.check(OCIError), result)
        self.assertEqual(result.value.status, 502)
        self.assertIn("broke off", result.value.message)
        self.assertLess(when, 1.5)

    def trickle(self, rate: int, **options: Any) -> tuple[float, Any]:
        """A 100 KB body sent at ``rate`` bytes per second, every byte well inside the idle timeout."""
        clock = MemoryReactorClock()
        size = 100_000
        wire = Wire(clock, answering(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode()))
        sent = [0]

        def send(now: float) -> None:
            due = min(size, int(now * rate))
            if wire.peers and wire.peers[0] is not None and due > sent[0]:
                wire.peers[0].send(b"x" * (due - sent[0]))
                sent[0] = due

        return wire.run(self.collect(make_upstream(clock, **options))(), limit=600, during=send)

    def test_trickle_below_minimum_rate_is_abandoned(self) -> None:
        """A body trickled below the minimum rate is abandoned at the end of the window, however steady."""
        when, result = self.trickle(100, min_rate=1024, rate_window=30)
        self.assertTrue(isinstance(result, Failure) and result.check(OCIError), result)
        self.assertEqual(result.value.status, 504)
        self.assertIn("below the minimum rate of 1024 bytes/s", result.value.message)
        self.assertAlmostEqual(when, 30.0, delta=0.15)

    def test_default_minimum_rate(self) -> None:
        """By default a body must average 1 KiB/s over 30 s."""
        when, result = self.trickle(1000)
        self.assertTrue(isinstance(result, Failure) and result.check(OCIError), result)
        self.assertAlmostEqual(when, 30.0, delta=0.15)

    def test_slow_but_steady_completes(self) -> None:
        """A body above the minimum rate completes, however long it takes."""
        when, result = self.trickle(2048, min_rate=1024, rate_window=30)
        self.assertEqual(result, b"x" * 100_000)
        self.assertGreater(when, 45)

    def test_minimum_rate_off(self) -> None:
        """A minimum rate of 0 leaves only the idle timeout."""
        when, result = self.trickle(500, min_rate=0)
        self.assertEqual(result, b"x" * 100_000)
        self.assertGreater(when, 190)


class RateOptionTests(SynchronousTestCase):
    """The minimum rate as users write it."""

    def test_parse(self) -> None:
        """SIZE/DURATION, a size alone (over 30 s), and 0 to turn it off."""
        self.assertEqual(parse_rate("1KiB/30s"), (1024.0, 30.0))
        self.assertEqual(parse_rate("10M/1m"), (10 * 1024 * 1024.0, 60.0))
        self.assertEqual(parse_rate("512"), (512.0, 30.0))
        self.assertEqual(parse_rate("0"), (0.0, 30.0))
        for bad in ("fast", "1KiB/", "1KiB/0", "-1/30s"):
            self.assertRaises(ValueError, parse_rate, bad)

    def test_option(self) -> None:
        """--min-rate reaches the configuration; its default is 1 KiB/s over 30 s."""
        for given, expected in ((None, (1024.0, 30.0)), ("4KiB/10s", (4096.0, 10.0)), ("0", (0.0, 30.0))):
            options = Options()
            options.parseOptions(["--image-path", "/tmp/x"] + (["--min-rate", given] if given else []))
            self.assertEqual((options.config.min_rate, options.config.rate_window), expected)
        self.assertRaises(UsageError, Options().parseOptions, ["--image-path", "/tmp/x", "--min-rate", "slow"])


class _Silent(Factory):
    """Accepts connections, reads what comes, never answers."""

    protocol = Protocol


class _Resetting(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.abortConnection()


def timed(test: Any, request: Awaitable[Any], limit: float) -> Awaitable[tuple[float, Any]]:
    """A request's outcome and how long it took; fails the test if there is no answer within ``limit``."""
    async def run() -> tuple[float, Any]:
        started = time.monotonic()
        d = Deferred.fromCoroutine(request)  # type: ignore[arg-type]
        d.addTimeout(limit, reactor)
        try:
            outcome = await d
        except Exception as e:
            outcome = e
        return time.monotonic() - started, outcome
    return run()


class AnswerTests(ServerTestCase):
    """What clients get when the upstream fails: a JSON error or the cached tag, in bounded time."""

    # 0.3 s answer timeout, three attempts, 0.5 s + 1 s backoff.
    BOUND = 3 * 0.3 + 1.5

    async def listen(self, factory: Factory) -> str:
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        return f"127.0.0.1:{port.getHost().port}"

    async def start_with(self, *names: str, **config: Any) -> None:
        registries = tuple(RegistrySettings(name=name, scheme="http") for name in names)
        await self.start(registries=registries, **{"pull_timeout": 0.3, **config})

    def assert_json(self, outcome: Any, status: int) -> dict[str, Any]:
        self.assertIsInstance(outcome, tuple, repr(outcome))
        response, body = outcome
        self.assertEqual(response.code, status, body)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        error: dict[str, Any] = json.loads(body)["errors"][0]
        return error

    async def test_silent_upstream_is_504(self) -> None:
        """Manifests by tag and digest, blob HEAD and GET, and tags/list: 504 JSON after the timeout and retries."""
        name = await self.listen(_Silent())
        await self.start_with(name)
        paths = {
            "manifest by tag": ("GET", "/v2/app/manifests/v1"),
            "manifest HEAD": ("HEAD", "/v2/app/manifests/v1"),
            "manifest by digest": ("GET", f"/v2/app/manifests/{DIGEST}"),
            "blob HEAD": ("HEAD", f"/v2/app/blobs/{DIGEST}"),
            "blob GET": ("GET", f"/v2/app/blobs/sha256:{'b' * 64}"),
            "tags/list": ("GET", "/v2/app/tags/list"),
        }
        requests = {what: timed(self, self.get(f"{path}?ns={name}", method=method), 10)
                    for what, (method, path) in paths.items()}
        for what, request in requests.items():
            took, outcome = await request
            self.assertIsInstance(outcome, tuple, f"{what}: {outcome!r}")
            response, body = outcome
            self.assertEqual(response.code, 504, what)
            if paths[what][0] == "GET":
                self.assertIn("did not answer in 0.3 s", json.loads(body)["errors"][0]["message"], what)
            self.assertLess(took, self.BOUND + 1.5, what)
            self.assertGreater(took, self.BOUND - 0.2, what)

    async def test_cached_tag_served_stale_when_silent(self) -> None:
        """A cached tag whose upstream goes silent is served from the cache once the recheck times out."""
        await self.start(pull_timeout=0.3, tag_ttl=0)
        image = make_image(b"cached")
        self.upstream.add_image("app", "v1", image)
        _, body = await self.get("/v2/app/manifests/v1")
        self.assertEqual(body, image.manifest)
        self.upstream.render = lambda request: NOT_DONE_YET  # type: ignore[method-assign]
        took, outcome = await timed(self, self.get("/v2/app/manifests/v1"), 10)
        self.assertIsInstance(outcome, tuple, repr(outcome))
        self.assertEqual((outcome[0].code, outcome[1]), (200, image.manifest))
        self.assertLess(took, self.BOUND + 1.5)

    async def test_refused_and_reset_are_502(self) -> None:
        """An upstream refusing or resetting connections is a 502 JSON error after the retries."""
        reset = await self.listen(Factory.forProtocol(_Resetting))
        refused = f"127.0.0.1:{free_port()}"
        # Twisted's HostnameEndpoint reports a refused connection some 0.3 s late.
        await self.start_with(reset, refused, pull_timeout=2)
        for name in (reset, refused):
            took, outcome = await timed(self, self.get(f"/v2/app/manifests/v1?ns={name}"), 10)
            error = self.assert_json(outcome, 502)
            self.assertIn(name, error["message"])
            self.assertLess(took, 1.5 + 1.5)

    async def test_untrusted_certificate_says_tls(self) -> None:
        """An upstream whose certificate is not trusted is a 502 saying TLS failed, at once: retrying cannot help."""
        ca = make_ca(self.mktemp(), "unknown")
        cert, key = ca.issue_server("127.0.0.1")
        with open(cert, "rb") as c, open(key, "rb") as k:
            options = PrivateCertificate.loadPEM(c.read() + b"\n" + k.read()).options()
        name = await self.listen(TLSMemoryBIOFactory(options, False, Site(FakeRegistry())))
        await self.start(registries=(RegistrySettings(name=name),))
        took, outcome = await timed(self, self.get(f"/v2/app/manifests/v1?ns={name}"), 10)
        error = self.assert_json(outcome, 502)
        self.assertEqual(error["message"], f"TLS to upstream {name} failed: certificate verify failed")
        self.assertLess(took, 0.5)

    async def test_trickled_manifest_is_504(self) -> None:
        """A manifest trickled below the minimum rate is a 504 JSON error, not a wait for ever."""
        name = await self.listen(Site(_Trickle(64 * 1024)))
        await self.start_with(name, pull_timeout=5, min_rate=1024, rate_window=0.5)
        took, outcome = await timed(self, self.get(f"/v2/app/manifests/v1?ns={name}"), 10)
        error = self.assert_json(outcome, 504)
        self.assertIn("below the minimum rate", error["message"])
        self.assertLess(took, 1.5)

    async def test_manifest_silent_mid_body_is_504(self) -> None:
        """A manifest whose body stops half-way is a 504 JSON error once the idle timeout passes."""
        name = await self.listen(Site(_Trickle(1000, stop=100)))
        await self.start_with(name, pull_timeout=5, idle_timeout=0.5)
        took, outcome = await timed(self, self.get(f"/v2/app/manifests/v1?ns={name}"), 10)
        error = self.assert_json(outcome, 504)
        self.assertIn("stalled for 0.5 s", error["message"])
        self.assertLess(took, 1.5)

    async def test_trickled_blob_is_cut_off(self) -> None:
        """A blob trickled below the minimum rate is abandoned: the client's body is cut off, nothing is cached."""
        await self.start(pull_timeout=5, min_rate=1024, rate_window=0.5)
        content = os.urandom(64 * 1024)
        digest = digest_of(content)
        self.upstream.blobs[digest] = content
        self.upstream.behaviour[digest] = Behaviour(chunk=10, delay=0.05)
        took, outcome = await timed(self, self.get(f"/v2/app/blobs/{digest}"), 10)
        # The headers went out when the download began: the client sees the body end early.
        self.assertIsInstance(outcome, Exception)
        self.assertNotIsInstance(outcome, TimeoutError)
        self.assertLess(took, 1.5)
        self.assertIsNone(self.index.blob_size(digest))
        self.assertEqual(os.listdir(os.path.join(self.image_path, "tmp")), [])


class _Trickle(Resource):
    """Answers every request with a body of ``size`` bytes, ten bytes every 50 ms; silent after ``stop``."""

    isLeaf = True

    def __init__(self, size: int, stop: int | None = None) -> None:
        super().__init__()
        self.size = size
        self.stop = size if stop is None else stop

    def render(self, request: Any) -> Any:
        request.setHeader(b"Content-Type", b"application/vnd.oci.image.manifest.v1+json")
        request.setHeader(b"Content-Length", str(self.size).encode())
        if request.method == b"HEAD":
            return b""
        pending: list[Any] = []
        request.notifyFinish().addErrback(lambda _: [call.cancel() for call in pending if call.active()])
        self._more(request, 0, pending)
        return NOT_DONE_YET

    def _more(self, request: Any, sent: int, pending: list[Any]) -> None:
        if request._disconnected or sent >= self.stop:
            return
        request.write(b" " * min(10, self.stop - sent))
        pending[:] = [reactor.callLater(0.05, self._more, request, sent + 10, pending)]
