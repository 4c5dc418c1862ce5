"""Replicas on one index: download leases (one owner per blob, renewal, takeover), streaming from a peer,
and pruning that spares what a replica downloads or serves and runs on one replica at a time."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import psycopg
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.python.failure import Failure
from twisted.web.client import Agent
from twisted.web.server import NOT_DONE_YET, Request, Site
from treq import content
from treq.testing import RequestTraversalAgent

from ociregistry.cluster import PEER_HEADER, Cluster, Ours, Peer, PeerRefused, open_from_peer, peer_url
from ociregistry.config import PruneSettings
from ociregistry.index import PRUNE_LOCK, Index, IndexConnection, Reference, utc
from ociregistry.postgres import PostgresEngine
from ociregistry.prune import Criteria, parse_patterns, prune, prune_pass
from ociregistry.sqlite import SqliteEngine
from ociregistry.store import BlobStore
from tests.fakes import connection_of, digest_of
from tests.postgres_service import fresh_database
from tests.realparts import free_port, http_request, start_server
from tests.test_load import run_cli
from tests.test_store import inline

LEASE = 30.0
BLOB = "sha256:" + "b" * 64
A, B, C = "http://127.0.23.1:5000", "http://127.0.23.2:5000", "http://127.0.23.3:5000"


class LeaseCases:
    """Leases on any engine: ``self.index`` is a connection to an empty index, ``self.now`` a time."""

    index: IndexConnection
    now: float
    assertEqual: Any
    assertIsNone: Any

    def claim(self, owner: str, at: float = 0.0) -> str:
        """Who owns BLOB after ``owner`` claims it ``at`` seconds after ``self.now``."""
        return self.index.claim_download("docker.io", BLOB, owner, self.now + at, LEASE)[0]

    def test_two_claimants_one_owner(self) -> None:
        """Of two replicas claiming one blob, the first owns it and the second is told so; other keys are apart."""
        self.assertEqual((self.claim(A), self.claim(B), self.claim(A)), (A, A, A))
        self.assertEqual(self.index.claim_download("quay.io", BLOB, B, self.now, LEASE)[0], B)
        self.assertEqual(self.index.download_owner("docker.io", BLOB, self.now), A)

    def test_expired_lease_taken_over(self) -> None:
        """A lease not renewed is taken by the next claimant once it expires, not a second before."""
        self.claim(A)
        self.assertEqual(self.claim(B, at=LEASE - 1), A)
        self.assertEqual(self.claim(B, at=LEASE), B)
        self.assertEqual(self.claim(C, at=LEASE + 1), B)
        self.assertIsNone(self.index.download_owner("docker.io", BLOB, self.now + 2 * LEASE))

    def test_renewal_keeps_it(self) -> None:
        """A renewed lease outlives its first expiry; only its owner can renew it."""
        self.claim(A)
        key = [("docker.io", BLOB)]
        self.assertEqual(self.index.renew_downloads(key, A, self.now + 20, LEASE), [])
        self.assertEqual(self.claim(B, at=LEASE + 10), A)
        self.assertEqual(self.index.renew_downloads(key, B, self.now + 20, LEASE), key)

    def test_release_frees_it(self) -> None:
        """A released lease goes to the next claimant at once; a release by another replica changes nothing."""
        self.claim(A)
        key = [("docker.io", BLOB)]
        self.index.release_downloads(key, B)
        self.assertEqual(self.claim(C), A)
        self.index.release_downloads(key, A)
        self.assertEqual(self.claim(B), B)
        self.assertEqual(self.index.release_downloads_of(B), 1)
        self.assertIsNone(self.index.download_owner("docker.io", BLOB, self.now))


class SqliteLeaseTests(LeaseCases, SynchronousTestCase):
    """The lease cases on the embedded index."""

    def setUp(self) -> None:
        self.now = 1_700_000_000.0
        server = Index(SqliteEngine(self.mktemp(), Clock()))
        self.addCleanup(server.close)
        self.index = connection_of(server)


class PostgresLeaseTests(LeaseCases, SynchronousTestCase):
    """The lease cases on PostgreSQL."""

    def setUp(self) -> None:
        self.now = 1_700_000_000.0
        self.index = PostgresEngine(fresh_database(self), Clock()).connect()
        self.addCleanup(self.index.close)


class ClusterTests(SynchronousTestCase):
    """A replica's leases on a clock: claims, renewal on a timer, takeover after failure, release."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.index = Index(SqliteEngine(self.mktemp(), self.clock))
        self.addCleanup(self.index.close)
        self.a, self.b = (Cluster(self.index, url, self.clock, LEASE) for url in (A, B))

    def claim(self, cluster: Cluster) -> Ours | Peer:
        return self.successResultOf(Deferred.fromCoroutine(cluster.claim("docker.io", BLOB)))

    def expires(self) -> str:
        """When the lease of BLOB ends, as the index says."""
        return str(connection_of(self.index).raw.execute("SELECT expires FROM downloads").fetchone()[0])

    def test_renewed_every_third_of_a_lease(self) -> None:
        """The lease service renews every 10 s of a 30 s lease, so it outlives its expiry; at stop it is released."""
        start = self.clock.seconds()
        service = self.a.service()
        service.startService()
        self.assertIsInstance(self.claim(self.a), Ours)
        self.clock.advance(9.5)
        self.assertEqual(self.expires(), utc(start + LEASE))
        self.clock.advance(0.5)
        self.assertEqual(self.expires(), utc(start + 10 + LEASE))
        for _ in range(10):
            self.clock.advance(10)
        self.assertEqual(self.expires(), utc(start + 110 + LEASE))
        self.assertEqual(self.claim(self.b), Peer(A, start + 110 + LEASE))
        self.successResultOf(service.stopService())
        self.assertEqual(self.a.held, [])
        self.assertIsInstance(self.claim(self.b), Ours)

    def test_lost_lease_is_dropped(self) -> None:
        """A lease left unrenewed past its expiry goes to another replica; the next renewal drops it, and the
        first owner's release at the end of its download leaves the new owner's lease alone."""
        ours = self.claim(self.a)
        assert isinstance(ours, Ours)
        self.clock.advance(LEASE)
        self.assertIsInstance(self.claim(self.b), Ours)
        self.successResultOf(Deferred.fromCoroutine(self.a.renew()))
        self.assertEqual((self.a.held, self.b.held), ([], [("docker.io", BLOB)]))
        self.successResultOf(Deferred.fromCoroutine(self.a.release("docker.io", BLOB)))
        self.assertEqual(self.claim(self.a), Peer(B, self.clock.seconds() + LEASE))

    def test_renewal_racing_a_release(self) -> None:
        """A lease released and claimed anew while a renewal was on its way is not taken for lost."""
        renewing: Deferred[list[tuple[str, str]]] = Deferred()
        run = self.index.run

        def slow_renewal(interaction: Any, *args: Any) -> Any:
            return renewing if interaction is IndexConnection.renew_downloads else run(interaction, *args)

        self.patch(self.index, "run", slow_renewal)
        first = self.claim(self.a)
        renewal = Deferred.fromCoroutine(self.a.renew())
        self.successResultOf(Deferred.fromCoroutine(self.a.release("docker.io", BLOB)))
        second = self.claim(self.a)
        assert isinstance(first, Ours) and isinstance(second, Ours)
        renewing.callback([("docker.io", BLOB)])
        self.successResultOf(renewal)
        self.assertEqual(self.a.held, [("docker.io", BLOB)])

    def test_takeover_waits_for_expiry(self) -> None:
        """A follower whose peer died claims again when the lease expires, and becomes the owner."""
        peer = self.claim(self.a)
        peer = self.claim(self.b)
        assert isinstance(peer, Peer)
        self.clock.advance(5)
        after = Deferred.fromCoroutine(self.b.claim_after("docker.io", BLOB, peer))
        self.clock.advance(LEASE - 6)
        self.assertNoResult(after)
        self.clock.advance(1)
        self.assertIsInstance(self.successResultOf(after), Ours)

    def test_live_peer_followed_again(self) -> None:
        """A follower whose stream broke while the peer keeps renewing is sent back to that peer."""
        self.claim(self.a)
        peer = self.claim(self.b)
        assert isinstance(peer, Peer)
        after = Deferred.fromCoroutine(self.b.claim_after("docker.io", BLOB, peer))
        self.clock.advance(20)
        self.successResultOf(Deferred.fromCoroutine(self.a.renew()))
        self.clock.advance(LEASE - 20)
        self.assertEqual(self.successResultOf(after), Peer(A, peer.expires + 20))

    def test_release_and_restart(self) -> None:
        """A released lease is the next claimant's; a restarted replica drops the leases of its previous life."""
        self.claim(self.a)
        self.successResultOf(Deferred.fromCoroutine(self.a.release("docker.io", BLOB)))
        self.assertIsInstance(self.claim(self.b), Ours)
        again = Cluster(self.index, B, self.clock, LEASE)
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(again.start())), 1)
        self.assertIsInstance(self.claim(self.a), Ours)


