"""Several replicas of the real server share one cache: PostgreSQL for the index, Ceph RGW for the content."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import psycopg
import treq

from ociregistry.s3 import key_for
from tests.fakes import Behaviour, FakeRegistry, listen, make_image
from tests.realparts import (
    ThrottledRelay,
    WebClient,
    build_oci_index,
    digest_of,
    free_port,
    log_settled,
    push,
    skopeo_copy_all,
    sleep,
    start_registry,
)
from tests.services import ReplicaTestCase
from tests.services import until as _until
from tests.test_integration import Puller

MIB = 1024 * 1024


class ReplicaTests(ReplicaTestCase):
    """Replicas under twistd, on one PostgreSQL database and one Ceph RGW bucket."""

    async def test_admin_prune_of_a_replica_deletes_the_objects(self) -> None:
        """A prune through a replica's admin API removes the rows, then the image's objects from the bucket."""
        image = make_image(b"pruned")
        upstream = FakeRegistry()
        upstream.add_image("team/old", "v1", image)
        port, listening = await listen(upstream)
        self.addCleanup(listening.stopListening)
        registry = f"127.0.0.1:{port}"
        admin_port = free_port()
        a = await self.replica("a", [{"name": registry, "scheme": "http"}],
                               admin=f"tcp:{admin_port}:interface=127.0.0.1")
        web = WebClient()
        self.addCleanup(web.close)
        for digest, content in [(image.digest, image.manifest), *image.blobs.items()]:
            kind = "manifests" if digest == image.digest else "blobs"
            response = await web.client.get(f"{a.url}/v2/team/old/{kind}/{digest}?ns={registry}")
            self.assertEqual(await response.content(), content)
            await _until(lambda: self.s3.stat(key_for(digest)))
        url = f"http://127.0.0.1:{admin_port}/cmd/prune?type=pattern&expr=team/old&dryRun=false&grace=0"
        response = await web.client.delete(url)
        text = (await response.content()).decode()
        self.assertEqual(response.code, 200, text)
        self.assertIn("removed 1 images", text)
        for digest in [image.digest, *image.blobs]:
            self.assertIsNone(await self.s3.stat(key_for(digest)), digest)


    async def test_pulled_through_one_replica_served_by_the_others(self) -> None:
        """An index of two platforms pulled through A is served by B and C, by tag and digest, with the upstream stopped."""
        image = build_oci_index(self.path("oci"), layer_sizes=(12 * MIB + 5, 3000))
        registry = await start_registry(self.path("registry"), test=self, address="127.0.22.1", port=80)
        await push(image, registry, "team/app", "v1")
        registries = [{"name": registry.host, "scheme": "http"}]
        a = await self.replica("a", registries)
        pulled = await skopeo_copy_all(f"{a.host}/{registry.host}/team/app:v1", self.path("via-a"))
        self.assertEqual((pulled.digest, pulled.manifests, pulled.blobs), (image.digest, image.manifests, image.blobs))
        # Prefetches of the platforms' blobs end before the upstream goes.
        for digest in image.blobs:
            self.assertEqual(await _until(lambda: self.s3.stat(key_for(digest))), image.blobs[digest])
        await registry.stop()
        b = await self.replica("b", registries)
        c = await self.replica("c", registries)
        for server in (b, c):
            top, platforms, blobs = await Puller(self, server).pull(registry.host, "team/app", "v1")
            self.assertEqual((top, platforms, blobs), (image.digest, image.manifests, image.blobs))
        pulled = await skopeo_copy_all(f"{c.host}/{registry.host}/team/app:v1", self.path("via-c"))
        self.assertEqual((pulled.digest, pulled.manifests, pulled.blobs), (image.digest, image.manifests, image.blobs))
        self.assertIn("cache=hit", b.log_text())
        self.assertNotIn("Fetched blob", b.log_text() + c.log_text())

        # A Range is answered by the bucket, through B; one beyond the end is a 416.
        large = max(image.blobs, key=lambda digest: image.blobs[digest])
        with open(image.blob_path(large), "rb") as f:
            content = f.read()
        web = WebClient()
        self.addCleanup(web.close)
        url = f"{b.url}/v2/team/app/blobs/{large}?ns={registry.host}"
        response = await web.client.get(url, headers={"Range": "bytes=9437184-9437283"})
        self.assertEqual((response.code, await response.content()), (206, content[9437184:9437284]))
        self.assertEqual(response.headers.getRawHeaders("content-range"),
                         [f"bytes 9437184-9437283/{len(content)}"])
        response = await web.client.get(url, headers={"Range": f"bytes={len(content)}-"})
        self.assertEqual(response.code, 416)
        await response.content()
        response = await web.client.head(url)
        self.assertEqual(response.headers.getRawHeaders("content-length"), [str(len(content))])

        # Warm throughput of the large blob through a replica, from the bucket.
        started = time.monotonic()
        response = await web.client.get(url)
        body = await response.content()
        elapsed = time.monotonic() - started
        self.assertEqual(digest_of(body), large)
        print(f"\nwarm {len(body)} byte blob through a replica from the bucket: "
              f"{len(body) / MIB / elapsed:.0f} MiB/s")

    async def test_redirect_to_the_bucket(self) -> None:
        """With redirect on, a cached blob GET is a 307 to a presigned URL that clients follow."""
        image = build_oci_index(self.path("oci"), layer_sizes=(4000, 3000))
        registry = await start_registry(self.path("registry"), test=self, address="127.0.22.2", port=80)
        await push(image, registry, "team/app", "v1")
        registries = [{"name": registry.host, "scheme": "http"}]
        a = await self.replica("a", registries, redirect=True)
        pulled = await skopeo_copy_all(f"{a.host}/{registry.host}/team/app:v1", self.path("via-a"))
        self.assertEqual((pulled.digest, pulled.blobs), (image.digest, image.blobs))
        for digest in image.blobs:
            await _until(lambda: self.s3.stat(key_for(digest)))
        await registry.stop()
        b = await self.replica("b", registries, redirect=True)
        web = WebClient()
        self.addCleanup(web.close)
        digest = next(iter(image.blobs))
        response = await web.client.get(f"{b.url}/v2/team/app/blobs/{digest}?ns={registry.host}",
                                        allow_redirects=False)
        await response.content()
        self.assertEqual(response.code, 307)
        location = response.headers.getRawHeaders("location")[0]
        self.assertTrue(location.startswith(self.rgw.endpoint), location)
        response = await web.client.get(location)
        self.assertEqual(digest_of(await response.content()), digest)
        pulled = await skopeo_copy_all(f"{b.host}/{registry.host}/team/app:v1", self.path("via-b"))
        self.assertEqual((pulled.digest, pulled.manifests, pulled.blobs), (image.digest, image.manifests, image.blobs))
        await log_settled(b.log_path)
        redirected = [line for line in b.log_text().splitlines() if "/blobs/" in line and " 307 " in line]
        self.assertEqual(len(redirected), 1 + len(image.blobs), "\n".join(redirected))

    async def test_wrong_secret_exits_with_one_line(self) -> None:
        """A replica whose S3 secret is wrong says so in one line and exits non-zero."""
        line = await self.refused_at_start("wrong", "not-the-secret")
        self.assertIn(f"bucket {self.bucket} at {self.rgw.endpoint}: wrong credentials", line)

    async def test_first_pull_streams_while_it_uploads(self) -> None:
        """The first client gets bytes while the blob still downloads and uploads; the object appears once complete."""
        fake = FakeRegistry()
        blob = os.urandom(24 * MIB)
        digest = digest_of(blob)
        fake.blobs[digest] = blob
        fake.behaviour[digest] = Behaviour(chunk=MIB, delay=0.08)
        port, listening = await listen(fake)
        self.addCleanup(listening.stopListening)
        a = await self.replica("a", [{"name": f"127.0.0.1:{port}", "scheme": "http"}])
        web = WebClient()
        self.addCleanup(web.close)
        started = time.monotonic()
        response = await web.client.get(f"{a.url}/v2/app/blobs/{digest}?ns=127.0.0.1:{port}")
        chunks: list[bytes] = []
        first: list[float] = []

        def received(data: bytes) -> None:
            if not first:
                first.append(time.monotonic() - started)
            chunks.append(data)

        await treq.collect(response, received)
        elapsed = time.monotonic() - started
        self.assertEqual(digest_of(b"".join(chunks)), digest)
        self.assertGreater(elapsed, 1.5)
        self.assertLess(first[0], elapsed / 3)
        self.assertEqual(await _until(lambda: self.s3.stat(key_for(digest))), len(blob))
        self.assertEqual(await self.s3.uploads(), [])

    async def test_broken_download_leaves_nothing_in_the_bucket(self) -> None:
        """A blob whose upstream breaks off midway leaves no object, no upload and no index row."""
        fake = FakeRegistry()
        blob = os.urandom(20 * MIB)
        digest = digest_of(blob)
        fake.blobs[digest] = blob
        fake.behaviour[digest] = Behaviour(drop_after=18 * MIB)
        port, listening = await listen(fake)
        self.addCleanup(listening.stopListening)
        registries = [{"name": f"127.0.0.1:{port}", "scheme": "http"}]
        a = await self.replica("a", registries)
        web = WebClient()
        self.addCleanup(web.close)
        try:
            response = await web.client.get(f"{a.url}/v2/app/blobs/{digest}?ns=127.0.0.1:{port}")
            body = await response.content()
        except Exception:
            body = b""
        self.assertNotEqual(body, blob)
        await log_settled(a.log_path)
        self.assertEqual(fake.count("GET", digest), 1)
        self.assertIsNone(await self.s3.stat(key_for(digest)))
        self.assertEqual(await _until(self.s3.uploads, lambda found: found == []), [])
        with psycopg.connect(self.database) as db:
            self.assertEqual(db.execute("SELECT count(*) FROM blobs WHERE digest = %s", (digest,)).fetchone(), (0,))
        await a.stop()
        await a.start()
        self.assertEqual(await self.s3.uploads(), [])
        response = await web.client.get(f"{a.url}/health")
        self.assertEqual((response.code, json.loads(await response.content())), (200, {"status": "ok"}))

    async def test_killed_mid_download_leaves_nothing_after_the_next_start(self) -> None:
        """kill -9 while a blob uploads: no object, no row, and the next start aborts the upload left behind."""
        fake = FakeRegistry()
        blob = os.urandom(24 * MIB)
        digest = digest_of(blob)
        fake.blobs[digest] = blob
        fake.behaviour[digest] = Behaviour(chunk=MIB, delay=0.1)
        port, listening = await listen(fake)
        self.addCleanup(listening.stopListening)
        registries = [{"name": f"127.0.0.1:{port}", "scheme": "http"}]
        a = await self.replica("a", registries, abandonUploadsAfter="1s")
        web = WebClient()
        self.addCleanup(web.close)
        pulling = web.client.get(f"{a.url}/v2/app/blobs/{digest}?ns=127.0.0.1:{port}")
        pulling.addErrback(lambda failure: None)
        left = await _until(self.s3.uploads, lambda found: found != [])
        self.assertEqual([upload.key for upload in left], [key_for(digest)])
        await a.kill()
        await sleep(1.2)   # the upload is now older than abandonUploadsAfter
        self.assertEqual(len(await self.s3.uploads()), 1)
        await a.start()
        self.assertEqual(await _until(self.s3.uploads, lambda found: found == []), [])
        # Recorded with the download's lease, the upload is aborted as the lease of the previous run is dropped.
        self.assertIn("Aborted the upload of blobs/sha256/", a.log_text())
        self.assertIn("left by this replica's previous run", a.log_text())
        self.assertIsNone(await self.s3.stat(key_for(digest)))
        with psycopg.connect(self.database) as db:
            self.assertEqual(db.execute("SELECT count(*) FROM blobs WHERE digest = %s", (digest,)).fetchone(), (0,))

    async def test_bucket_lost_while_running(self) -> None:
        """A replica whose bucket goes away serves hot manifests, answers blobs with a JSON 503, says so
        on /health, and recovers by itself when the bucket is back."""
        fake = FakeRegistry()
        image = make_image(os.urandom(3000))
        fake.add_image("app", "v1", image)
        port, listening = await listen(fake)
        self.addCleanup(listening.stopListening)
        relay = ThrottledRelay(("127.0.0.1", int(self.rgw.endpoint.rpartition(":")[2])), None)
        self.addCleanup(relay.stop)
        relay_port = free_port("127.0.22.3")
        await relay.start("127.0.22.3", relay_port)
        endpoint = f"http://127.0.22.3:{relay_port}"
        a = await self.replica("a", [{"name": f"127.0.0.1:{port}", "scheme": "http"}], endpoint=endpoint)
        web = WebClient()
        self.addCleanup(web.close)
        base = f"{a.url}/v2/app"
        ns = f"?ns=127.0.0.1:{port}"
        response = await web.client.get(f"{base}/manifests/v1{ns}")
        self.assertEqual(await response.content(), image.manifest)
        layer = digest_of(image.layers[0])
        await _until(lambda: self.s3.stat(key_for(layer)))
        await listening.stopListening()
        await relay.stop()

        response = await web.client.get(f"{base}/manifests/{image.digest}{ns}")
        self.assertEqual((response.code, await response.content()), (200, image.manifest))
        response = await web.client.get(f"{base}/blobs/{layer}{ns}")
        answer = json.loads(await response.content())
        self.assertEqual((response.code, answer["errors"][0]["code"]), (503, "UNAVAILABLE"))

        async def health() -> tuple[int, Any]:
            response = await web.client.get(f"{a.url}/health")
            return response.code, json.loads(await response.content())

        code, answer = await _until(health, lambda found: found[0] == 503)
        self.assertTrue(answer["problem"].startswith(f"bucket {self.bucket} at {endpoint}: unreachable"), answer)
        await relay.start("127.0.22.3", relay_port)
        response = await web.client.get(f"{base}/blobs/{layer}{ns}")
        self.assertEqual((response.code, await response.content()), (200, image.layers[0]))
        self.assertEqual(await _until(health, lambda found: found[0] == 200), (200, {"status": "ok"}))

    async def test_health_names_the_bucket(self) -> None:
        """A bucket that goes away makes /health a 503 naming it; once it is back, /health is 200 again."""
        a = await self.replica("a", [])
        web = WebClient()
        self.addCleanup(web.close)

        async def health() -> tuple[int, Any]:
            response = await web.client.get(f"{a.url}/health")
            return response.code, json.loads(await response.content())

        self.assertEqual(await health(), (200, {"status": "ok"}))
        response = await self.s3._call("DELETE", None, what="delete bucket")
        await response.content()
        self.assertEqual(response.code, 204)
        code, answer = await _until(health, lambda found: found[0] == 503)
        self.assertEqual(code, 503)
        self.assertEqual(answer["problem"], f"bucket {self.bucket} at {self.rgw.endpoint}: missing")
        await self.s3.create_bucket()
        self.assertEqual(await _until(health, lambda found: found[0] == 200), (200, {"status": "ok"}))
        self.assertIn("The bucket is failing", a.log_text())
        self.assertIn("The bucket answers again", a.log_text())

