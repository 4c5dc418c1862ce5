"""Clients that abort a large cached blob halfway leave the server's memory where it was."""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from tests.fakes import FakeRegistry, digest_of, listen
from tests.realparts import MIB, WebClient, WorkspaceTestCase, peak_rss_bytes, rss_bytes, start_server

BLOB_SIZE = 16 * MIB
READ_BEFORE_ABORT = 8 * MIB
CLIENTS = 500
AT_ONCE = 500


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


async def abort_halfway(port: int, path: str, limit: int) -> int:
    """One client: the bytes it read before aborting (or before the server closed)."""
    request = f"GET {path} HTTP/1.1\r\nHost: mirror.test\r\n\r\n".encode("ascii")
    client = _AbortHalfway(request, limit)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    return await client.done


class AbortMemoryTests(WorkspaceTestCase):
    """Memory held for clients that go away mid-blob."""

    async def test_aborted_downloads_do_not_grow_memory(self) -> None:
        """500 clients reading 8 MiB of a cached 16 MiB blob and aborting grow the server's RSS by under 100 MiB."""
        upstream = FakeRegistry()
        port, listening = await listen(upstream)
        self.addCleanup(listening.stopListening)
        registry = f"127.0.0.1:{port}"
        blob = os.urandom(BLOB_SIZE)
        digest = digest_of(blob)
        upstream.blobs[digest] = blob
        server = await start_server(self.path("cache"), test=self, args=(
            "--config-file", self.config([{"name": registry, "scheme": "http"}])))
        path = f"/v2/app/blobs/{digest}?ns={registry}"
        web = WebClient()
        self.addCleanup(web.close)
        response = await web.client.get(server.url + path)
        self.assertEqual((response.code, len(await response.content())), (200, BLOB_SIZE))
        assert server.pid is not None
        before, descriptors = rss_bytes(server.pid), open_files(server.pid)
        read = []
        for _ in range(CLIENTS // AT_ONCE):
            read += await gatherResults([Deferred.fromCoroutine(abort_halfway(server.port, path, READ_BEFORE_ABORT))
                                         for _ in range(AT_ONCE)])
        self.assertTrue(all(r >= READ_BEFORE_ABORT for r in read), "a client got less than it asked to read")
        response = await web.client.get(server.url + path)
        self.assertEqual((response.code, len(await response.content())), (200, BLOB_SIZE))
        after, peak = rss_bytes(server.pid), peak_rss_bytes(server.pid)
        figures = f"RSS {before / MIB:.0f} MiB before, {after / MIB:.0f} MiB after, peak {peak / MIB:.0f} MiB"
        self.assertLess(after - before, 100 * MIB, figures)
        self.assertLess(peak - before, 100 * MIB, figures)
        self.assertLessEqual(open_files(server.pid), descriptors + 2, "file descriptors left open")
