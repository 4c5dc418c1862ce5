"""The S3 storage driver against a real Ceph RGW, and against a fake store for the faults
Ceph cannot be made to produce."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
import time
from typing import Any

import treq
from treq.testing import RequestTraversalAgent
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from ociregistry.errors import RangeNotSatisfiable, StorageUnavailable, answer_for
from ociregistry.s3 import MINIMUM_PART, S3Config, S3Store, StoreFailing, key_for
from ociregistry.store import DigestMismatch
from tests.fakes import listen, wait
from tests.realparts import free_port
from tests.services import CephRGW, ceph, ceph_rgw

MIB = 1024 * 1024
CHUNK = 64 * 1024


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@implementer(IConsumer)
class Sink:
    """Takes a body and hashes it; when ``rate`` is set, a slow client.

    A slow sink takes at most ``rate`` bytes every 5 ms, holds the rest, and
    pauses its producer while it holds more than 2 MiB.
    """

    def __init__(self, rate: int | None = None) -> None:
        self.hash = hashlib.sha256()
        self.size = 0
        self.pauses = 0
        self.peak_rss = _rss()
        self._rate = rate
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._producer: IPushProducer | None = None
        self._paused = False
        self._tick: Any = None

    @property
    def data_digest(self) -> str:
        """The sha256 digest of what was taken."""
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        self._drain(None)
        return "sha256:" + self.hash.hexdigest()

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        self._producer = producer

    def unregisterProducer(self) -> None:
        self._producer = None

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._rate is None:
            self.hash.update(data)
            return
        self._held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes > 2 * MIB and not self._paused and self._producer is not None:
            self._paused = True
            self.pauses += 1
            self._producer.pauseProducing()
        if self._tick is None:
            self._tick = reactor.callLater(0.005, self._take)

    def _take(self) -> None:
        self._tick = None
        self.peak_rss = max(self.peak_rss, _rss())
        self._drain(self._rate)
        if self._paused and self._held_bytes < MIB:
            self._paused = False
            if self._producer is not None:
                self._producer.resumeProducing()
        if self._held:
            self._tick = reactor.callLater(0.005, self._take)

    def _drain(self, limit: int | None) -> None:
        taken = 0
        while self._held and (limit is None or taken < limit):
            data = self._held.pop(0)
            self.hash.update(data)
            taken += len(data)
            self._held_bytes -= len(data)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def _write(store: S3Store, data: bytes, digest: str | None = None) -> Any:
    """Begin a writer for ``data`` (under its own digest unless told) and write it in chunks."""
    digest = digest or _digest(data)
    writer = store.begin(key_for(digest), digest)
    for offset in range(0, len(data), CHUNK):
        await writer.write(data[offset:offset + CHUNK])
    return writer


async def _read(store: S3Store, key: str, start: int | None = None, end: int | None = None,
                sink: Sink | None = None) -> tuple[Any, Sink]:
    body = await store.open_range(key, start, end)
    assert body is not None
    sink = sink or Sink()
    await body.deliver(sink)
    return body, sink


class CephTestCase(TestCase):
    """A test with a bucket of its own in the test run's Ceph RGW."""

    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]
        self.rgw: CephRGW = await ceph_rgw()
        self.bucket = "t-" + secrets.token_hex(6)
        self.store = self.make_store()
        await self.store.create_bucket()

    def make_store(self, **changes: Any) -> S3Store:
        """A driver for this test's bucket, with small parts; ``changes`` alter its settings."""
        options = {key: changes.pop(key) for key in ("retries", "timeout") if key in changes}
        config = dataclasses.replace(self.rgw.s3_config(self.bucket, prefix="cache/"), **changes)
        store = S3Store(config, reactor=reactor, part_size=MINIMUM_PART, **options)
        self.addCleanup(store.close)
        return store


