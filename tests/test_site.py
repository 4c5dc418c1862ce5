"""The site of every listener: typed requests, request deadlines, idle and unread responses, connection caps."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ociregistry.logs import access_line
from ociregistry.site import ClientLimits, LimitedChannel, LimitedSite, RegistryRequest
from ociregistry.tap import Options


class _Seen(Resource):
    """Answers every request but /slow, which it leaves open, and keeps them."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[IRequest] = []

    def render_GET(self, request: IRequest) -> bytes | int:
        self.requests.append(request)
        return NOT_DONE_YET if request.path == b"/slow" else b"ok"


class SiteTestCase(SynchronousTestCase):
    """A LimitedSite on a Clock, and connections to it over string transports."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.resource = _Seen()
        self.site = LimitedSite(self.resource, ClientLimits(header_timeout=2, idle_timeout=5, max_per_client=2),
                                reactor=self.clock)

    def connect(self, host: str = "192.0.2.1") -> tuple[LimitedChannel, StringTransport]:
        address = IPv4Address("TCP", host, 40000)
        channel = self.site.buildProtocol(address)
        assert isinstance(channel, LimitedChannel)
        transport = StringTransport(peerAddress=address)
        channel.makeConnection(transport)
        return channel, transport


class RequestTests(SiteTestCase):
    """The request class the access log and the API read."""

    def test_typed_request(self) -> None:
        """Requests are RegistryRequests with a start time, a route and a cache status; the access line shows them."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: m\r\n\r\n")
        [request] = self.resource.requests
        assert isinstance(request, RegistryRequest)
        self.assertIsNotNone(request.started)
        self.assertEqual((request.route, request.cache_status), ("other", "-"))
        request.cache_status = "hit"
        line = access_line("-", request)
        self.assertRegex(line, r"^192\.0\.2\.1 GET /v2/ 200 2 [0-9.]+ms cache=hit$")


class DeadlineTests(SiteTestCase):
    """A request must arrive whole within the header deadline."""

    def test_trickled_headers(self) -> None:
        """Bytes that keep coming do not extend the deadline: a 408, then the connection closes."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET /v2/ HTTP/1.1\r\n")
        for _ in range(3):
            self.clock.advance(0.5)
            channel.dataReceived(b"X")
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.6)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n"))
        self.assertIn(b'"code": "UNSUPPORTED"', transport.value())
        self.clock.advance(2)
        self.assertTrue(transport.disconnecting)

    def test_deadline_ends_with_the_request(self) -> None:
        """A request that arrived in time is answered however long it takes; the next one gets a fresh deadline."""
        channel, transport = self.connect()
        self.clock.advance(1.5)
        channel.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: m\r\n\r\n")
        self.clock.advance(1.9)
        channel.dataReceived(b"GET /v2/ HTTP/1.1\r\n")
        self.clock.advance(1.9)
        channel.dataReceived(b"Host: m\r\n\r\n")
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK"), 2)
        self.assertNotIn(b"408", transport.value())

    def test_idle_connection(self) -> None:
        """A connection that sends nothing is closed at the deadline too."""
        _, transport = self.connect()
        self.clock.advance(2)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408"))


class UnreadResponseTests(SiteTestCase):
    """A response the client does not read is abandoned after the idle timeout."""

    def test_paused_response(self) -> None:
        """While the transport holds the response back for longer than the idle timeout, the connection is aborted."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: m\r\n\r\n")
        channel.pauseProducing()
        self.clock.advance(4)
        channel.resumeProducing()
        channel.pauseProducing()
        self.clock.advance(4)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)


class CapTests(SiteTestCase):
    """Connections per client address."""

    def test_cap(self) -> None:
        """Past the cap a client's connection is answered 429 and closed; a closed one frees its place."""
        first, _ = self.connect()
        self.connect()
        _, refused = self.connect()
        self.assertTrue(refused.value().startswith(b"HTTP/1.1 429 Too Many Requests\r\n"))
        self.assertIn(b"Retry-After: 1\r\n", refused.value())
        _, other = self.connect("192.0.2.2")
        self.assertEqual(other.value(), b"")
        first.connectionLost(None)
        _, again = self.connect()
        self.assertEqual(again.value(), b"")


class LimitOptionsTests(SynchronousTestCase):
    """The options that set the limits."""

    def test_defaults_and_values(self) -> None:
        """30 s to send a request, 60 s idle, 256 connections per address; the options change them."""
        options = Options()
        options.parseOptions([])
        self.assertEqual(options.config.client_limits(), ClientLimits(30.0, 60.0, 256))
        options = Options()
        options.parseOptions(["--client-header-timeout", "2s", "--client-idle-timeout", "1m",
                              "--client-max-connections", "8"])
        self.assertEqual(options.config.client_limits(), ClientLimits(2.0, 60.0, 8))

    def test_invalid(self) -> None:
        """A cap that is not a positive whole number, or a timeout that is not a duration, is a usage error."""
        for args in (["--client-max-connections", "0"], ["--client-max-connections", "many"],
                     ["--client-header-timeout", "soon"], ["--client-idle-timeout", "0"]):
            with self.assertRaises(usage.UsageError, msg=str(args)):
                Options().parseOptions(args)
