"""Downloads and blob HEADs coalesced per upstream: a slow registry never slows a client of another."""

from __future__ import annotations

import os
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ociregistry.cache import Cache, Manifest
from ociregistry.downloads import BlobSource, Downloads
from ociregistry.errors import OCIError
from ociregistry.grammar import Upstream as Where
from ociregistry.index import Index
from ociregistry.sqlite import SqliteEngine
from ociregistry.metrics import Metrics
from ociregistry.store import BlobStore
from tests.fakes import Behaviour, FakeRegistry, StubUpstream, connection_of, digest_of, make_image

A, B = "a.example", "b.example"
# B sends 1 KiB every 5 s: slow, but steady.
TRICKLE = Behaviour(chunk=1024, delay=5.0)


class CacheOverStubs(SynchronousTestCase):
    """A cache on a temporary directory, its upstreams two fake registries answering when flushed."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.root = self.mktemp()
        self.a, self.b = FakeRegistry(), FakeRegistry()
        for fake in (self.a, self.b):
            fake.clock = self.clock
        self.upstream = StubUpstream({A: self.a, B: self.b})
        self.store = BlobStore(self.root, lambda f, *args: maybeDeferred(f, *args))
        self.store.prepare()
        self.server_index = Index(SqliteEngine(os.path.join(self.root, "index.db"), self.clock))
        self.addCleanup(self.server_index.close)
        # The same connection, answering at once: what the tests look at and prune with.
        self.index = connection_of(self.server_index)
        self.downloads = Downloads(self.store, self.server_index, self.upstream, Metrics())  # type: ignore[arg-type]
        self.cache = Cache(self.server_index, self.store, self.upstream, self.downloads, self.clock)  # type: ignore[arg-type]

    def settle(self, *registries: str) -> None:
        """Let the named upstreams (or all) answer everything they have sent so far."""
        for _ in range(5):
            self.upstream.flush(*registries)

    def blob(self, registry: str, digest: str) -> Deferred[BlobSource]:
        return Deferred.fromCoroutine(self.cache.blob(Where(registry, "app"), digest))

    def head(self, registry: str, digest: str) -> Deferred[int | None]:
        return Deferred.fromCoroutine(self.cache.blob_size(Where(registry, "app"), digest))

    def manifest(self, registry: str, reference: str) -> Deferred[Manifest]:
        return Deferred.fromCoroutine(self.cache.manifest(Where(registry, "app"), reference))

    def received(self, source: BlobSource) -> bytes:
        """The bytes a client may be sent now."""
        fd = source.open()
        try:
            return os.pread(fd, source.available(), 0)
        finally:
            os.close(fd)

    def stored(self) -> list[str]:
        """The names of the files under blobs/, and of any left in tmp/."""
        found: list[str] = []
        for area in ("blobs", "tmp"):
            for _, _, names in os.walk(os.path.join(self.root, area)):
                found += names
        return sorted(found)


class PerUpstreamDownloadTests(CacheOverStubs):
    """Two upstreams serving one digest each get a download of their own."""

    def test_trickle_does_not_slow_another_upstream(self) -> None:
        """While B trickles a digest, a client of A gets all of it at once; both verify, one file stays."""
        content = os.urandom(64 * 1024)
        digest = digest_of(content)
        self.a.blobs[digest] = self.b.blobs[digest] = content
        self.b.behaviour[digest] = TRICKLE
        from_b = self.blob(B, digest)
        self.settle()
        b_source = self.successResultOf(from_b)
        from_a = self.blob(A, digest)
        self.settle()
        a_source = self.successResultOf(from_a)
        self.assertEqual(len(self.received(a_source)), len(content))
        self.assertEqual(self.received(a_source), content)
        self.assertLess(len(self.received(b_source)), 2048)
        self.assertIsNotNone(self.downloads.running(B, digest))
        self.assertEqual(self.index.blob_size(digest), len(content))
        # A second client of A is served from disk; B's client keeps B's download.
        self.assertNotIsInstance(self.successResultOf(self.blob(A, digest)), type(b_source))
        for _ in range(len(content) // 1024):
            self.clock.advance(TRICKLE.delay)
            self.settle()
        self.assertEqual(self.received(b_source), content)
        self.assertEqual((len(self.downloads), self.a.count("GET", digest), self.b.count("GET", digest)), (0, 1, 1))
        self.assertEqual(self.stored(), [digest.partition(":")[2]])
        self.assertEqual(self.index.blob_size(digest), len(content))

    def test_close_abandons_every_download(self) -> None:
        """Two downloads of one digest from two upstreams count as two; closing abandons both and their files."""
        content = os.urandom(8 * 1024)
        digest = digest_of(content)
        self.a.blobs[digest] = self.b.blobs[digest] = content
        self.a.behaviour[digest] = self.b.behaviour[digest] = TRICKLE
        sources = [self.blob(registry, digest) for registry in (A, B)]
        self.settle()
        waiting = [self.successResultOf(source).wait_for(4096) for source in sources]
        self.assertEqual(len(self.downloads), 2)
        self.successResultOf(Deferred.fromCoroutine(self.downloads.close()))
        self.assertEqual(len(self.downloads), 0)
        for waiter in waiting:
            self.assertEqual(self.failureResultOf(waiter, OCIError).value.status, 503)
        self.assertEqual(self.stored(), [])

    def test_prefetch_per_upstream(self) -> None:
        """A slow upstream's prefetches hold back only its own images: A's image is complete meanwhile."""
        slow = make_image(b"one", b"two", b"three", b"four", config=b'{"from":"b"}')
        fast = make_image(b"five", b"six", config=b'{"from":"a"}')
        self.b.add_image("app", "v1", slow)
        self.a.add_image("app", "v1", fast)
        for digest in slow.blobs:
            self.b.behaviour[digest] = Behaviour(chunk=1, delay=5.0)
        pulled = self.manifest(B, slow.digest)
        self.settle()
        self.successResultOf(pulled)
        self.assertEqual(len(self.downloads), 3)
        pulled = self.manifest(A, fast.digest)
        self.settle()
        self.successResultOf(pulled)
        self.assertEqual({d: self.index.blob_size(d) for d in fast.blobs}, {d: len(c) for d, c in fast.blobs.items()})
        self.assertEqual([self.index.blob_size(d) for d in slow.blobs], [None] * len(slow.blobs))
        for _ in range(40):
            self.clock.advance(5.0)
            self.settle()
        self.assertEqual({d: self.index.blob_size(d) for d in slow.blobs}, {d: len(c) for d, c in slow.blobs.items()})
        self.assertEqual(self.downloads._prefetches, {})


class PerUpstreamHeadTests(CacheOverStubs):
    """Blob HEADs are asked of the upstream the client named."""

    def test_heads_coalesced_per_upstream(self) -> None:
        """Concurrent HEADs make one request per upstream, and A's answer does not wait for B's."""
        content = os.urandom(1000)
        digest = digest_of(content)
        self.a.blobs[digest] = self.b.blobs[digest] = content
        self.a.holding = self.b.holding = True
        from_b = self.head(B, digest)
        from_a = [self.head(A, digest) for _ in range(3)]
        self.a.release()
        self.settle()
        self.assertEqual([self.successResultOf(head) for head in from_a], [1000] * 3)
        self.assertNoResult(from_b)
        self.b.release()
        self.settle()
        self.assertEqual(self.successResultOf(from_b), 1000)
        self.assertEqual((self.a.count("HEAD", digest), self.b.count("HEAD", digest)), (1, 1))

    def test_head_while_another_upstream_downloads(self) -> None:
        """A HEAD asked of A while B downloads the digest is A's answer, not the size B claims."""
        content = os.urandom(1000)
        digest = digest_of(content)
        self.a.blobs[digest] = content
        self.b.blobs[digest] = content + b"and more"
        self.b.behaviour[digest] = Behaviour(chunk=100, delay=5.0)
        from_b = self.blob(B, digest)
        self.settle()
        self.assertEqual(self.successResultOf(from_b).size, 1008)
        head = self.head(A, digest)
        self.settle()
        self.assertEqual(self.successResultOf(head), 1000)