class CephRoundTripTests(CephTestCase):
    """Objects written and read through a real S3 implementation."""

    async def test_multipart_object_read_whole_and_by_range(self) -> None:
        """A 32 MiB object goes up in parts as it is written, and reads back whole and by any Range."""
        data = os.urandom(32 * MIB)
        digest = _digest(data)
        writer = await _write(self.store, data[:6 * MIB], digest)
        uploads = await self.store.uploads()
        self.assertEqual([u.key for u in uploads], [key_for(digest)])
        for offset in range(6 * MIB, len(data), CHUNK):
            await writer.write(data[offset:offset + CHUNK])
        self.assertEqual(await writer.commit(), key_for(digest))
        self.assertEqual(await self.store.uploads(), [])
        self.assertEqual(await self.store.stat(key_for(digest)), len(data))

        body, sink = await _read(self.store, key_for(digest))
        self.assertEqual((body.first, body.last, body.size, body.partial), (0, len(data) - 1, len(data), False))
        self.assertEqual(sink.data_digest, digest)

        size = len(data)
        cases = [(0, 0, 0, 0), (1000, 5 * MIB + 17, 1000, 5 * MIB + 17),  # crosses a part boundary
                 (size - 1000, None, size - 1000, size - 1),                # open-ended
                 (None, 1500, size - 1500, size - 1),                        # suffix
                 (size - 10, size + 5000, size - 10, size - 1)]              # past the end
        for start, end, first, last in cases:
            body, sink = await _read(self.store, key_for(digest), start, end)
            self.assertEqual((body.first, body.last, body.size, body.partial), (first, last, size, True))
            self.assertEqual(sink.data_digest, _digest(data[first:last + 1]), (start, end))
        with self.assertRaises(RangeNotSatisfiable) as caught:
            await self.store.open_range(key_for(digest), size + 1, None)
        self.assertEqual(caught.exception.size, size)

    async def test_small_object_is_one_put(self) -> None:
        """An object smaller than a part is stored by commit without a multipart upload, and read whole."""
        writer = await _write(self.store, b"small")
        self.assertEqual(await self.store.uploads(), [])
        self.assertIsNone(await self.store.stat(writer.key))
        self.assertIsNone(await self.store.read(writer.key))
        await writer.commit()
        self.assertEqual(await self.store.stat(writer.key), 5)
        self.assertEqual(await self.store.read(writer.key), b"small")
        with self.assertRaises(ValueError):
            await self.store.read(writer.key, limit=4)

    async def test_empty_object(self) -> None:
        """An empty object (OCI has empty blobs) is stored and read back as nothing."""
        writer = self.store.begin(key_for(_digest(b"")), _digest(b""))
        await writer.commit()
        self.assertEqual(await self.store.stat(writer.key), 0)
        body, sink = await _read(self.store, writer.key)
        self.assertEqual((body.length, sink.size, sink.data_digest), (0, 0, _digest(b"")))
        self.assertEqual(await self.store.read(writer.key), b"")

    async def test_missing_object(self) -> None:
        """An object that is not there has no size and no body; delete of it is fine."""
        key = key_for(_digest(b"absent"))
        self.assertIsNone(await self.store.stat(key))
        self.assertIsNone(await self.store.open_range(key))
        await self.store.delete(key)

    async def test_discarded_body(self) -> None:
        """A body that is opened and then not wanted is dropped, and the store goes on working."""
        writer = await _write(self.store, os.urandom(MIB))
        await writer.commit()
        body = await self.store.open_range(writer.key)
        assert body is not None
        body.discard()
        with self.assertRaises(ValueError):
            await body.deliver(Sink())
        self.assertEqual(await self.store.stat(writer.key), MIB)

    async def test_delete(self) -> None:
        """A deleted object is gone."""
        writer = await _write(self.store, b"doomed")
        await writer.commit()
        await self.store.delete(writer.key)
        self.assertIsNone(await self.store.stat(writer.key))

    async def test_aborted_writer_leaves_nothing(self) -> None:
        """An aborted writer leaves neither an object nor a multipart upload."""
        writer = await _write(self.store, os.urandom(6 * MIB))
        self.assertEqual(len(await self.store.uploads()), 1)
        await writer.abort()
        self.assertIsNone(await self.store.stat(writer.key))
        self.assertEqual(await self.store.uploads(), [])

    async def test_wrong_digest_is_refused(self) -> None:
        """A writer whose bytes do not match its digest refuses to commit and aborts its upload."""
        data = os.urandom(6 * MIB)
        wrong = _digest(b"something else")
        writer = await _write(self.store, data, wrong)
        with self.assertRaises(DigestMismatch) as caught:
            await writer.commit()
        self.assertEqual((caught.exception.expected, caught.exception.actual), (wrong, _digest(data)))
        self.assertIsNone(await self.store.stat(key_for(wrong)))
        self.assertEqual(await self.store.uploads(), [])

    async def test_sweep_aborts_uploads_of_crashed_writers(self) -> None:
        """sweep_uploads aborts an upload its writer left behind, once it is old enough; not one of its own."""
        # Another process's writer, never committed nor aborted: "crashed".
        await _write(self.make_store(), os.urandom(6 * MIB))
        ours = await _write(self.store, os.urandom(6 * MIB))
        done = await _write(self.store, b"kept")
        await done.commit()
        neighbour = self.make_store(prefix="other/")     # another user of the bucket
        theirs = await _write(neighbour, os.urandom(6 * MIB))
        self.assertEqual(await self.store.sweep_uploads(older_than=3600), 0)
        self.assertEqual(len(await self.store.uploads()), 2)
        await wait(1.1)   # RGW's timestamps, like ours, are in real time
        self.assertEqual(await self.store.sweep_uploads(older_than=1), 1)
        self.assertEqual([u.key for u in await self.store.uploads()], [ours.key])
        await ours.abort()
        self.assertEqual(await self.store.uploads(), [])
        self.assertEqual(await self.store.stat(done.key), 4)
        self.assertEqual([u.key for u in await neighbour.uploads()], [theirs.key])
        await theirs.abort()

    async def test_presigned_get(self) -> None:
        """A presigned URL serves the object without credentials, and stops when it expires."""
        writer = await _write(self.store, b"presigned content")
        await writer.commit()
        url = self.store.presign_get(writer.key, expires=2)
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.get(url, pool=pool)
        self.assertEqual((response.code, await treq.content(response)), (200, b"presigned content"))
        unsigned = await treq.get(url.partition("?")[0], pool=pool)
        self.assertEqual(unsigned.code, 403)
        await treq.content(unsigned)
        await wait(3.1)
        expired = await treq.get(url, pool=pool)
        self.assertEqual(expired.code, 403)
        self.assertIn(b"AccessDenied", await treq.content(expired))

    async def test_check_bucket(self) -> None:
        """check_bucket says in one line whether the bucket is reachable, missing or refuses us."""
        where = f"bucket {self.bucket} at {self.rgw.endpoint}"
        self.assertEqual(await self.store.check_bucket(), f"{where}: reachable")
        cases = [({"secret_key": "wrong"}, f"{where}: wrong credentials (the secret key does not match)"),
                 ({"access_key": "NOBODY"}, f"{where}: wrong credentials (unknown access key)"),
                 ({"bucket": "absent-bucket"}, f"bucket absent-bucket at {self.rgw.endpoint}: missing")]
        for changes, line in cases:
            with self.assertRaises(StorageUnavailable) as caught:
                await self.make_store(**changes).check_bucket()
            self.assertEqual(caught.exception.message, line)
            self.assertEqual(answer_for(caught.exception).status, 503)
        endpoint = f"http://127.0.0.1:{free_port()}"
        with self.assertRaises(StorageUnavailable) as caught:
            await self.make_store(endpoint=endpoint, retries=1).check_bucket()
        self.assertRegex(caught.exception.message,
                         rf"^bucket {self.bucket} at {endpoint}: unreachable \(.*refused.*, 2 tries\)$")

    async def test_wrong_credentials_on_reads(self) -> None:
        """Reads with wrong credentials fail with the same clear line, not as a missing object."""
        with self.assertRaises(StorageUnavailable) as caught:
            await self.make_store(secret_key="wrong").stat(key_for(_digest(b"x")))
        self.assertIn("wrong credentials", caught.exception.message)

    async def test_no_ca_bundle_needed_for_http(self) -> None:
        """An http endpoint works whatever AWS_CA_BUNDLE names (this machine exports one)."""
        self.patch(os, "environ", {**os.environ, "AWS_CA_BUNDLE": "/nonexistent/ca.pem"})
        writer = await _write(self.store, b"no tls")
        await writer.commit()
        self.assertEqual(await self.store.stat(writer.key), 6)

    async def test_streaming_keeps_memory_small(self) -> None:
        """Streaming a 64 MiB object to a slow client grows the process by far less than the object."""
        hashed = hashlib.sha256()
        chunks = [os.urandom(MIB) for _ in range(4)]
        for i in range(64):
            hashed.update(chunks[i % 4])
        digest = "sha256:" + hashed.hexdigest()
        writer = self.store.begin(key_for(digest), digest)
        for i in range(64):
            for offset in range(0, MIB, CHUNK):
                await writer.write(chunks[i % 4][offset:offset + CHUNK])
        await writer.commit()
        before = _rss()
        began = time.monotonic()
        _, sink = await _read(self.store, key_for(digest), sink=Sink(rate=MIB))
        elapsed = time.monotonic() - began
        self.assertEqual((sink.size, sink.data_digest), (64 * MIB, digest))
        self.assertGreater(sink.pauses, 0)
        growth = sink.peak_rss - before
        print(f"\nStreamed 64 MiB to a slow client in {elapsed:.2f} s: RSS grew {growth / MIB:.1f} MiB, "
              f"{sink.pauses} pauses")
        self.assertLess(growth, 32 * MIB, f"RSS grew by {growth / MIB:.1f} MiB in {elapsed:.2f} s")

    def test_ceph_started_quickly(self) -> None:
        """The shared Ceph RGW came up within a few seconds."""
        assert ceph.start_seconds is not None
        print(f"\nCeph RGW started in {ceph.start_seconds:.2f} s")
        self.assertLess(ceph.start_seconds, 10)


