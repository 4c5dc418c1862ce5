"""Pruning and checking a shared cache whose content is in a Ceph RGW bucket: the objects go with their rows."""

from __future__ import annotations

import json
import os
import secrets

import treq
from twisted.internet import reactor
from twisted.web.client import HTTPConnectionPool
from twisted.trial.unittest import TestCase

from ociregistry.admin import admin_site
from ociregistry.config import PruneSettings
from ociregistry.index import Index, Reference
from ociregistry.postgres import PostgresEngine
from ociregistry.prune import prune_pass, removal_store
from ociregistry.s3 import S3Store, digest_for, key_for
from tests.fakes import digest_of
from tests.postgres_service import fresh_database
from tests.services import CephRGW, ceph_rgw
from tests.test_load import run_cli

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MIB = 1024 * 1024


class BucketPruneTests(TestCase):
    """A shared index in PostgreSQL and a bucket in Ceph RGW, filled by the test, pruned and checked by the CLI."""

    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]
        self.rgw: CephRGW = await ceph_rgw()
        self.database = fresh_database(self)
        self.bucket = "p-" + secrets.token_hex(6)
        self.s3 = S3Store(self.rgw.s3_config(self.bucket, prefix="c/"), reactor=reactor)
        self.addCleanup(self.s3.close)
        await self.s3.create_bucket()
        self.index = PostgresEngine(self.database, reactor).connect()
        self.addCleanup(self.index.close)
        self.config = os.path.abspath(self.mktemp())
        with open(self.config, "w") as f:
            json.dump({"index": {"postgresql": self.database},
                       "storage": {"s3": {"endpoint": self.rgw.endpoint, "bucket": self.bucket, "prefix": "c/",
                                          "region": self.rgw.region, "accessKey": self.rgw.access_key,
                                          "secretKey": self.rgw.secret_key}}}, f)

    async def put(self, data: bytes) -> str:
        """Store an object under its digest; the digest."""
        digest = digest_of(data)
        writer = self.s3.begin(key_for(digest), digest)
        await writer.write(data)
        await writer.commit()
        return digest

    async def image(self, repository: str, tag: str, *layers: bytes) -> tuple[str, list[str]]:
        """An image's objects in the bucket and rows in the index: (manifest digest, blob digests)."""
        blobs = [await self.put(layer) for layer in layers]
        for digest, layer in zip(blobs, layers, strict=True):
            self.index.record_blob(digest, len(layer))
        manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}, "layers": blobs,
                               "tag": tag}).encode()
        digest = await self.put(manifest)
        self.index.record_manifest(digest, OCI_MANIFEST, len(manifest), "example.com", repository,
                                   [Reference(blob, "layer", "application/octet-stream", len(layer))
                                    for blob, layer in zip(blobs, layers, strict=True)], tag)
        return digest, blobs

    async def test_list_objects(self) -> None:
        """list(prefix) pages through the bucket (RGW's pages hold 1000 keys), keys without our prefix."""
        digests = sorted([await self.put(b"%d" % n) for n in range(3)])
        listed = await self.s3.list("blobs/")
        self.assertEqual([entry.key for entry in listed], [key_for(digest) for digest in digests])
        self.assertEqual([digest_for(entry.key) for entry in listed], digests)
        self.assertEqual([entry.size for entry in listed], [1, 1, 1])
        self.assertTrue(all(entry.modified > 0 for entry in listed))
        self.assertEqual(await self.s3.list("other/"), [])

    async def test_cli_prune_deletes_the_objects_of_what_it_removed(self) -> None:
        """An image pruned loses its manifest and layer objects; a layer another image uses stays."""
        shared = os.urandom(6 * MIB)
        gone, (only, kept) = await self.image("team/old", "v1", os.urandom(2000), shared)
        stays, _ = await self.image("team/new", "v1", shared)
        result = await run_cli("prune", "--config-file", self.config, "--pattern", "team/old", "--grace", "0")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("deleted 2 objects from the bucket", result.stdout)
        self.assertIsNone(await self.s3.stat(key_for(gone)))
        self.assertIsNone(await self.s3.stat(key_for(only)))
        self.assertEqual(await self.s3.stat(key_for(kept)), len(shared))
        self.assertIsNotNone(await self.s3.stat(key_for(stays)))
        check = await run_cli("check", "--config-file", self.config, "--grace", "0")
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)

    async def test_background_prune_deletes_the_objects(self) -> None:
        """A background pass on a replica with the bucket deletes the objects after the rows."""
        gone, blobs = await self.image("team/old", "v1", os.urandom(3000))
        index = Index(PostgresEngine(self.database, reactor))
        self.addCleanup(index.close)
        settings = PruneSettings(enabled=True, type="pattern", expr="team/old", dry_run=False)
        self.index.set_times(gone, "2000-01-01T00:00:00Z", "2000-01-01T00:00:00Z")
        await prune_pass(index, removal_store(os.path.abspath(self.mktemp())), settings, reactor, bucket=self.s3)
        self.assertIsNone(self.index.manifest(gone))
        for digest in [gone, *blobs]:
            self.assertIsNone(await self.s3.stat(key_for(digest)))

    async def test_admin_prune_deletes_the_objects(self) -> None:
        """DELETE /cmd/prune?dryRun=false on an admin API given the bucket deletes the objects after the rows."""
        gone, blobs = await self.image("team/old", "v1", os.urandom(3000))
        index = Index(PostgresEngine(self.database, reactor))
        self.addCleanup(index.close)
        site = admin_site(index, os.path.abspath(self.mktemp()), reactor, lambda: None, bucket=self.s3)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/cmd/prune?type=pattern&expr=team/old&dryRun=false&grace=0"
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.delete(url, pool=pool)
        text = await response.text()
        self.assertEqual(response.code, 200, text)
        self.assertIn("removed 1 images", text)
        self.assertIsNone(self.index.manifest(gone))
        for digest in [gone, *blobs]:
            self.assertIsNone(await self.s3.stat(key_for(digest)))

    async def test_check_finds_and_repairs_both_kinds_of_problem(self) -> None:
        """check: a row without its object and an object no row names; --repair removes both."""
        manifest, (layer,) = await self.image("team/app", "v1", os.urandom(4000))
        orphan = await self.put(b"left by a crash between commit and delete")
        await self.s3.delete(key_for(layer))
        # A fresh object is left to the download about to record it.
        result = await run_cli("check", "--config-file", self.config)
        self.assertEqual(result.returncode, 1)
        self.assertIn(f"blob {layer}: missing", result.stdout)
        self.assertNotIn(orphan, result.stdout)
        result = await run_cli("check", "--config-file", self.config, "--grace", "0")
        self.assertEqual(result.returncode, 1)
        self.assertIn(f"object {orphan}: not in the index", result.stdout)
        self.assertIn("2 problems", result.stdout)
        result = await run_cli("check", "--config-file", self.config, "--grace", "0", "--repair")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(f"object {orphan}: not in the index (removed)", result.stdout)
        self.assertIsNone(await self.s3.stat(key_for(orphan)))
        self.assertIsNone(self.index.blob_size(layer))
        self.assertIsNotNone(self.index.manifest(manifest))
        result = await run_cli("check", "--config-file", self.config, "--grace", "0")
        self.assertEqual((result.returncode, result.stdout.strip().splitlines()[-1]),
                         (0, "1 objects checked, 0 problems"), result.stdout)
