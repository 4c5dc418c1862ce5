"""A replica whose lookup missed just before another replica recorded the blob and released its lease
claims the lease afresh, and then finds the blob in the index: it serves it from the store, not upstream."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed

from ociregistry.cluster import Cluster
from ociregistry.content import StoredBlob
from ociregistry.downloads import Downloads
from ociregistry.metrics import Metrics
from tests.fakes import digest_of
from tests.test_downloads import A, CacheOverStubs

OWNER, LATE = "http://127.0.31.11:5000", "http://127.0.31.12:5000"


class RecheckTests(CacheOverStubs):
    """Two replicas' clusters on one sqlite index and store; the late one's lookup misses once."""

    def setUp(self) -> None:
        super().setUp()
        self.cluster = Cluster(self.server_index, LATE, self.clock)
        self.downloads = Downloads(self.store, self.server_index, self.upstream, Metrics(),  # type: ignore[arg-type]
                                   cluster=self.cluster)
        self.cache._downloads = self.downloads
        self.addCleanup(lambda: Deferred.fromCoroutine(self.downloads.close()))
        self.content = b"layer bytes " * 1000
        self.digest = digest_of(self.content)
        self.a.blobs[self.digest] = self.content

    def owner_stores_it(self) -> None:
        """The other replica claims the blob, stores and records it, and releases its lease."""
        owner = Cluster(self.server_index, OWNER, self.clock)
        self.successResultOf(Deferred.fromCoroutine(owner.claim(A, self.digest)))
        writer = self.store.begin(self.digest)
        writer.write(self.content)
        self.successResultOf(Deferred.fromCoroutine(
            self.server_index.record_file(self.store, writer,
                                          lambda: self.server_index.record_blob(self.digest, len(self.content)))))
        writer.release()
        self.successResultOf(Deferred.fromCoroutine(owner.release(A, self.digest)))

    def test_fresh_claim_finds_the_blob_recorded(self) -> None:
        """The lookup misses, the owner records the blob and releases its lease, this replica claims it:
        the blob comes from the store, with no upstream GET, and the lease is released."""
        looked_up = self.server_index.blob_size

        def missed_once(digest: str) -> Any:
            # The answer the lookup got just before the owner recorded the blob.
            self.patch(self.server_index, "blob_size", looked_up)
            self.owner_stores_it()
            return succeed(None)

        self.patch(self.server_index, "blob_size", missed_once)
        asked = self.blob(A, self.digest)
        self.settle()
        source = self.successResultOf(asked)
        self.assertIsInstance(source, StoredBlob)
        self.assertEqual(self.received(source), self.content)
        source.close()
        self.assertEqual(self.a.count("GET", self.digest), 0)
        self.assertEqual(self.cluster.held, [])
        self.assertEqual(self.index.raw.execute("SELECT count(*) FROM downloads").fetchone()[0], 0)
        self.assertEqual(len(self.downloads), 0)

    def test_fresh_claim_of_an_unrecorded_blob_downloads(self) -> None:
        """Without the blob in the index, the fresh claim downloads it from upstream once, as before."""
        asked = self.blob(A, self.digest)
        self.settle()
        source = self.successResultOf(asked)
        self.settle()
        self.assertEqual(self.a.count("GET", self.digest), 1)
        self.assertEqual(self.index.blob_size(self.digest), len(self.content))
        self.assertEqual(self.cluster.held, [])
        source.close()