class FakeS3(Resource):
    """An S3 store in memory whose answers a test scripts per operation.

    ``faults[operation]`` is a list of actions used up in order ("500", "503",
    "reset", "silent", "held" to answer only when ``release`` fires, "cut" for a
    GET that breaks off halfway, "stall" for one that stops sending halfway); ``always`` names operations that fail that way
    for ever.  A "part" that resets does so while its body arrives (see
    ``_ResettingRequest``).
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.objects: dict[str, bytes] = {}
        self.uploads: dict[str, dict[int, bytes]] = {}
        self.faults: dict[str, list[str]] = {}
        self.always: dict[str, str] = {}
        self.seen: list[tuple[str, str]] = []
        self.release: Deferred[None] = Deferred()

    def operation(self, request: Request) -> str:
        """What the request does: head, get, put, create, part, complete, abort, list, delete."""
        args = request.args
        method = request.method.decode()
        if b"uploads" in args:
            return "create" if method == "POST" else "list"
        if b"uploadId" in args:
            return {"PUT": "part", "POST": "complete", "DELETE": "abort"}[method]
        return method.lower()

    def render(self, request: Request) -> Any:
        operation = self.operation(request)
        key = request.path.decode().split("/", 2)[2]
        self.seen.append((operation, request.getHeader("range") or ""))
        assert (request.getHeader("authorization") or "").startswith("AWS4-HMAC-SHA256 ")
        pending = self.faults.get(operation)
        action = pending.pop(0) if pending else self.always.get(operation)
        if action == "reset":
            request.channel.transport.abortConnection()  # type: ignore[union-attr]
            return NOT_DONE_YET
        if action == "silent":
            return NOT_DONE_YET
        if action == "held":
            self.release.addCallback(lambda _: (request.write(self.answer(request, operation, key)),
                                                request.finish()))
            return NOT_DONE_YET
        if action in ("500", "503"):
            request.setResponseCode(int(action))
            return b"<Error><Code>ServiceUnavailable</Code></Error>"
        return self.answer(request, operation, key, action)

    def answer(self, request: Request, operation: str, key: str, action: str | None = None) -> Any:
        """What a working store answers (``action`` "cut" breaks a GET off halfway)."""
        body = request.content.read()  # type: ignore[union-attr]
        upload_id = (request.args.get(b"uploadId") or [b""])[0].decode()
        if operation == "create":
            self.uploads["u1"] = {}
            return b"<InitiateMultipartUploadResult xmlns='http://s3.amazonaws.com/doc/2006-03-01/'>" \
                   b"<UploadId>u1</UploadId></InitiateMultipartUploadResult>"
        if operation == "part":
            self.uploads[upload_id][int(request.args[b"partNumber"][0])] = body
            request.setHeader("ETag", f'"{hashlib.md5(body).hexdigest()}"')
            return b""
        if operation == "complete":
            parts = self.uploads.pop(upload_id)
            self.objects[key] = b"".join(parts[n] for n in sorted(parts))
            return b"<CompleteMultipartUploadResult><ETag></ETag></CompleteMultipartUploadResult>"
        if operation == "abort":
            self.uploads.pop(upload_id, None)
            request.setResponseCode(204)
            return b""
        if operation == "put":
            self.objects[key] = body
            return b""
        if key not in self.objects:
            request.setResponseCode(404)
            return b"<Error><Code>NoSuchKey</Code></Error>"
        content = self.objects[key]
        request.setHeader("Content-Length", str(len(content)))
        if operation == "head":
            return b""
        first, last = 0, len(content) - 1
        range_header = request.getHeader("range")
        if range_header:
            start, _, end = range_header.removeprefix("bytes=").partition("-")
            first, last = int(start), int(end) if end else len(content) - 1
            request.setResponseCode(206)
            request.setHeader("Content-Range", f"bytes {first}-{last}/{len(content)}")
            request.setHeader("Content-Length", str(last - first + 1))
        if action in ("cut", "stall"):
            request.write(content[first:first + (last - first + 1) // 2])
            if action == "cut":
                reactor.callLater(0.05, request.channel.transport.abortConnection)  # type: ignore[union-attr]
            return NOT_DONE_YET
        return content[first:last + 1]


class _ResettingRequest(Request):
    """Resets the connection after 1 MiB of a part's body when the fake store says so."""

    received = 0

    def handleContentChunk(self, data: bytes) -> None:
        self.received += len(data)
        fake = self.channel.site.resource  # type: ignore[union-attr]
        # Method and URI are set on the request only once its body is complete.
        command, path = self.channel._command, self.channel._path  # type: ignore[union-attr]
        if self.received > MIB and command == b"PUT" and b"partNumber=" in path:
            pending = fake.faults.get("part")
            action = pending[0] if pending else fake.always.get("part")
            if action == "reset":
                if pending:
                    pending.pop(0)
                fake.seen.append(("part", "reset while its body arrived"))
                self.channel.transport.abortConnection()  # type: ignore[union-attr]
                return
        super().handleContentChunk(data)