class _Blob(Resource):
    """A peer's blob: the first half at once, the rest when the test says."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []

    def render_GET(self, request: Request) -> bytes | int:
        self.requests.append(request)
        if b"missing" in request.uri:
            request.setResponseCode(404)
            return b'{"errors": []}'
        request.write(b"first half ")
        return NOT_DONE_YET


class PeerTests(SynchronousTestCase):
    """Streaming a blob from the replica downloading it, through its /v2/ API."""

    def test_url(self) -> None:
        """The peer's base path is kept and the registry is the ``ns`` parameter; other schemes are refused."""
        self.assertEqual(peer_url("https://peer:8443/cache/", "quay.io", "team/app", "blobs", BLOB),
                         f"https://peer:8443/cache/v2/team/app/blobs/{BLOB}?ns=quay.io".encode())
        for url in ("file:///etc/passwd", "ftp://peer/", "http:///v2", "gopher://x", "http://peer/?a=b", "peer:80"):
            self.assertRaises(PeerRefused, peer_url, url, "quay.io", "team/app", "blobs", BLOB)

    def test_streams_before_the_end(self) -> None:
        """The response comes with the bytes the peer has sent so far; the request names the asking replica."""
        blob = _Blob()
        agent = RequestTraversalAgent(blob)
        response = self.successResultOf(Deferred.fromCoroutine(
            open_from_peer(agent, "http://peer", "quay.io", "team/app", "blobs", BLOB, A)))
        self.assertEqual(response.code, 200)
        (request,) = blob.requests
        self.assertEqual(request.args, {b"ns": [b"quay.io"]})
        self.assertEqual(request.getHeader(PEER_HEADER), A.encode())
        body = content(response)
        agent.flush()
        self.assertNoResult(body)
        request.write(b"and the rest")
        request.finish()
        agent.flush()
        self.assertEqual(self.successResultOf(body), b"first half and the rest")

    def test_refusal(self) -> None:
        """A peer's answer other than 200 is PeerRefused; a refused URL sends nothing."""
        blob = _Blob()
        agent = RequestTraversalAgent(blob)
        failure = self.failureResultOf(Deferred.fromCoroutine(
            open_from_peer(agent, "http://peer", "quay.io", "missing", "blobs", BLOB, A)))
        failure.trap(PeerRefused)
        self.failureResultOf(Deferred.fromCoroutine(
            open_from_peer(agent, "file:///", "quay.io", "x", "blobs", BLOB, A))).trap(PeerRefused)
        self.assertEqual(len(blob.requests), 1)


