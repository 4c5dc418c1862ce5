"""The admin listener holds its clients to the limits of every other listener."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from ociregistry.admin import admin_site, make_admin_service
from ociregistry.site import ClientLimits, LimitedSite
from tests.test_prune import CacheContent


class AdminLimitTests(SynchronousTestCase):
    """The admin site over string transports, on a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.cache = CacheContent(self.mktemp(), self.clock)
        self.addCleanup(self.cache.server.close)
        self.limits = ClientLimits(header_timeout=2, idle_timeout=5, max_per_client=1)
        self.site = admin_site(self.cache.server, self.cache.root, self.clock, lambda: None, limits=self.limits)

    def connect(self, host: str = "127.0.21.1") -> tuple[IProtocol, StringTransport]:
        address = IPv4Address("TCP", host, 40000)
        channel = self.site.buildProtocol(address)
        assert channel is not None
        transport = StringTransport(peerAddress=address)
        channel.makeConnection(transport)
        return channel, transport

    def test_oversized_header(self) -> None:
        """A header larger than the limit is answered 431 with an OCI error body, and the request never runs."""
        channel, transport = self.connect()
        channel.dataReceived(b"POST /cmd/stop HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"x" * 70_000 + b"\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "), transport.value()[:80])
        self.assertIn(b'"code": "UNSUPPORTED"', transport.value())

    def test_header_deadline_and_cap(self) -> None:
        """A request that does not arrive in time is a 408; past the cap, a client's connection is a 429."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET /cmd/list HTTP/1.1\r\n")
        _, refused = self.connect()
        self.assertTrue(refused.value().startswith(b"HTTP/1.1 429 "), refused.value()[:80])
        self.clock.advance(2.1)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "), transport.value()[:80])

    def test_service_passes_limits(self) -> None:
        """The admin service's listener is a LimitedSite with the limits it was given (the defaults without)."""
        given = make_admin_service(self.cache.server, self.cache.root, "tcp:0:interface=127.0.21.1", reactor,
                                   lambda: None, limits=self.limits)
        default = make_admin_service(self.cache.server, self.cache.root, "tcp:0:interface=127.0.21.1", reactor,
                                     lambda: None)
        for service, limits in ((given, self.limits), (default, ClientLimits())):
            assert isinstance(service.factory, LimitedSite)
            self.assertEqual(service.factory.limits, limits)
