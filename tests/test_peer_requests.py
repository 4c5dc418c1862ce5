"""A request from another replica is answered from this replica's store or own upstream download, never passed on."""

from __future__ import annotations

import json
import os

from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from ociregistry.cluster import PEER_HEADER, Cluster, Ours, Peer
from ociregistry.downloads import BlobDownload, Downloads
from ociregistry.errors import ServiceUnavailable
from ociregistry.grammar import Upstream as Where
from ociregistry.metrics import Metrics
from ociregistry.site import RegistryRequest
from ociregistry.web import RegistryAPI
from tests.fakes import digest_of, make_image
from tests.test_downloads import A, CacheOverStubs

OWNER = "http://10.0.0.11:8080"


class Claims(Cluster):
    """A cluster that records claims, and names another replica as the owner of every blob and manifest."""

    def __init__(self) -> None:
        super().__init__(None, "http://10.0.0.12:8080", Clock())  # type: ignore[arg-type]
        self.claims: list[tuple[str, str]] = []
        self.outlasting: list[Deferred[None]] = []

    async def claim(self, registry: str, digest: str) -> Ours | Peer:
        """Record the claim; the other replica owns it."""
        self.claims.append((registry, digest))
        return Peer(OWNER, 2e9)

    def outlast(self, registry: str, digest: str, poll: float = 0.5) -> Deferred[None]:  # type: ignore[override]
        """The other replica's download never ends (what waits for it, a prefetch, waits on)."""
        self.outlasting.append(Deferred())
        return self.outlasting[-1]


class SilentOwner:
    """An agent to the owner that never answers."""

    def __init__(self) -> None:
        self.asked: list[bytes] = []
        self.waiting: list[Deferred[object]] = []

    def request(self, method: bytes, uri: bytes, headers: object = None, body: object = None) -> Deferred[object]:
        """Record the URL; no answer ever comes (the request is held, as a connection holds it)."""
        self.asked.append(uri)
        waiting: Deferred[object] = Deferred()
        self.waiting.append(waiting)
        return waiting


class ReplicaOverStubs(CacheOverStubs):
    """A replica in a cluster, its upstream a fake registry, its API driven in memory."""

    def setUp(self) -> None:
        super().setUp()
        self.cluster = Claims()
        self.owner = SilentOwner()
        self.downloads = Downloads(self.store, self.server_index, self.upstream, Metrics(),  # type: ignore[arg-type]
                                   cluster=self.cluster, peers=self.owner)  # type: ignore[arg-type]
        self.addCleanup(lambda: Deferred.fromCoroutine(self.downloads.close()))
        self.cache._downloads = self.downloads
        self.http = StubTreq(RegistryAPI(self.cache, A, Metrics()))
        # The requests the server's site makes, which the API's access log reads.
        self.http._agent._serverFactory.requestFactory = RegistryRequest
        self.content = os.urandom(32 * 1024)
        self.digest = digest_of(self.content)
        self.a.blobs[self.digest] = self.content

    def get(self, peer: bool, path: str | None = None) -> tuple[int, bytes]:
        """GET the blob (or a path) through the API, as a peer or as a client: (status, body)."""
        headers = {PEER_HEADER: [OWNER.encode("ascii")]} if peer else {}
        answered = self.http.get(f"http://replica/{path or f'app/blobs/{self.digest}'}?ns={A}", headers=headers)
        self.settle()
        response = self.successResultOf(answered)
        body = self.http.content(response)
        self.settle()
        self.http.flush()
        return response.code, self.successResultOf(body)



class PeerRequestTests(ReplicaOverStubs):
    """A peer's blob request is downloaded here; a client's claims the blob."""

    def test_peer_request_is_downloaded_here(self) -> None:
        """A peer's request for an uncached blob is downloaded from upstream here, without a claim:
        it is never sent on to the owner."""
        self.assertEqual(self.get(peer=True), (200, self.content))
        self.assertEqual(self.cluster.claims, [])
        self.assertEqual(self.a.count("GET", self.digest), 1)
        self.assertEqual(self.index.blob_size(self.digest), len(self.content))

    def test_client_request_claims(self) -> None:
        """A client's request claims the blob, and asks the owner the claim names, not the upstream."""
        asking = Deferred.fromCoroutine(self.cache.blob(Where(A, "app"), self.digest))
        self.settle()
        self.assertNoResult(asking)
        self.assertEqual(self.cluster.claims, [(A, self.digest)])
        self.assertEqual(self.owner.asked, [f"{OWNER}/v2/app/blobs/{self.digest}?ns={A}".encode("ascii")])
        self.assertEqual(self.a.count("GET", self.digest), 0)
        self.successResultOf(Deferred.fromCoroutine(self.downloads.close()))
        self.assertEqual(self.failureResultOf(asking, ServiceUnavailable).value.status, 503)

    def test_peer_request_never_joins_a_relay(self) -> None:
        """A peer asking a replica that itself relays the blob gets a JSON 503, not the relayed bytes."""
        relay = BlobDownload(self.digest, self.store.begin(self.digest))
        relay.relayed_from = OWNER
        relay.begin(len(self.content))
        self.downloads._running[(A, self.digest)] = relay
        code, body = self.get(peer=True)
        self.assertEqual(code, 503)
        self.assertEqual(json.loads(body)["errors"][0]["code"], "UNAVAILABLE")
        self.assertIn(OWNER, json.loads(body)["errors"][0]["message"])
        # A client of this replica joins the relay.
        joined = Deferred.fromCoroutine(self.cache.blob(Where(A, "app"), self.digest))
        self.assertIs(self.successResultOf(joined), relay)
        self.assertEqual(self.a.count("GET", self.digest), 0)
        relay.fail(Failure(ServiceUnavailable("the test is over")))


class PeerManifestTests(ReplicaOverStubs):
    """Manifest fetches go the blobs' way: a client's claims, a peer's is fetched here."""

    def setUp(self) -> None:
        super().setUp()
        self.image = make_image(b"layer")
        self.a.add_image("app", "v1", self.image)

    def test_peer_manifest_request_is_fetched_here(self) -> None:
        """A peer asking for an uncached tag or digest gets the manifest fetched here, without a claim."""
        for reference in ("v1", self.image.digest):
            self.assertEqual(self.get(peer=True, path=f"app/manifests/{reference}"), (200, self.image.manifest))
        # (The image's blobs are prefetched, and claimed as blobs are.)
        self.assertEqual([subject for _, subject in self.cluster.claims if "@" in subject], [])
        self.assertEqual(self.a.count("GET", "/manifests/"), 1)

    def test_client_manifest_request_claims(self) -> None:
        """A client's request for an uncached tag claims it, and asks the owner rather than the upstream."""
        asking = self.manifest(A, "v1")
        self.settle()
        self.assertNoResult(asking)
        self.assertEqual(self.cluster.claims, [(A, "app@v1")])
        self.assertEqual(self.owner.asked, [f"{OWNER}/v2/app/manifests/v1?ns={A}".encode("ascii")])
        self.assertEqual(self.a.requests, [])
        asking.cancel()
        self.failureResultOf(asking, CancelledError)

    def test_peer_manifest_request_never_joins_a_follower(self) -> None:
        """A peer asking a replica that itself asks the owner gets a JSON 503 naming the owner."""
        asking = self.manifest(A, "v1")
        self.settle()
        code, body = self.get(peer=True, path="app/manifests/v1")
        self.assertEqual(code, 503)
        self.assertIn(OWNER, json.loads(body)["errors"][0]["message"])
        self.assertEqual(self.a.requests, [])
        asking.cancel()
        self.failureResultOf(asking, CancelledError)
