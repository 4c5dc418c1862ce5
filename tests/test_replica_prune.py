"""A prune from one replica (its admin API, or the CLI with the shared configuration) never removes what
another replica is downloading, serving, or fetching again while the prune deletes objects.

tests/test_prune_bucket.py shows each kind of prune deleting the objects of the rows it removed, on an
index and bucket the test fills; here real replicas pull, download and serve while the prune runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import psycopg
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from ociregistry.index import Index, Reference, utc
from ociregistry.postgres import PostgresEngine
from ociregistry.s3 import key_for
from tests.postgres_service import fresh_database
from tests.realparts import (
    Server,
    ThrottledRelay,
    WebClient,
    free_port,
    start_registry,
    start_relay,
)
from tests.services import ReplicaTestCase, bucket_objects, shared_cache_problems, until
from tests.test_load import run_cli
from tests.test_replica_references import Published, publish_image, pull

MIB = 1024 * 1024


class SlowBody:
    """One client's GET of a blob, hashed as it arrives: how many bytes so far, and their digest at the end."""

    def __init__(self, web: WebClient, url: str) -> None:
        self.size = 0
        self.code: int | None = None
        self._hash = hashlib.sha256()
        self.done: Deferred[None] = Deferred.fromCoroutine(self._get(web, url))

    @property
    def digest(self) -> str:
        """The digest of the bytes received."""
        return f"sha256:{self._hash.hexdigest()}"

    async def _get(self, web: WebClient, url: str) -> None:
        response = await web.client.get(url)
        self.code = response.code

        def received(data: bytes) -> None:
            self.size += len(data)
            self._hash.update(data)

        await treq.collect(response, received)


