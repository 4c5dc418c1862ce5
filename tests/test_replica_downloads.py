"""Replicas download each blob once between them, stream it to every client meanwhile, and take over a dead owner."""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import psycopg
import treq
from twisted.internet.defer import Deferred, DeferredList

from ociregistry.s3 import key_for
from tests.fakes import Behaviour, FakeRegistry, digest_of, listen, make_image, wait
from tests.realparts import Registry, Server, WebClient, log_settled, start_registry, start_relay, upload_blob
from tests.services import ReplicaTestCase, until
from tests.test_replicas import MIB

# The download takes seconds through the paced upstream, so every client joins it while it runs.
BLOB_SIZE = 256 * MIB
# The blob a killed owner was downloading: it comes again whole, so smaller.
TAKEN_OVER_SIZE = 64 * MIB
CLIENTS = 16


class Received:
    """One client's GET of the blob: when its first byte and its end came, and what its bytes hash to."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.done: float | None = None
        self.code: int | None = None
        self.size = 0
        self._hash = hashlib.sha256()

    @property
    def digest(self) -> str:
        """The digest of the bytes received."""
        return f"sha256:{self._hash.hexdigest()}"

    def get(self, web: WebClient, url: str) -> "Deferred[None]":
        """GET the blob, hashing it as it comes."""
        return Deferred.fromCoroutine(self._get(web, url))

    async def _get(self, web: WebClient, url: str) -> None:
        response = await web.client.get(url)
        self.code = response.code

        def received(data: bytes) -> None:
            if self.first is None:
                self.first = time.monotonic()
            self.size += len(data)
            self._hash.update(data)

        await treq.collect(response, received)
        self.done = time.monotonic()


class ReplicaDownloadTests(ReplicaTestCase):
    """Three replicas, one upstream: distribution behind a relay that paces its blob bytes."""

    async def upstream(self, size: int, rate: float, address: str) -> tuple[str, str, Registry]:
        """A real registry holding one uncached blob, reached through a paced relay: (host, digest, registry)."""
        registry = await start_registry(self.path("registry"), test=self, address="127.0.25.1")
        digest = await upload_blob(registry, "team/app", os.urandom(size))
        relay = await start_relay(registry, test=self, rate=rate, address=address)
        return relay.host, digest, registry

    async def replicas_of(self, fake: FakeRegistry) -> tuple[int, list[Server], WebClient]:
        """Three replicas of a fake upstream, and a client: (the upstream's port, the replicas, the client)."""
        port, listening = await listen(fake)
        self.addCleanup(listening.stopListening)
        registries = [{"name": f"127.0.0.1:{port}", "scheme": "http"}]
        replicas = [await self.replica(name, registries) for name in "abc"]
        web = WebClient()
        self.addCleanup(web.close)
        return port, replicas, web

    async def test_one_upstream_get_streamed_to_every_client(self) -> None:
        """16 concurrent GETs of one uncached blob over 3 replicas: one upstream GET, every client
        gets bytes while it downloads, every body verifies, and one copy is stored."""
        host, digest, registry = await self.upstream(BLOB_SIZE, 64 * MIB, "127.0.25.2")
        registries = [{"name": host, "scheme": "http"}]
        replicas = [await self.replica(name, registries) for name in "abc"]
        web = WebClient()
        self.addCleanup(web.close)
        clients = [Received() for _ in range(CLIENTS)]
        started = time.monotonic()
        await DeferredList([
            client.get(web, f"{replicas[i % 3].url}/v2/team/app/blobs/{digest}?ns={host}")
            for i, client in enumerate(clients)], fireOnOneErrback=True, consumeErrors=True)
        wall = time.monotonic() - started
        self.assertEqual({(c.code, c.size, c.digest) for c in clients}, {(200, BLOB_SIZE, digest)})
        first = max(c.first for c in clients if c.first is not None) - started
        ended = min(c.done for c in clients if c.done is not None) - started
        # No client can end before the download is verified: each had bytes before any ended.
        self.assertLess(first, ended)
        await registry.settled()
        self.assertEqual(registry.count_requests("GET", f"/blobs/{digest}"), 1)
        self.assertEqual(await until(lambda: self.s3.stat(key_for(digest))), BLOB_SIZE)
        self.assertEqual(await self.s3.uploads(), [])
        logs = [replica.log_text() for replica in replicas]
        self.assertEqual(sum(text.count("Fetched blob ") for text in logs), 1)
        self.assertEqual(sum(text.count("Streamed blob ") for text in logs), 2)
        with psycopg.connect(self.database) as db:
            self.assertEqual(db.execute("SELECT count(*) FROM downloads").fetchone(), (0,))
        print(f"\n{CLIENTS} clients, 3 replicas, {BLOB_SIZE // MIB} MiB: 1 upstream GET; last first byte "
              f"{first:.2f} s, first end {ended:.2f} s, wall {wall:.2f} s")

    async def test_killed_owner_is_taken_over(self) -> None:
        """kill -9 of the replica downloading a blob: a client streaming it through another replica
        still gets all of it once that replica takes over the expired lease; a retry is served too."""
        host, digest, registry = await self.upstream(TAKEN_OVER_SIZE, 16 * MIB, "127.0.25.3")
        registries = [{"name": host, "scheme": "http"}]
        lease = ("--lease-seconds", "2")
        a = await self.replica("a", registries, args=lease)
        b = await self.replica("b", registries, args=lease)
        web = WebClient()
        self.addCleanup(web.close)
        path = f"/v2/team/app/blobs/{digest}?ns={host}"
        owner, follower = Received(), Received()
        owning = owner.get(web, a.url + path)
        owning.addErrback(lambda failure: None)
        await until(lambda: _now(owner.first))
        following = follower.get(web, b.url + path)
        await until(lambda: _now(follower.first))
        self.assertIn(f"owner=http://127.0.0.1:{a.port}", await _leases(self.database))
        await a.kill()
        killed = time.monotonic()
        await following
        recovered = time.monotonic() - killed
        self.assertEqual((follower.code, follower.size, follower.digest), (200, TAKEN_OVER_SIZE, digest))
        retry = Received()
        await retry.get(web, b.url + path)
        self.assertEqual((retry.code, retry.digest), (200, digest))
        await log_settled(b.log_path)
        self.assertIn("Fetched blob ", b.log_text())
        self.assertIn("claiming it again", b.log_text())
        await registry.settled()
        self.assertEqual(registry.count_requests("GET", f"/blobs/{digest}"), 2)
        self.assertEqual(await until(lambda: self.s3.stat(key_for(digest))), TAKEN_OVER_SIZE)
        # The lease expires, then the whole blob comes again at 16 MiB/s: bounded.
        self.assertLess(recovered, 2 + 2 * TAKEN_OVER_SIZE / (16 * MIB) + 6)
        print(f"\nowner killed: the follower's client got all {TAKEN_OVER_SIZE // MIB} MiB "
              f"{recovered:.1f} s later")

    async def test_owner_upstream_failure_reaches_every_client(self) -> None:
        """An upstream answering 500 for a blob: the clients of every replica get a JSON 5xx,
        none waits for a lease."""
        fake = FakeRegistry()
        blob = os.urandom(MIB)
        digest = digest_of(blob)
        fake.blobs[digest] = blob
        fake.behaviour[digest] = Behaviour(status=500)
        port, replicas, web = await self.replicas_of(fake)
        started = time.monotonic()
        answers = await DeferredList([
            Deferred.fromCoroutine(_answer(web, f"{replicas[i % 3].url}/v2/app/blobs/{digest}?ns=127.0.0.1:{port}"))
            for i in range(6)], fireOnOneErrback=True, consumeErrors=True)
        elapsed = time.monotonic() - started
        for _, (code, answer) in answers:
            self.assertGreaterEqual(code, 500)
            self.assertEqual(answer["errors"][0]["code"], "UNAVAILABLE")
        # Well within one 30 s lease: the owner's lease ends with its download.
        self.assertLess(elapsed, 15)
        with psycopg.connect(self.database) as db:
            self.assertEqual(db.execute("SELECT count(*) FROM downloads").fetchone(), (0,))
        self.assertIsNone(await self.s3.stat(key_for(digest)))

    async def test_cold_manifest_through_every_replica_at_once(self) -> None:
        """One cold tag asked of 3 replicas at once, 4 clients each: one upstream HEAD and GET between them,
        every answer is the manifest, one row records it; then its digest likewise, cold on another path."""
        fake = FakeRegistry()
        image = make_image(os.urandom(2000))
        fake.add_image("app", "v1", image)
        port, replicas, web = await self.replicas_of(fake)

        async def get(url: str) -> tuple[int, bytes, tuple[str, ...]]:
            response = await web.client.get(url)
            return (response.code, await response.content(),
                    tuple(response.headers.getRawHeaders("docker-content-digest")))

        async def ask_all(path: str) -> set[tuple[int, bytes, tuple[str, ...]]]:
            fake.holding = True
            asking = DeferredList([
                Deferred.fromCoroutine(get(f"{replicas[i % 3].url}/v2/{path}?ns=127.0.0.1:{port}"))
                for i in range(12)], fireOnOneErrback=True, consumeErrors=True)
            # Every replica has asked (the leader upstream, the others the leader) before upstream answers.
            await until(lambda: _now(len(fake._held) or None))
            await wait(0.5)
            fake.release()
            return {answer for _, answer in await asking}

        self.assertEqual(await ask_all("app/manifests/v1"), {(200, image.manifest, (image.digest,))})
        self.assertEqual((fake.count("HEAD", "/manifests/v1"), fake.count("GET", "/manifests/")), (1, 1))
        with psycopg.connect(self.database) as db:
            self.assertEqual(db.execute("SELECT count(*) FROM manifests WHERE digest = %s",
                                        (image.digest,)).fetchone(), (1,))
        self.assertEqual(await until(lambda: self.s3.stat(key_for(image.digest))), len(image.manifest))
        # A cold manifest by digest likewise.
        other = make_image(os.urandom(2000))
        fake.add_image("other", "v2", other)
        self.assertEqual(await ask_all(f"other/manifests/{other.digest}"), {(200, other.manifest, (other.digest,))})
        self.assertEqual(fake.count("GET", f"/manifests/{other.digest}"), 1)
        for replica in replicas:
            await log_settled(replica.log_path)
        logs = [replica.log_text() for replica in replicas]
        self.assertEqual(sum(text.count("Pulling manifest ") for text in logs), 2)
        with psycopg.connect(self.database) as db:
            self.assertEqual(db.execute("SELECT count(*) FROM downloads").fetchone(), (0,))

async def _answer(web: WebClient, url: str) -> tuple[int, Any]:
    """A GET's status and its JSON body."""
    response = await web.client.get(url)
    return response.code, json.loads(await response.content())


async def _now(value: object) -> object:
    """A value as an answer to ask for until it is there."""
    return value


async def _leases(database: str) -> str:
    """Who owns each download lease in the index."""
    with psycopg.connect(database) as db:
        rows = db.execute("SELECT owner FROM downloads").fetchall()
    return " ".join(f"owner={owner}" for (owner,) in rows)
