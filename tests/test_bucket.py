"""The bucket store's parts with faults a real bucket does not make on demand: a slow part upload,
wrong bytes, and a store that fails before or while a blob is sent."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import treq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.server import Site

from ociregistry.bucket import BucketWriter
from ociregistry.content import RemoteBlob
from ociregistry.errors import StorageUnavailable
from ociregistry.metrics import Metrics
from ociregistry.site import RegistryRequest
from ociregistry.store import BlobStore, DigestMismatch
from ociregistry.transport import _BodyReader
from ociregistry.web import RegistryAPI, Root
from tests.fakes import listen

MIB = 1024 * 1024


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class SlowUpload:
    """An S3Writer whose writes each wait until the test lets them finish (a part being stored)."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.pending: list[Deferred[None]] = []
        self.committed = False
        self.aborted = False

    async def write(self, data: bytes) -> None:
        self.received.append(data)
        waiting: Deferred[None] = Deferred()
        self.pending.append(waiting)
        await waiting

    def finish_writes(self) -> None:
        while self.pending:
            self.pending.pop(0).callback(None)

    async def commit(self) -> str:
        self.committed = True
        return "key"

    async def abort(self) -> None:
        self.aborted = True


class BucketWriterTests(SynchronousTestCase):
    """The spool is read by clients at once; the upload follows it, and holds the upstream back when behind."""

    def setUp(self) -> None:
        self.spool = BlobStore(self.mktemp(), lambda function, *args: succeed(function(*args)))
        self.spool.prepare()

    def writer(self, content: bytes) -> tuple[BucketWriter, SlowUpload]:
        upload = SlowUpload()
        return BucketWriter(self.spool.begin(_digest(content)), upload), upload  # type: ignore[arg-type]

    def test_upstream_waits_for_the_bucket(self) -> None:
        """Past the allowed lag a write asks to pause; the pause ends once the bucket has taken more."""
        content = os.urandom(24 * MIB)
        writer, upload = self.writer(content)
        chunk = 64 * 1024
        room = None
        offset = 0
        while room is None and offset < len(content):
            room = writer.write(content[offset:offset + chunk])
            offset += chunk
        self.assertIsNotNone(room, "the upstream is never paused")
        assert room is not None
        self.assertLess(offset, 20 * MIB)
        with open(writer.path, "rb") as f:
            self.assertEqual(f.read(), content[:offset])
        self.assertNoResult(room)
        while not room.called:
            upload.finish_writes()
        self.successResultOf(room)
        while offset < len(content):
            more = writer.write(content[offset:offset + chunk])
            offset += chunk
            while more is not None and not more.called:
                upload.finish_writes()
        committing = Deferred.fromCoroutine(writer.commit())
        while not committing.called:
            upload.finish_writes()
        self.assertEqual(self.successResultOf(committing), "key")
        self.assertEqual(b"".join(upload.received), content)
        self.assertTrue(upload.committed)
        writer.release()
        self.assertFalse(os.path.exists(writer.path))

    def test_wrong_bytes_are_never_completed(self) -> None:
        """Bytes that do not hash to the digest abort the upload; nothing is completed."""
        writer, upload = self.writer(b"right")
        self.assertIsNone(writer.write(b"wrong"))
        self.failureResultOf(Deferred.fromCoroutine(writer.commit()), DigestMismatch)
        self.assertEqual((upload.committed, upload.aborted), (False, True))
        self.assertFalse(os.path.exists(writer.path))


class BodyReaderTests(SynchronousTestCase):
    """An upstream body waits while its sink is storing."""

    def test_paused_while_the_sink_waits(self) -> None:
        """A sink's unfired Deferred pauses the transport (its stall timer too); its firing resumes it."""
        clock = Clock()
        room: Deferred[None] = Deferred()
        reader = _BodyReader(lambda data: room, clock, 60.0, 100.0, 30.0, "upstream")
        transport = StringTransport()
        reader.makeConnection(transport)
        reader.dataReceived(b"x")
        self.assertEqual(transport.producerState, "paused")
        clock.advance(120)
        self.assertNoResult(reader.done)
        room.callback(None)
        self.assertEqual(transport.producerState, "producing")
        clock.advance(61)
        self.failureResultOf(reader.done)


class FailingBlob(RemoteBlob):
    """A blob whose store fails: before anything is sent, or after ``good`` bytes."""

    def __init__(self, size: int, good: int | None) -> None:
        self.digest = _digest(b"x")
        self.size = size
        self._good = good

    def redirect(self) -> str | None:
        return None

    async def open_range(self, start: int, end: int) -> Any:
        if self._good is None:
            raise StorageUnavailable("bucket b at http://s3: unreachable (connection refused)")
        return _BreakingBody(end - start, self._good)


class _BreakingBody:
    def __init__(self, length: int, good: int) -> None:
        self.length = length
        self._good = good

    async def deliver(self, consumer: IConsumer) -> None:
        consumer.write(b"x" * self._good)
        raise StorageUnavailable("S3 GET broke off")


class FakeCache:
    def __init__(self, blob: RemoteBlob) -> None:
        self._blob = blob

    async def blob(self, where: Any, digest: str, peer: bool = False) -> RemoteBlob:
        return self._blob


class ServingFaultTests(TestCase):
    """A store that fails while serving: a JSON 503 before the headers, an aborted connection after."""

    async def serve(self, blob: RemoteBlob) -> str:
        api = RegistryAPI(FakeCache(blob), "docker.io", Metrics(["docker.io"]))  # type: ignore[arg-type]
        site = Site(Root({b"v2": api}))
        site.requestFactory = RegistryRequest
        port, listening = await listen(site)
        self.addCleanup(listening.stopListening)
        return f"http://127.0.0.1:{port}/v2/app/blobs/{_digest(b'x')}"

    async def test_failing_before_headers_is_json_503(self) -> None:
        """The bucket failing at the start of a blob GET is a 503 with an OCI error body."""
        url = await self.serve(FailingBlob(100, None))
        response = await treq.get(url, persistent=False)
        body = json.loads(await response.content())
        self.assertEqual(response.code, 503)
        self.assertEqual(body["errors"][0]["code"], "UNAVAILABLE")
        self.assertIn("unreachable", body["errors"][0]["message"])

    async def test_failing_midway_aborts(self) -> None:
        """The bucket breaking off midway cuts the connection: the client never sees a clean short body."""
        url = await self.serve(FailingBlob(100 * 1024, 1000))
        # (The headers and the first bytes may still be in the server's buffer when it aborts.)
        with self.assertRaises((ResponseFailed, ResponseNeverReceived)):
            response = await treq.get(url, persistent=False)
            self.assertEqual(response.code, 200)
            await response.content()