class ReplicaPruneTests(ReplicaTestCase):
    """Replicas on one index and bucket; a prune runs through one while another works."""

    timeout = 180

    async def admin_prune(self, port: int, **query: str) -> str:
        """DELETE /cmd/prune on an admin API: its answer, which must be a 200."""
        web = WebClient()
        try:
            response = await web.client.delete(f"http://127.0.0.1:{port}/cmd/prune",
                                               params={"type": "pattern", "dryRun": "false", **query})
            text = (await response.content()).decode()
        finally:
            await web.close()
        self.assertEqual(response.code, 200, text)
        return text

    async def cli_prune(self, *args: str, endpoint: str | None = None) -> str:
        """``ociregistry prune`` with the shared configuration: its output, which must say it succeeded."""
        result = await run_cli("prune", "--config-file", self.shared_config(s3={"endpoint": endpoint} if endpoint else None), *args)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        return result.stdout

    def query(self, statement: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows of a query on the shared index."""
        with psycopg.connect(self.database) as db:
            return db.execute(statement, args).fetchall()

    async def admin_replica(self, name: str, registries: list[dict[str, Any]]) -> tuple[Server, int]:
        """A replica with an admin API on a free port: (replica, admin port)."""
        port = free_port()
        return await self.replica(name, registries, admin=f"tcp:{port}:interface=127.0.0.1"), port

    async def test_prune_while_another_replica_downloads(self) -> None:
        """While A downloads a blob under a lease, prunes through B's admin API and the CLI (selecting everything,
        no grace) leave it: the client's body verifies and the blob's row and object are there once it is done."""
        registry = await start_registry(self.path("registry"), test=self, address="127.0.32.6")
        relay = await start_relay(registry, test=self, rate=4 * MIB, address="127.0.32.16")
        image = Published("team/x", "v1")
        large = os.urandom(24 * MIB)
        await publish_image(registry, image, b'{"image": "x"}', [large, os.urandom(3000)], image.tag)
        layer = next(digest for digest, blob in image.blobs.items() if blob is large)
        registries = [{"name": relay.host, "scheme": "http"}]
        a = await self.replica("a", registries)
        _, admin = await self.admin_replica("b", registries)
        web = WebClient()
        self.addCleanup(web.close)
        response = await web.client.get(f"{a.url}/v2/team/x/manifests/v1?ns={relay.host}")
        await response.content()
        body = SlowBody(web, f"{a.url}/v2/team/x/blobs/{layer}?ns={relay.host}")

        def lease() -> list[tuple[Any, ...]]:
            return self.query("SELECT owner FROM downloads WHERE digest = %s AND expires > %s",
                              layer, "2000-01-01T00:00:00Z")

        self.assertEqual(await until(lambda: Deferred.fromCoroutine(_now(lease)), lambda rows: rows != []),
                         [(a.url,)])
        text = await self.admin_prune(admin, expr="team/x", grace="0")
        self.assertIn("removed 1 images, 1 manifests", text)
        self.assertNotIn(layer, text)
        output = await self.cli_prune("--pattern", ".", "--grace", "0")
        self.assertNotIn(layer, output)
        # Both prunes ran while the download went on.
        self.assertEqual(lease(), [(a.url,)])
        self.assertLess(body.size, len(large))
        await body.done
        self.assertEqual((body.code, body.digest), (200, layer))
        self.assertEqual(await until(lambda: self.s3.stat(key_for(layer))), len(large))
        self.assertEqual(self.query("SELECT size FROM blobs WHERE digest = %s", layer), [(len(large),)])
        self.assertEqual(await shared_cache_problems(self.s3, self.database), [])

    async def test_prune_while_another_replica_serves_a_slow_client(self) -> None:
        """A client pulls an image last pulled long ago through A and reads a blob slowly from the bucket: prunes
        through B and the CLI keep it (the grace counts A's pull), the object stays, and the body verifies."""
        registry = await start_registry(self.path("registry"), test=self, address="127.0.32.7")
        image = Published("team/y", "v1")
        large = os.urandom(6 * MIB)
        await publish_image(registry, image, b'{"image": "y"}', [large], image.tag)
        layer = next(digest for digest, blob in image.blobs.items() if blob is large)
        registries = [{"name": registry.host, "scheme": "http"}]
        a = await self.replica("a", registries)
        _, admin = await self.admin_replica("b", registries)
        web = WebClient()
        self.addCleanup(web.close)
        self.assertEqual(await pull(web, a, registry.host, "team/y", "v1"), {*image.manifests, *image.blobs})
        await until(lambda: self.s3.stat(key_for(layer)))
        # Long unused: a prune with the default grace would take it.
        with psycopg.connect(self.database) as db:
            db.execute("UPDATE manifests SET created = '2000-01-01T00:00:00Z', pulled = '2000-01-01T00:00:00Z'")
        self.assertIn("would remove 1 images", await self.admin_prune(admin, expr="team/y", dryRun="true"))

        # A slow client of A: 1.5 MiB/s through a relay.
        slow = ThrottledRelay(("127.0.0.1", a.port), 1.5 * MIB)
        self.addCleanup(slow.stop)
        await slow.start("127.0.32.17")
        slow_web = WebClient()
        self.addCleanup(slow_web.close)
        response = await slow_web.client.get(f"http://{slow.host}/v2/team/y/manifests/v1?ns={registry.host}")
        self.assertEqual(await response.content(), image.manifests[image.digest])
        body = SlowBody(slow_web, f"http://{slow.host}/v2/team/y/blobs/{layer}?ns={registry.host}")
        await until(lambda: Deferred.fromCoroutine(_now(lambda: body.size)), lambda size: size > 0)
        self.assertIn("removed 0 images, 0 manifests, 0 blobs", await self.admin_prune(admin, expr="team/y"))
        self.assertIn("removed 0 images, 0 manifests, 0 blobs", await self.cli_prune("--pattern", "team/y"))
        self.assertEqual(await self.s3.stat(key_for(layer)), len(large))
        self.assertLess(body.size, len(large))
        await body.done
        self.assertEqual((body.code, body.digest), (200, layer))
        self.assertEqual(await shared_cache_problems(self.s3, self.database), [])
        # It was the grace that kept it: without one, the image and its objects go.
        self.assertIn("removed 1 images, 1 manifests, 2 blobs", await self.admin_prune(admin, expr="team/y", grace="0"))
        self.assertEqual(await bucket_objects(self.s3), {})

    async def test_prune_while_a_replica_fetches_again_what_it_removes(self) -> None:
        """A pull through A fetches an image again while the CLI prune that removed its rows is still deleting
        objects: the prune leaves the new objects, so every row has its object, and B serves the image."""
        registry = await start_registry(self.path("registry"), test=self, address="127.0.32.8")
        images = [Published(f"team/f{n}", "v1") for n in range(8)]
        for n, image in enumerate(images):
            await publish_image(registry, image, json.dumps({"image": n}).encode(), [os.urandom(2000 + n)], image.tag)
        x = images[0]
        registries = [{"name": registry.host, "scheme": "http"}]
        a = await self.replica("a", registries)
        web = WebClient()
        self.addCleanup(web.close)
        for image in images:
            await pull(web, a, registry.host, image.repository, image.tag)
        for digest in {d for image in images for d in image.blobs}:
            await until(lambda digest=digest: self.s3.stat(key_for(digest)))
        # The prune reaches the bucket through a relay slow enough that its deletes take seconds.
        bucket = ThrottledRelay(("127.0.0.1", int(self.rgw.endpoint.rpartition(":")[2])), 1500)
        self.addCleanup(bucket.stop)
        await bucket.start("127.0.32.18")
        pruning = Deferred.fromCoroutine(self.cli_prune("--pattern", ".", "--grace", "0",
                                                        endpoint=f"http://{bucket.host}"))
        await until(lambda: Deferred.fromCoroutine(_now(lambda: self.query("SELECT count(*) FROM manifests"))),
                    lambda rows: rows == [(0,)])
        self.assertEqual(await pull(web, a, registry.host, x.repository, x.tag), {*x.manifests, *x.blobs})
        output = await pruning
        self.assertIn(f"removed {len(images)} images", output)
        self.assertEqual(await shared_cache_problems(self.s3, self.database), [])
        await registry.stop()
        b = await self.replica("b", registries)
        self.assertEqual(await pull(web, b, registry.host, x.repository, x.tag), {*x.manifests, *x.blobs})


class PullTimeTests(TestCase):
    """What another replica's prune sees of this replica's pulls, on a shared index."""

    async def test_a_pull_after_long_is_written_at_once(self) -> None:
        """A pull of a manifest last pulled long ago is in the index when record_pull fires; a recent one is batched."""
        index = Index(PostgresEngine(fresh_database(self), reactor))
        self.addCleanup(index.close)
        manifest = "sha256:" + "a" * 64
        await index.record_manifest(manifest, "application/vnd.oci.image.manifest.v1+json", 50, "quay.io",
                                    "team/app", [Reference("sha256:" + "c" * 64, "layer", "x", 100)], tag="v1")
        old = "2000-01-01T00:00:00Z"
        await index.set_times(manifest, old, old)
        await index.record_pull(manifest, old)
        record = await index.manifest(manifest)
        self.assertGreater(record.pulled if record else old, old)
        recent = utc(reactor.seconds() - 5)
        await index.set_times(manifest, old, recent)
        await index.record_pull(manifest, recent)
        record = await index.manifest(manifest)
        self.assertEqual(record.pulled if record else None, recent)
        self.assertEqual(await index.flush_pulls(), 1)


async def _now(ask: Any) -> Any:
    """A synchronous answer, for ``until``."""
    return ask()
