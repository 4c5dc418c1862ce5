"""No multipart upload outlives the replica that began it, whatever abandonUploadsAfter is.

The owner of a download records its multipart upload with its lease: the owner's next life
aborts it at start, and a replica that takes an expired lease over aborts it at the takeover.
An abort the store refused while it was failing is tried again by itself once it answers.
Against a real PostgreSQL and Ceph RGW, with the default abandonUploadsAfter (one hour).
"""

from __future__ import annotations

import os
import time

import psycopg
from twisted.internet.defer import Deferred

from ociregistry.s3 import key_for
from tests.realparts import MIB, FaultyRelay, digest_of, free_port, sleep, start_registry, start_relay, upload_blob
from tests.services import ReplicaTestCase, shared_cache_problems, until
from tests.test_replica_faults import attempt

BLOB = 48 * MIB
# The upstream's bandwidth: a cold pull of the blob takes about three seconds.
RATE = 16 * MIB


class UploadRecoveryTests(ReplicaTestCase):
    """The upload of a replica killed mid-download, or refused an abort, is gone without waiting an hour."""

    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]
        await super().setUp()
        self.registry = await start_registry(self.path("registry"), test=self, address="127.0.31.1",
                                             port=free_port("127.0.31.1"))
        self.upstream = await start_relay(self.registry, test=self, rate=RATE, address="127.0.31.2")
        self.registries = [{"name": self.upstream.host, "scheme": "http"}]

    async def recorded(self) -> list[tuple[str, str, str]]:
        """The leases (owner, upload key, upload id) that have an upload recorded."""
        with psycopg.connect(self.database) as db:
            return [tuple(row) for row in db.execute(
                "SELECT owner, upload_key, upload_id FROM downloads WHERE upload_id IS NOT NULL").fetchall()]

    async def cold_pull_under_way(self, url: str) -> tuple[str, Deferred[tuple[int, bytes] | None], str]:
        """Start a cold pull of a new blob at a replica, and wait until its upload is begun and recorded:
        the blob's path, the pull, and the upload's id."""
        digest = await upload_blob(self.registry, "uploads/app", os.urandom(BLOB))
        path = f"/v2/uploads/app/blobs/{digest}?ns={self.upstream.host}"
        pulling = Deferred.fromCoroutine(attempt(url + path))
        found = await until(self.recorded, lambda found: found != [], limit=20)
        self.assertEqual(len(found), 1, found)
        _, key, upload_id = found[0]
        self.assertEqual(key, key_for(digest))
        self.assertIn(upload_id, [upload.upload_id for upload in await self.s3.uploads()])
        return path, pulling, upload_id

    async def test_killed_owner_aborts_its_upload_at_restart(self) -> None:
        """kill -9 of the replica uploading a blob: at its restart its upload is aborted, with the default
        abandonUploadsAfter; the next pull verifies and nothing is left."""
        a = await self.replica("a", self.registries)
        path, pulling, upload_id = await self.cold_pull_under_way(a.url)
        await a.kill()
        await pulling
        self.assertEqual([upload.upload_id for upload in await self.s3.uploads()], [upload_id])
        began = time.monotonic()
        await a.start()
        self.assertEqual(await until(self.s3.uploads, lambda found: found == [], limit=10), [])
        took = time.monotonic() - began
        self.assertIn("Aborted the upload of", a.log_text())
        answer = await attempt(a.url + path)
        assert answer is not None
        self.assertEqual((answer[0], digest_of(answer[1])), (200, path.split("/")[-1].partition("?")[0]))
        self.assertEqual(await shared_cache_problems(self.s3, self.database), [])
        self.assertEqual(await self.s3.uploads(), [])
        self.assertNotIn("Traceback", a.log_text())
        print(f"\nthe killed replica's upload was aborted {took:.1f} s after its restart began")

    async def test_takeover_aborts_the_dead_owners_upload(self) -> None:
        """A replica that takes over the expired lease of a killed owner aborts the upload the owner recorded."""
        a = await self.replica("a", self.registries, args=("--lease-seconds", "3"))
        b = await self.replica("b", self.registries, args=("--lease-seconds", "3"))
        path, pulling, upload_id = await self.cold_pull_under_way(a.url)
        await a.kill()
        await pulling
        answer = await attempt(b.url + path)
        assert answer is not None
        digest = path.split("/")[-1].partition("?")[0]
        self.assertEqual((answer[0], digest_of(answer[1])), (200, digest))
        self.assertEqual(await until(lambda: self.s3.stat(key_for(digest))), BLOB)
        self.assertEqual(await until(self.s3.uploads, lambda found: found == [], limit=10), [])
        self.assertIn("left by the replica whose lease expired", b.log_text())
        self.assertEqual(await shared_cache_problems(self.s3, self.database), [])
        self.assertNotIn("Traceback", b.log_text())


class AbortRetryTests(ReplicaTestCase):
    """An abort the failing store refused is tried again once the store answers, without a restart."""

    timeout = 120

    async def test_refused_abort_retried_by_itself(self) -> None:
        """A store answering 503 midway through an upload: once it recovers, the upload is gone within seconds."""
        registry = await start_registry(self.path("registry"), test=self, address="127.0.31.3",
                                        port=free_port("127.0.31.3"))
        upstream = await start_relay(registry, test=self, rate=RATE, address="127.0.31.4")
        relay = FaultyRelay(("127.0.0.1", int(self.rgw.endpoint.rpartition(":")[2])))
        self.addCleanup(relay.stop)
        await relay.start("127.0.31.5", free_port("127.0.31.5"))
        a = await self.replica("a", [{"name": upstream.host, "scheme": "http"}], endpoint=f"http://{relay.host}")
        digest = await upload_blob(registry, "retry/app", os.urandom(BLOB))
        url = f"{a.url}/v2/retry/app/blobs/{digest}?ns={upstream.host}"
        began = relay.bytes_up
        pulling = Deferred.fromCoroutine(attempt(url))
        deadline = time.monotonic() + 20
        while relay.bytes_up < began + 10 * MIB and time.monotonic() < deadline:
            await sleep(0.01)
        relay.fault = "503"
        answer = await pulling
        self.assertNotEqual(answer and answer[0], 200)
        await until(lambda: _logged(a.log_text(), "Could not abort the upload"), limit=20)
        left = len(await self.s3.uploads())
        self.assertEqual(left, 1)
        relay.fault = None
        recovered = time.monotonic()
        self.assertEqual(await until(self.s3.uploads, lambda found: found == [], limit=15), [])
        took = time.monotonic() - recovered
        self.assertIn("whose abort had failed", a.log_text())
        self.assertNotIn("Traceback", a.log_text())
        print(f"\nthe refused abort was done {took:.1f} s after the store recovered, without a restart")


async def _logged(text: str, fragment: str) -> bool | None:
    """Whether a server's log holds a line (None until it does, for ``until``)."""
    return True if fragment in text else None