class PeerSocketTests(TestCase):
    """A peer on a real socket: its bytes arrive as it sends them; when it is gone, the follower takes over."""

    timeout = 30

    async def test_bytes_before_the_end(self) -> None:
        """Over TCP, the first half of a blob reaches the follower while the peer still holds back the rest."""
        blob = _Blob()
        port = await serverFromString(reactor, "tcp:0:interface=127.0.23.1").listen(Site(blob))
        self.addCleanup(port.stopListening)
        peer = f"http://127.0.23.1:{port.getHost().port}"
        response = await open_from_peer(Agent(reactor), peer, "quay.io", "team/app", "blobs", BLOB, A)
        arrived: Deferred[bytes] = Deferred()
        received = _Received(arrived)
        response.deliverBody(received)
        self.assertEqual(await arrived, b"first half ")
        (request,) = blob.requests
        self.assertFalse(request.finished)
        request.write(b"and the rest")
        request.finish()
        await received.done
        self.assertEqual(b"".join(received.chunks), b"first half and the rest")

    async def test_unreachable_peer_taken_over(self) -> None:
        """A follower that cannot reach the owner gets a connection error, and owns the download once the lease ends."""
        clock = Clock()
        clock.advance(1_700_000_000)
        index = Index(SqliteEngine(self.mktemp(), clock))
        self.addCleanup(index.close)
        dead = f"http://127.0.23.2:{free_port('127.0.23.2')}"
        owner, follower = Cluster(index, dead, clock, LEASE), Cluster(index, A, clock, LEASE)
        await owner.claim("docker.io", BLOB)
        peer = await follower.claim("docker.io", BLOB)
        assert isinstance(peer, Peer)
        with self.assertRaises(ConnectError):
            await open_from_peer(Agent(reactor), peer.url, "docker.io", "library/x", "blobs", BLOB, A)
        after = Deferred.fromCoroutine(follower.claim_after("docker.io", BLOB, peer))
        clock.advance(LEASE - 1)
        self.assertNoResult(after)
        clock.advance(1)
        self.assertIsInstance(await after, Ours)