class _FakeStoreTests:
    """What tests against the fake store share."""

    fake: FakeS3

    def count(self, operation: str) -> int:
        """How many requests of an operation the fake store saw."""
        return sum(1 for seen, _ in self.fake.seen if seen == operation)


class RetryTests(_FakeStoreTests, SynchronousTestCase):
    """Answers of a failing store, retried with backoff and time limits on a fake clock."""

    def setUp(self) -> None:
        self.fake = FakeS3()
        self.clock = Clock()
        self.agent = RequestTraversalAgent(self.fake)
        self.store = S3Store(S3Config("http://s3.test", "bucket", "AK", "SK"), reactor=self.clock,
                             agent=self.agent, part_size=MINIMUM_PART, retries=2, backoff=0.2, timeout=5)

    def start(self, work: Any) -> Deferred[Any]:
        """Begin some work of the driver and carry it as far as it goes without time passing."""
        started = Deferred.fromCoroutine(work)
        self.agent.flush()
        return started

    def advance(self, seconds: float) -> None:
        """Let time pass on the fake clock, and deliver what the fake store answers meanwhile."""
        self.clock.advance(seconds)
        self.agent.flush()

    def test_500_then_success_is_retried(self) -> None:
        """A part that fails once with 500 is sent again after the backoff, and the object is complete."""
        self.fake.faults["part"] = ["500"]
        data = os.urandom(6 * MIB)
        writing = self.start(_write(self.store, data))
        self.assertEqual(self.count("part"), 1)
        self.assertNoResult(writing)
        self.advance(0.2)
        writer = self.successResultOf(writing)
        self.successResultOf(self.start(writer.commit()))
        self.assertEqual(self.fake.objects[writer.key], data)
        self.assertEqual((self.count("part"), self.count("complete")), (3, 1))

    def test_503_for_ever_is_a_clear_error(self) -> None:
        """A store that answers 503 for ever is tried with doubling backoff, then a JSON 503."""
        self.fake.always["head"] = "503"
        stat = self.start(self.store.stat("blobs/sha256/abc"))
        for wait_for, tries in ((0.2, 2), (0.4, 3)):
            self.advance(wait_for - 0.01)
            self.assertEqual(self.count("head"), tries - 1)
            self.advance(0.01)
            self.assertEqual(self.count("head"), tries)
        error = self.failureResultOf(stat, StoreFailing).value
        self.assertEqual(error.message, "S3 HEAD blobs/sha256/abc at http://s3.test failed 3 times: 503")
        answer = answer_for(error)
        self.assertEqual((answer.status, answer.code), (503, "UNAVAILABLE"))

    def test_silent_store_times_out(self) -> None:
        """A store that never answers is given up on after the timeout, which bounds every try together."""
        self.fake.always["head"] = "silent"
        stat = self.start(self.store.stat("blobs/sha256/abc"))
        self.advance(4.9)
        self.assertNoResult(stat)
        self.advance(0.1)
        error = self.failureResultOf(stat, StoreFailing).value
        self.assertEqual(self.count("head"), 1)
        self.assertIn("failed once: no answer in 5 s", error.message)

    def test_caller_cancelling_is_not_retried(self) -> None:
        """A caller that cancels gets its cancellation at once: it is not a failure of the store."""
        self.fake.always["head"] = "silent"
        stat = self.start(self.store.stat("blobs/sha256/abc"))
        stat.cancel()
        self.failureResultOf(stat, CancelledError)
        self.advance(30)
        self.assertEqual(self.count("head"), 1)

    def test_writer_waits_for_a_full_part_to_be_stored(self) -> None:
        """The write that fills a part returns only once the store has taken it: one part in memory."""
        self.fake.faults["part"] = ["held"]
        start, fill = os.urandom(MINIMUM_PART - CHUNK), os.urandom(CHUNK)
        writer = self.successResultOf(self.start(_write(self.store, start, _digest(start + fill + b"last"))))
        filling = self.start(writer.write(fill))
        self.assertEqual(self.count("part"), 1)
        self.assertNoResult(filling)
        self.fake.release.callback(None)
        self.agent.flush()
        self.successResultOf(filling)
        self.successResultOf(self.start(writer.write(b"last")))
        self.assertEqual(self.count("part"), 1)
        self.successResultOf(self.start(writer.commit()))
        self.assertEqual((self.count("part"), self.count("complete")), (2, 1))
        self.assertEqual(self.fake.objects[writer.key], start + fill + b"last")

    def test_abort_of_a_failed_upload_is_tried_once(self) -> None:
        """When a store keeps failing a part, the abort that follows is one request, not more retries."""
        self.fake.always["part"] = "503"
        self.fake.always["abort"] = "503"
        writer = self.store.begin("blobs/x", _digest(b"x"))
        writing = self.start(writer.write(os.urandom(MINIMUM_PART)))
        self.advance(0.2)
        self.advance(0.4)
        self.failureResultOf(writing, StoreFailing)
        self.assertEqual((self.count("part"), self.count("abort")), (3, 1))
        self.assertEqual(list(self.fake.uploads), ["u1"])   # left for sweep_uploads


