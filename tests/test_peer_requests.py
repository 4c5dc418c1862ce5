"""A request from another replica is answered from this replica's store or own upstream download, never passed on."""

from __future__ import annotations

import json
import os

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from ociregistry.cluster import PEER_HEADER, Ours, Peer
from ociregistry.downloads import BlobDownload, Downloads
from ociregistry.errors import ServiceUnavailable
from ociregistry.grammar import Upstream as Where
from ociregistry.metrics import Metrics
from ociregistry.site import RegistryRequest
from ociregistry.web import RegistryAPI
from tests.fakes import digest_of
from tests.test_downloads import A, CacheOverStubs

OWNER = "http://10.0.0.11:8080"


class Claims:
    """A cluster that records claims, and names another replica as the owner of every blob."""

    url = "http://10.0.0.12:8080"

    def __init__(self) -> None:
        self.claims: list[tuple[str, str]] = []

    async def claim(self, registry: str, digest: str) -> Ours | Peer:
        """Record the claim; the other replica owns it."""
        self.claims.append((registry, digest))
        return Peer(OWNER, 2e9)


class SilentOwner:
    """An agent to the owner that never answers."""

    def __init__(self) -> None:
        self.asked: list[bytes] = []

    def request(self, method: bytes, uri: bytes, headers: object = None, body: object = None) -> Deferred[object]:
        """Record the URL; no answer ever comes."""
        self.asked.append(uri)
        return Deferred()


class PeerRequestTests(CacheOverStubs):
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

    def get(self, peer: bool) -> tuple[int, bytes]:
        """GET the blob through the API, as a peer or as a client: (status, body)."""
        headers = {PEER_HEADER: [OWNER.encode("ascii")]} if peer else {}
        answered = self.http.get(f"http://replica/app/blobs/{self.digest}?ns={A}", headers=headers)
        self.settle()
        response = self.successResultOf(answered)
        body = self.http.content(response)
        self.settle()
        self.http.flush()
        return response.code, self.successResultOf(body)

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