class _Received(Protocol):
    """A body's chunks; ``arrived`` fires with the first, ``done`` at the end."""

    def __init__(self, arrived: "Deferred[bytes]") -> None:
        self.arrived = arrived
        self.chunks: list[bytes] = []
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        if len(self.chunks) == 1:
            self.arrived.callback(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(None)


class PostgresClusterTests(TestCase):
    """Many replicas claiming at once on PostgreSQL: one owner, whatever the interleaving."""

    timeout = 120

    def test_threads_racing(self) -> None:
        """16 connections released at once by a barrier, each claiming one blob, agree on a single owner."""
        url = fresh_database(self)
        PostgresEngine(url, reactor).connect().close()
        barrier = threading.Barrier(16)
        owners: list[str] = []

        def race(number: int) -> None:
            connection = PostgresEngine(url, reactor).connect()
            try:
                barrier.wait()
                owners.append(connection.claim_download("docker.io", BLOB, f"http://r{number}", time.time(), LEASE)[0])
            finally:
                connection.close()

        threads = [threading.Thread(target=race, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertEqual(len(owners), 16)
        self.assertEqual(len(set(owners)), 1, owners)

    async def test_hundred_replicas(self) -> None:
        """100 replicas claiming one blob at once through the server's pool: exactly one is told Ours."""
        index = Index(PostgresEngine(fresh_database(self), reactor, pool_size=8))
        self.addCleanup(index.close)
        clusters = [Cluster(index, f"http://r{n}", reactor, LEASE) for n in range(100)]
        results = await gatherResults([Deferred.fromCoroutine(c.claim("docker.io", BLOB)) for c in clusters])
        ours = [c.url for c, result in zip(clusters, results) if isinstance(result, Ours)]
        self.assertEqual(len(ours), 1)
        self.assertEqual({result.url for result in results if isinstance(result, Peer)}, set(ours))


class PruneCases:
    """Pruning beside replicas, on any engine: ``self.index`` a connection, ``self.store`` its files."""

    index: IndexConnection
    store: BlobStore
    assertEqual: Any
    assertTrue: Any
    assertFalse: Any

    def image(self, repository: str, pulled: float) -> tuple[str, str]:
        """A tagged image with one layer file, pulled ``pulled`` seconds ago: (manifest, layer)."""
        layer = os.urandom(64)
        digest = digest_of(layer)
        writer = self.store.begin(digest)
        writer.write(layer)
        Deferred.fromCoroutine(writer.commit())
        self.index.record_blob(digest, len(layer))
        manifest = digest_of(repository.encode())
        self.index.record_manifest(manifest, "m", 10, "quay.io", repository,
                                   [Reference(digest, "layer", "l", len(layer))], tag="v1")
        moment = utc(self.index.seconds() - pulled)
        self.index.set_times(manifest, moment, moment)
        return manifest, digest

    def prune(self, repository: str, **options: Any) -> tuple[int, int, int]:
        """Prune an image by name: how many images, manifests and blobs went."""
        removal = prune(self.index, self.store, Criteria(patterns=parse_patterns(repository)), **options)
        return len(removal.images), len(removal.manifests), len(removal.blobs)

    def test_blob_under_lease_survives(self) -> None:
        """A blob some replica is downloading keeps its row and file while its image is pruned; without, it goes."""
        _, leased = self.image("team/leased", pulled=3600)
        _, free = self.image("team/free", pulled=3600)
        self.index.claim_download("quay.io", leased, B, self.index.seconds(), LEASE)
        self.assertEqual(self.prune("team/leased"), (1, 1, 0))
        self.assertEqual(self.index.blob_size(leased), 64)
        self.assertTrue(os.path.exists(self.store.path_for(leased)))
        self.assertEqual(self.prune("team/free"), (1, 1, 1))
        self.assertFalse(os.path.exists(self.store.path_for(free)))
        self.index.release_downloads([("quay.io", leased)], B)
        self.assertEqual(self.prune("nothing", grace=0.0), (0, 0, 1))


class SqlitePruneTests(PruneCases, SynchronousTestCase):
    """On the embedded index: leases are spared, and nothing else is kept back (its readers hold files open)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(time.time())
        root = self.mktemp()
        self.store = BlobStore(root, inline)
        self.store.prepare()
        server = Index(SqliteEngine(os.path.join(root, "index.db"), self.clock))
        self.addCleanup(server.close)
        self.index = connection_of(server)

    def test_no_grace(self) -> None:
        """An image pulled a moment ago is pruned at once on one node."""
        self.image("team/app", pulled=1)
        self.assertEqual(self.prune("team/app"), (1, 1, 1))


class PostgresPruneTests(PruneCases, TestCase):
    """On PostgreSQL: a grace for what replicas may be serving, and background pruning on one replica at a time."""

    timeout = 120

    def setUp(self) -> None:
        self.url = fresh_database(self)
        root = self.mktemp()
        self.store = BlobStore(root, inline)
        self.store.prepare()
        self.index = PostgresEngine(self.url, reactor).connect()
        self.addCleanup(self.index.close)

    def test_recent_pulls_kept(self) -> None:
        """Images pulled and unused blobs recorded in the last 10 minutes stay, unless the grace is set to 0."""
        self.image("team/recent", pulled=300)
        orphan = digest_of(b"orphan")
        self.index.record_blob(orphan, 6)
        self.assertEqual(self.prune("team/recent"), (0, 0, 0))
        self.assertEqual(self.prune("team/recent", dry_run=True, grace=0.0), (1, 1, 2))
        self.assertEqual(self.prune("team/recent", grace=0.0), (1, 1, 2))

    async def test_cli_grace(self) -> None:
        """`ociregistry prune` on a shared index keeps an image pulled 5 minutes ago, unless given --grace 0."""
        self.image("team/app", pulled=300)
        common = ("prune", "--index-url", self.url, "--image-path", self.store.root, "--pattern", "team/app")
        kept = await run_cli(*common)
        self.assertEqual(kept.returncode, 0, kept.stderr)
        self.assertIn("removed 0 images, 0 manifests, 0 blobs", kept.stdout)
        pruned = await run_cli(*common, "--grace", "0")
        self.assertIn("removed 1 images, 1 manifests, 1 blobs", pruned.stdout)
        refused = await run_cli(*common, "--grace", "soon")
        self.assertEqual(refused.returncode, 1, refused.stdout)
        self.assertIn("invalid duration 'soon'", refused.stderr)

    async def test_admin_prune(self) -> None:
        """The admin API's prune on a shared index spares a leased blob and recent pulls, unless grace=0."""
        _, leased = self.image("team/old", pulled=3600)
        self.image("team/new", pulled=60)
        self.index.claim_download("quay.io", leased, B, self.index.seconds(), LEASE)
        port = free_port("127.0.23.1")
        await start_server(self.store.root, test=self, args=(
            "--index-url", self.url, "--admin-listen", f"tcp:{port}:interface=127.0.23.1"))
        prune = f"http://127.0.23.1:{port}/cmd/prune?type=pattern&expr=team&dryRun=false&format=json"
        response, body = await http_request("DELETE", prune)
        self.assertEqual(response.code, 200, body)
        removed = json.loads(body)
        self.assertEqual((removed["images"], removed["blobs"]), (["quay.io/team/old:v1"], []))
        self.assertEqual(self.index.blob_size(leased), 64)
        response, body = await http_request("DELETE", prune + "&grace=0")
        self.assertEqual(json.loads(body)["images"], ["quay.io/team/new:v1"])
        response, body = await http_request("DELETE", prune + "&grace=later")
        self.assertEqual(response.code, 400)
        self.assertIn(b"grace: invalid duration 'later'", body)

    async def test_one_background_prune_at_a_time(self) -> None:
        """While another replica holds the prune lock, a background pass skips (and says so); then it prunes."""
        manifest, _ = self.image("team/app", pulled=3600)
        index = Index(PostgresEngine(self.url, reactor))
        self.addCleanup(index.close)
        settings = PruneSettings(enabled=True, type="pattern", expr="team/app", dry_run=False)
        said = logged(self)
        other = psycopg.connect(self.url, autocommit=True)
        self.addCleanup(other.close)
        self.assertTrue(other.execute("SELECT pg_try_advisory_lock(%s)", (PRUNE_LOCK,)).fetchone()[0])
        await prune_pass(index, self.store, settings, reactor, deferToThread)
        self.assertEqual(self.index.manifest(manifest).digest, manifest)  # type: ignore[union-attr]
        self.assertIn("Pruning (pattern) skipped: another replica is pruning the shared index", said)
        other.execute("SELECT pg_advisory_unlock(%s)", (PRUNE_LOCK,))
        await prune_pass(index, self.store, settings, reactor, deferToThread)
        self.assertEqual(self.index.manifest(manifest), None)

    async def test_two_passes_at_once(self) -> None:
        """Two replicas' passes started together: exactly one prunes, the other skips."""
        self.image("team/app", pulled=3600)
        settings = PruneSettings(enabled=True, type="pattern", expr="team/app", dry_run=False)
        said = logged(self)
        replicas = [Index(PostgresEngine(self.url, reactor)) for _ in range(2)]
        for replica in replicas:
            self.addCleanup(replica.close)
        holding = threading.Event()
        going = threading.Event()
        original = IndexConnection.cached_images

        def slow(connection: IndexConnection, every_manifest: bool = False) -> Any:
            # The first to hold the lock waits, inside its pass, until the other pass has ended.
            holding.set()
            going.wait(30)
            return original(connection, every_manifest)

        self.patch(IndexConnection, "cached_images", slow)
        first = Deferred.fromCoroutine(prune_pass(replicas[0], self.store, settings, reactor, deferToThread))
        await deferToThread(holding.wait, 30)
        await prune_pass(replicas[1], self.store, settings, reactor, deferToThread)
        going.set()
        await first
        passes = [line.splitlines()[0] for line in said if line.startswith("Pruning (pattern)")]
        self.assertEqual(passes, ["Pruning (pattern) skipped: another replica is pruning the shared index",
                                  "Pruning (pattern): removed 1 images, 1 manifests, 1 blobs, 74 bytes"])


def logged(test: SynchronousTestCase) -> list[str]:
    """The messages logged from now until the test ends."""
    said: list[str] = []

    def observe(event: LogEvent) -> None:
        said.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    test.addCleanup(globalLogPublisher.removeObserver, observe)
    return said