class ConnectionFaultTests(_FakeStoreTests, TestCase):
    """Connections to the store that break: these need real sockets, on 127.0.0.1."""

    async def setUp(self) -> None:  # type: ignore[override]
        self.fake = FakeS3()
        port, listening = await listen(Site(self.fake, requestFactory=_ResettingRequest))
        self.addCleanup(listening.stopListening)
        self.store = S3Store(S3Config(f"http://127.0.0.1:{port}", "bucket", "AK", "SK"), reactor=reactor,
                             part_size=MINIMUM_PART, retries=2, backoff=0.01, timeout=0.5)
        self.addCleanup(self.store.close)

    async def test_reset_mid_upload_aborts(self) -> None:
        """A store that resets every part while it is sent gets the upload aborted and a clear 503 error."""
        self.fake.always["part"] = "reset"
        writer = self.store.begin(key_for(_digest(b"x")), _digest(b"x"))
        with self.assertRaises(StoreFailing) as caught:
            await writer.write(os.urandom(6 * MIB))
        self.assertEqual(self.fake.seen.count(("part", "reset while its body arrived")), 3)
        self.assertEqual(self.count("abort"), 1)
        self.assertEqual(self.fake.uploads, {})
        self.assertEqual(self.fake.objects, {})
        self.assertIn("upload part 1", caught.exception.message)
        self.assertIn("failed 3 times", caught.exception.message)
        self.assertEqual(answer_for(caught.exception).status, 503)
        with self.assertRaises(ValueError):
            await writer.write(b"more")

    async def test_broken_download_resumes_with_range(self) -> None:
        """A GET that breaks off or stalls midway is resumed from the next byte; the client gets every byte once."""
        data = os.urandom(3 * MIB)
        self.fake.objects["blobs/x"] = data
        for fault in ("cut", "stall"):
            self.fake.seen.clear()
            self.fake.faults["get"] = [fault]
            body, sink = await _read(self.store, "blobs/x")
            self.assertEqual((sink.size, sink.data_digest), (len(data), _digest(data)), fault)
            resumed = [r for op, r in self.fake.seen if op == "get"]
            self.assertEqual(len(resumed), 2)
            self.assertRegex(resumed[1], r"^bytes=\d+-%d$" % (len(data) - 1))


class SettingsTests(TestCase):
    """Settings the store would refuse are refused before any request."""

    def test_bucket_names(self) -> None:
        """Bucket names follow S3's rules (Ceph RGW too wants at least 3 characters)."""
        for name in ("ab", "Upper", "-dash", "under_score", "x" * 64):
            with self.assertRaises(ValueError):
                S3Store(S3Config("http://127.0.0.1:1", name, "AK", "SK"), reactor=reactor)
        S3Store(S3Config("http://127.0.0.1:1", "abc", "AK", "SK"), reactor=reactor)

    def test_part_size(self) -> None:
        """Parts below S3's 5 MiB minimum are refused."""
        with self.assertRaises(ValueError):
            S3Store(S3Config("http://127.0.0.1:1", "abc", "AK", "SK"), reactor=reactor, part_size=MINIMUM_PART - 1)
