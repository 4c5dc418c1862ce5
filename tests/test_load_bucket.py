"""``ociregistry load``, ``import-go-cache`` and ``--preload-images`` on the replicas' shared index and bucket."""

from __future__ import annotations

import os
import time

import psycopg
from twisted.internet.defer import Deferred, gatherResults

from ociregistry.s3 import key_for
from tests.realparts import Server, build_oci_index, digest_of, push, start_registry, start_relay
from tests.services import ReplicaTestCase, bucket_objects, shared_cache_problems
from tests.test_integration import Puller
from tests.test_load import docker_save_tarball, go_store_from, run_cli, tar_directory

MIB = 1024 * 1024
NAMED = "registry.example.com"


class LoadIntoBucketTests(ReplicaTestCase):
    """The same commands and option as on one node, with the file replicas use: PostgreSQL and Ceph RGW."""

    def rows(self) -> dict[str, int]:
        """How many rows each table of the shared index holds."""
        with psycopg.connect(self.database) as db:
            return {table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # type: ignore[index]
                    for table in ("manifests", "manifest_refs", "tags", "blobs", "downloads")}

    async def assert_whole(self, keys: set[str]) -> None:
        """The bucket holds exactly these objects, each hashing to its key, each with its row; no upload is left."""
        self.assertEqual(set(await bucket_objects(self.s3)), keys)
        self.assertEqual(await shared_cache_problems(self.s3, self.database), [])
        self.assertEqual(await self.s3.uploads(), [])

    async def test_loaded_tarballs_are_served_by_a_replica_with_no_upstream(self) -> None:
        """An OCI-layout and a docker save tarball load into the bucket; a replica serves both by tag and digest."""
        image = build_oci_index(self.path("oci"), layer_sizes=(20 * MIB + 5, 3000))
        tar_directory(image.directory, self.path("layout.tar.gz"))
        config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
        layer = os.urandom(9 * MIB)
        docker_save_tarball(self.path("saved.tar"), [f"{NAMED}/saved/app:1"], config, [layer])
        began = time.monotonic()
        loaded = await run_cli("load", "--image-path", self.path("cli"), "--config-file", self.shared_config(),
                               "--name", f"{NAMED}/team/app", self.path("layout.tar.gz"), self.path("saved.tar"))
        seconds = time.monotonic() - began
        self.assertEqual(loaded.returncode, 0, loaded.stderr)
        self.assertIn(f"loaded {NAMED}/team/app:latest {image.digest}", loaded.stdout)
        saved = loaded.stdout.split(f"loaded {NAMED}/saved/app:1 ")[1].split()[0]
        # The command's spool under the image path is gone with it.
        self.assertEqual(os.listdir(self.path("cli/tmp")), [])
        keys = {key_for(d) for d in [image.digest, *image.manifests.values(), *image.blobs,
                                     saved, digest_of(config), digest_of(layer)]}
        await self.assert_whole(keys)
        size = sum((await bucket_objects(self.s3)).values())
        print(f"\nloaded {size / 1e6:.1f} MB into the bucket in {seconds:.1f}s "
              f"(the command's whole run): {size / 1e6 / seconds:.1f} MB/s")

        replica = await self.replica("a", [])
        top, platforms, blobs = await Puller(self, replica).pull(NAMED, "team/app", "latest")
        self.assertEqual((top, platforms, blobs), (image.digest, image.manifests, image.blobs))
        puller = Puller(self, replica)
        response, body = await puller.get("/v2/saved/app/manifests/1", NAMED)
        self.assertEqual((response.code, digest_of(body)), (200, saved))
        for content in (config, layer):
            response, body = await puller.get(f"/v2/saved/app/blobs/{digest_of(content)}", NAMED)
            self.assertEqual((response.code, body == content), (200, True))

        # Loading it again uploads nothing: what the index holds is skipped.
        again = await run_cli("load", "--image-path", self.path("cli"), "--config-file", self.shared_config(),
                              "--name", f"{NAMED}/team/app", self.path("layout.tar.gz"))
        self.assertEqual(again.returncode, 0, again.stderr)
        await self.assert_whole(keys)

    async def test_go_cache_imports_into_the_bucket(self) -> None:
        """import-go-cache with the shared configuration: every digest verified, a replica serves the image."""
        image = build_oci_index(self.path("image"), layer_sizes=(6 * MIB, 2000))
        go_store_from(image, self.path("go"), f"{NAMED}/team/app:latest")
        imported = await run_cli("import-go-cache", "--image-path", self.path("cli"), "--config-file",
                                 self.shared_config(), "--from", self.path("go"))
        self.assertEqual(imported.returncode, 0, imported.stderr)
        self.assertIn("3 manifests imported, 0 problems", imported.stdout)
        await self.assert_whole({key_for(d) for d in [image.digest, *image.manifests.values(), *image.blobs]})
        replica = await self.replica("a", [])
        top, platforms, blobs = await Puller(self, replica).pull(NAMED, "team/app", "latest")
        self.assertEqual((top, platforms, blobs), (image.digest, image.manifests, image.blobs))

    async def test_corrupt_blob_leaves_nothing_and_says_why(self) -> None:
        """A tarball with a blob that does not hash to its name: one line why, and nothing in the bucket or index."""
        image = build_oci_index(self.path("oci"), layer_sizes=(12 * MIB, 3000))
        large = max(image.blobs, key=lambda digest: image.blobs[digest])
        with open(image.blob_path(large), "r+b") as f:
            f.seek(10 * MIB)
            f.write(b"rot")
        tar_directory(image.directory, self.path("layout.tar.gz"))
        loaded = await run_cli("load", "--image-path", self.path("cli"), "--config-file", self.shared_config(),
                               "--name", f"{NAMED}/team/app", self.path("layout.tar.gz"))
        self.assertEqual(loaded.returncode, 1)
        self.assertRegex(loaded.stderr, rf"\Afailed {self.path('layout.tar.gz')}: content named {large} "
                                        r"hashes to sha256:[0-9a-f]{64}\n\Z")
        self.assertNotIn("Traceback", loaded.stdout + loaded.stderr)
        await self.assert_whole(set())
        self.assertEqual(self.rows(), {"manifests": 0, "manifest_refs": 0, "tags": 0, "blobs": 0, "downloads": 0})

    async def test_two_replicas_preloading_one_list_at_once(self) -> None:
        """Two replicas start at once with one --preload-images list: one upstream GET per blob, both serve it."""
        image = build_oci_index(self.path("oci"), platforms=[("linux", "amd64")],
                                layer_sizes=(6 * MIB, 6 * MIB, 6 * MIB, 5 * MIB, 2000))
        registry = await start_registry(self.path("registry"), test=self, address="127.0.33.1", port=80)
        await push(image, registry, "team/app", "v1")
        # Slow enough that the replicas' downloads overlap, and each waits for blobs the other downloads.
        relay = await start_relay(registry, test=self, rate=24 * MIB, address="127.0.33.2", port=80)
        with open(self.path("images.txt"), "w") as f:
            f.write(f"{relay.host}/team/app:v1\n")
        registries = [{"name": relay.host, "scheme": "http"}]
        args = ("--preload-images", self.path("images.txt"), "--arch", "amd64")
        began = time.monotonic()
        replicas: list[Server] = await gatherResults([
            Deferred.fromCoroutine(self.replica(name, registries, args=args)) for name in ("a", "b")])
        print(f"\ntwo replicas preloaded {sum(image.blobs.values()) / 1e6:.1f} MB of blobs and answered "
              f"after {time.monotonic() - began:.1f}s")
        for digest in image.blobs:
            self.assertEqual(registry.count_requests("GET", f"/blobs/{digest}", 200), 1, digest)
        await relay.stop()
        await registry.stop()
        for replica in replicas:
            self.assertIn("Preloaded", replica.log_text())
            top, platforms, blobs = await Puller(self, replica).pull(relay.host, "team/app", "v1")
            self.assertEqual((top, platforms, blobs), (image.digest, image.manifests, image.blobs))
        await self.assert_whole({key_for(d) for d in [image.digest, *image.manifests.values(), *image.blobs]})
        self.assertEqual(self.rows()["downloads"], 0)
