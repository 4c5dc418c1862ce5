"""A blob nobody waits to read (a prefetch, a load) is left to the replica downloading it, never relayed from it."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ociregistry.cluster import Cluster, Ours
from ociregistry.downloads import BlobDownload, Downloads
from ociregistry.index import Index, IndexConnection
from ociregistry.metrics import Metrics
from ociregistry.sqlite import SqliteEngine
from tests.test_cluster import LEASE, A, B

BLOB = "sha256:" + "c" * 64


class NoPeer:
    """An agent to the other replicas that must not be used."""

    def __init__(self) -> None:
        self.asked: list[bytes] = []

    def request(self, method: bytes, uri: bytes, headers: object = None, body: object = None) -> Deferred[object]:
        """Record the URL; no answer comes."""
        self.asked.append(uri)
        return Deferred()


class StoreWithoutRelayTests(SynchronousTestCase):
    """Replica B on a clock, sharing an index with replica A, which downloads the blob."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.index = Index(SqliteEngine(self.mktemp(), self.clock))
        self.addCleanup(self.index.close)
        self.a, self.b = (Cluster(self.index, url, self.clock, LEASE) for url in (A, B))
        self.peers = NoPeer()
        # Nothing is written nor fetched here: the store and upstream are never asked.
        self.downloads = Downloads(None, self.index, None, Metrics(), cluster=self.b,  # type: ignore[arg-type]
                                   peers=self.peers)  # type: ignore[arg-type]
        self.assertIsInstance(self.successResultOf(Deferred.fromCoroutine(self.a.claim("docker.io", BLOB))), Ours)

    def store(self) -> Deferred[BlobDownload | None]:
        return Deferred.fromCoroutine(self.downloads.store("docker.io", "app", BLOB))

    def test_waits_for_the_owner_then_finds_it_stored(self) -> None:
        """B waits while A holds the lease, asks A for nothing, and is done once A recorded the blob and let go."""
        stored = self.store()
        self.clock.advance(LEASE / 2)
        self.assertNoResult(stored)
        self.successResultOf(Deferred.fromCoroutine(self.a.renew()))
        self.clock.advance(LEASE / 2 + 1)
        self.assertNoResult(stored)
        self.successResultOf(self.index.record_blob(BLOB, 5))
        self.successResultOf(Deferred.fromCoroutine(self.a.release("docker.io", BLOB)))
        self.clock.advance(0.5)
        self.assertIsNone(self.successResultOf(stored))
        self.assertEqual((self.peers.asked, len(self.downloads)), ([], 0))

    def test_stored_between_the_look_and_the_claim(self) -> None:
        """A lease B gets just after A stored the blob and let go is released at once; nothing is downloaded."""
        self.successResultOf(Deferred.fromCoroutine(self.a.release("docker.io", BLOB)))
        real = self.index.blob_size
        looks: list[str] = []

        def blob_size(digest: str) -> Deferred[int | None]:
            looks.append(digest)
            if len(looks) == 1:
                # A records the blob right after B looked.
                self.successResultOf(self.index.record_blob(BLOB, 5))
                return succeed(None)
            return real(digest)

        self.index.blob_size = blob_size  # type: ignore[method-assign]
        self.assertIsNone(self.successResultOf(self.store()))
        self.assertEqual((len(looks), len(self.downloads), self.b.held), (2, 0, []))
        self.assertIsNone(self.index.run_blocking(IndexConnection.download_owner, "docker.io", BLOB,
                                                  self.clock.seconds()))
