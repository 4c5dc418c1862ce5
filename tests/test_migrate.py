"""Moving in: ``ociregistry migrate`` copies a single-node cache into PostgreSQL and a Ceph RGW bucket."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import psycopg

from ociregistry.s3 import key_for
from tests.realparts import (
    PROJECT_ROOT,
    build_oci_index,
    push,
    skopeo_copy_all,
    sleep,
    start_registry,
    start_server,
)
from tests.services import ReplicaTestCase
from tests.test_integration import Puller
from tests.test_load import run_cli

MIB = 1024 * 1024


class MigrateTests(ReplicaTestCase):
    """A cache built on files by a single-node server, moved into a shared index and bucket."""

    async def single_node_cache(self, address: str, layer_sizes: tuple[int, ...]) -> tuple[object, object, str]:
        """An image pulled through a single-node server on files: (image, registry, image path)."""
        image = build_oci_index(self.path("oci"), layer_sizes=layer_sizes)
        registry = await start_registry(self.path("registry"), test=self, address=address, port=80)
        await push(image, registry, "team/app", "v1")
        cache = self.path("cache")
        single = self.path("single.yaml")
        with open(single, "w") as f:
            json.dump({"registries": [{"name": registry.host, "scheme": "http"}]}, f)
        server = await start_server(cache, test=self, args=("--config-file", single))
        pulled = await skopeo_copy_all(f"{server.host}/{registry.host}/team/app:v1", self.path("pulled"))
        self.assertEqual(pulled.digest, image.digest)
        await server.stop()
        return image, registry, cache

    def source_rows(self, cache: str) -> dict[str, set[tuple[object, ...]]]:
        """The rows of a cache's sqlite index, by table."""
        with sqlite3.connect(os.path.join(cache, "index.db")) as db:
            return {table: set(db.execute(query)) for table, query in _ROWS.items()}

    def shared_rows(self) -> dict[str, list[tuple[object, ...]]]:
        """The rows of the shared index, by table (a list: duplicates would show)."""
        with psycopg.connect(self.database) as db:
            return {table: list(db.execute(query)) for table, query in _ROWS.items()}

    async def test_migrated_cache_is_served_by_a_replica_with_the_upstream_stopped(self) -> None:
        """Every object is in the bucket and every row (times too) in PostgreSQL; a replica serves the image."""
        image, registry, cache = await self.single_node_cache("127.0.26.1", (6 * MIB + 7, 3000))
        registries = [{"name": registry.host, "scheme": "http"}]
        config = self.shared_config(registries)
        result = await run_cli("migrate", "--from", cache, "--config-file", config)
        self.assertEqual(result.returncode, 0, result.stderr)
        source = self.source_rows(cache)
        self.assertEqual({table: set(rows) for table, rows in self.shared_rows().items()}, source)
        for digest, size in {(d, s) for d, s, _ in source["blobs"]} | {(d, s) for d, _, s, *_ in source["manifests"]}:
            self.assertEqual(await self.s3.stat(key_for(digest)), size)
        print(f"\n{result.stdout.splitlines()[-1]}")

        await registry.stop()
        replica = await start_server(self.path("spool"), test=self,
                                     args=("--config-file", config, "--admin-listen", "none"))
        top, platforms, blobs = await Puller(self, replica).pull(registry.host, "team/app", "v1")
        self.assertEqual((top, platforms, blobs), (image.digest, image.manifests, image.blobs))
        self.assertNotIn("Fetched blob", replica.log_text())

        # A second run finds everything in place and uploads nothing.
        again = await run_cli("migrate", "--from", cache, "--config-file", config)
        self.assertEqual(again.returncode, 0, again.stderr)
        total = len(source["blobs"]) + len(source["manifests"])
        self.assertIn(f"{total} of {total} objects: 0 copied, {total} already there, 0 skipped; 0.0 MB",
                      again.stdout)

    async def test_killed_midway_and_run_again_ends_complete(self) -> None:
        """kill -9 during the uploads, then a second run: every object and row once, nothing uploaded twice."""
        image, registry, cache = await self.single_node_cache("127.0.26.2", (24 * MIB, 20 * MIB, 16 * MIB, 100))
        config = self.shared_config([{"name": registry.host, "scheme": "http"}])
        command = [sys.executable, "-m", "ociregistry.cli", "migrate", "--from", cache, "--config-file", config,
                   "--every", "1", "--concurrency", "1"]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "PYTHONPATH": PROJECT_ROOT})
        self.addCleanup(lambda: process.poll() is not None or process.kill())
        # Killed once the first objects are in, in the middle of the rest.
        first = await _line_of(process)
        self.assertRegex(first, r"^1 of \d+ objects")
        os.kill(process.pid, signal.SIGKILL)
        process.communicate(timeout=30)
        partial = self.shared_rows()
        source = self.source_rows(cache)
        total = len(source["blobs"]) + len(source["manifests"])
        self.assertLess(len(partial["blobs"]) + len(partial["manifests"]), total)
        # No row without its object, even after a kill.
        for digest, size, _ in partial["blobs"]:
            self.assertEqual(await self.s3.stat(key_for(digest)), size)

        result = await run_cli("migrate", "--from", cache, "--config-file", config)
        self.assertEqual(result.returncode, 0, result.stderr)
        done = re.search(r"(\d+) copied, (\d+) already there, 0 skipped", result.stdout)
        assert done is not None, result.stdout
        self.assertGreaterEqual(int(done.group(2)), 1)
        self.assertEqual(int(done.group(1)) + int(done.group(2)), total)
        rows = self.shared_rows()
        for table, found in rows.items():
            self.assertEqual(len(found), len(set(found)), table)
        self.assertEqual({table: set(found) for table, found in rows.items()}, source)
        for digest, size, _ in source["blobs"]:
            self.assertEqual(await self.s3.stat(key_for(digest)), size)
        print(f"\nafter a kill -9, the second run: {result.stdout.splitlines()[-1]}")

    async def test_corrupt_file_is_reported_and_skipped(self) -> None:
        """A file that does not hash to its name is reported, never uploaded, and gets no row; the rest moves in."""
        image, registry, cache = await self.single_node_cache("127.0.26.3", (10 * MIB, 3000))
        config = self.shared_config([{"name": registry.host, "scheme": "http"}])
        large = max(image.blobs, key=lambda digest: image.blobs[digest])
        algorithm, _, encoded = large.partition(":")
        with open(os.path.join(cache, "blobs", algorithm, encoded[:2], encoded), "r+b") as f:
            f.seek(5 * MIB)
            f.write(b"rot")
        result = await run_cli("migrate", "--from", cache, "--config-file", config)
        self.assertEqual(result.returncode, 1)
        self.assertRegex(result.stderr, rf"skipped blob {large}: content hashes to sha256:[0-9a-f]{{64}}")
        self.assertIn("1 skipped", result.stdout)
        self.assertIsNone(await self.s3.stat(key_for(large)))
        self.assertEqual(await self.s3.uploads(), [])
        rows = self.shared_rows()
        self.assertNotIn(large, {row[0] for row in rows["blobs"]})
        self.assertEqual(set(rows["blobs"]), {row for row in self.source_rows(cache)["blobs"] if row[0] != large})

    async def test_refuses_what_is_not_a_cache_or_not_a_shared_config(self) -> None:
        """One clear line and exit 1: a directory without index.db, a config without PostgreSQL or S3."""
        config = self.shared_config([])
        os.makedirs(self.path("empty"))
        result = await run_cli("migrate", "--from", self.path("empty"), "--config-file", config)
        self.assertEqual((result.returncode, result.stderr.strip()),
                         (1, f"ociregistry migrate: --from {self.path('empty')}: not an ociregistry cache "
                             "(no index.db)"))
        with open(self.path("empty/index.db"), "w") as f:
            f.write("not a database")
        result = await run_cli("migrate", "--from", self.path("empty"), "--config-file", config)
        self.assertEqual(result.returncode, 1)
        self.assertIn("not an ociregistry cache", result.stderr)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        plain = self.path("plain.yaml")
        with open(plain, "w") as f:
            json.dump({"index": {"postgresql": self.database}}, f)
        result = await run_cli("migrate", "--from", self.path("empty"), "--config-file", plain)
        self.assertEqual(result.returncode, 1)
        self.assertIn("names no storage.s3", result.stderr)


_ROWS = {
    "manifests": "SELECT digest, media_type, size, registry, repository, created, pulled FROM manifests",
    "manifest_refs": "SELECT manifest, child, kind, media_type, size, platform FROM manifest_refs",
    "tags": "SELECT registry, repository, tag, digest, updated FROM tags",
    "blobs": "SELECT digest, size, created FROM blobs",
}


async def _line_of(process: subprocess.Popen[str], limit: float = 60.0) -> str:
    """The first line a process prints, read without blocking the reactor for long."""
    deadline = time.monotonic() + limit
    assert process.stdout is not None
    os.set_blocking(process.stdout.fileno(), False)
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line:
            return line
        await sleep(0.05)
    raise AssertionError("the migration printed nothing")
