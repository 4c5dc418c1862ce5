"""Clients that abort a large cached blob halfway leave the server's memory where it was."""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.python.failure import Failure

from tests.fakes import FakeRegistry, digest_of, listen
from tests.realparts import (
    MIB,
    Server,
    WebClient,
    WorkspaceTestCase,
    free_port,
    make_ca,
    peak_rss_bytes,
    rss_bytes,
    start_server,
)

BLOB_SIZE = 16 * MIB
READ_BEFORE_ABORT = 8 * MIB
CLIENTS = 500
GROWTH_LIMIT = 100 * MIB


def open_files(pid: int) -> int:
    """How many file descriptors a process has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


class _AbortHalfway(Protocol):
    """Asks for a blob, reads part of it, and aborts the connection."""

    def __init__(self, request: bytes, limit: int) -> None:
        self._request = request
        self._limit = limit
        self.received = 0
        self.done: Deferred[int] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.received >= self._limit:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.done.callback(self.received)


async def abort_halfway(endpoint: IStreamClientEndpoint, path: str, limit: int) -> int:
    """One client: the bytes it read before aborting (or before the server closed)."""
    request = f"GET {path} HTTP/1.1\r\nHost: mirror.test\r\n\r\n".encode("ascii")
    client = _AbortHalfway(request, limit)
    await connectProtocol(endpoint, client)
    return await client.done


class AbortMemoryTests(WorkspaceTestCase):
    """Memory held for clients that go away mid-blob."""

    async def abort_many(self, server: Server, endpoint: IStreamClientEndpoint, at_once: int) -> None:
        """Cache a blob, let CLIENTS clients read half of it and abort, and check the server's RSS and files."""
        web = WebClient()
        self.addCleanup(web.close)
        response = await web.client.get(server.url + self.blob_path)
        self.assertEqual((response.code, len(await response.content())), (200, BLOB_SIZE))
        assert server.pid is not None
        before, descriptors = rss_bytes(server.pid), open_files(server.pid)
        read: list[int] = []
        for _ in range(CLIENTS // at_once):
            read += await gatherResults([
                Deferred.fromCoroutine(abort_halfway(endpoint, self.blob_path, READ_BEFORE_ABORT))
                for _ in range(at_once)])
        self.assertTrue(all(r >= READ_BEFORE_ABORT for r in read), "a client got less than it asked to read")
        response = await web.client.get(server.url + self.blob_path)
        self.assertEqual((response.code, len(await response.content())), (200, BLOB_SIZE))
        after, peak = rss_bytes(server.pid), peak_rss_bytes(server.pid)
        figures = f"RSS {before / MIB:.0f} MiB before, {after / MIB:.0f} MiB after, peak {peak / MIB:.0f} MiB"
        self.assertLess(after - before, GROWTH_LIMIT, figures)
        self.assertLess(peak - before, GROWTH_LIMIT, figures)
        self.assertLessEqual(open_files(server.pid), descriptors + 2, "file descriptors left open")

    async def start(self, *args: str) -> Server:
        upstream = FakeRegistry()
        port, listening = await listen(upstream)
        self.addCleanup(listening.stopListening)
        registry = f"127.0.0.1:{port}"
        blob = os.urandom(BLOB_SIZE)
        upstream.blobs[digest_of(blob)] = blob
        self.blob_path = f"/v2/app/blobs/{digest_of(blob)}?ns={registry}"
        # Every client comes from 127.0.0.1: let it hold them all at once, beside the
        # kept-alive connection that checks the blob before and after.
        return await start_server(self.path("cache"), test=self, args=(
            "--config-file", self.config([{"name": registry, "scheme": "http"}]),
            "--client-max-connections", str(CLIENTS + 1), *args))

    async def test_plain_http(self) -> None:
        """500 clients at once reading 8 MiB of a cached 16 MiB blob and aborting grow RSS by under 100 MiB."""
        server = await self.start()
        await self.abort_many(server, TCP4ClientEndpoint(reactor, "127.0.0.1", server.port), CLIENTS)

    async def test_https(self) -> None:
        """The same over TLS, 100 clients at a time."""
        ca = make_ca(self.path("ca"), "mirror")
        cert, key = ca.issue_server("127.0.0.1")
        tls_port = free_port()
        server = await self.start("--tls-cert", cert, "--tls-key", key, "--tls-port", str(tls_port))
        with open(ca.cert_path, "rb") as f:
            trust = Certificate.loadPEM(f.read())
        endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", tls_port, optionsForClientTLS("127.0.0.1", trust))
        await self.abort_many(server, endpoint, 100)
