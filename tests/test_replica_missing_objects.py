"""An index row whose object is gone from the bucket: the row is forgotten and the content fetched again.

As with a file gone from under the image path: the client gets the right bytes (one more
upstream GET), or, when the upstream no longer has them, a JSON BLOB_UNKNOWN.  Against a real
PostgreSQL and Ceph RGW, the object deleted behind the index's back.
"""

from __future__ import annotations

import json
import os

import psycopg

from ociregistry.s3 import key_for
from tests.fakes import FakeRegistry, listen, make_image
from tests.services import ReplicaTestCase, shared_cache_problems, until
from tests.test_replica_faults import attempt


class MissingObjectTests(ReplicaTestCase):
    """Objects deleted from the bucket under rows of the shared index."""

    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        await super().setUp()
        self.upstream = FakeRegistry()
        self.image = make_image(os.urandom(300_000))
        self.upstream.add_image("app", "v1", self.image)
        port, listening = await listen(self.upstream)
        self.addCleanup(listening.stopListening)
        self.ns = f"127.0.0.1:{port}"
        self.a = await self.replica("a", [{"name": self.ns, "scheme": "http"}])
        self.layer = self.image.layers[0]
        self.digest = next(d for d, b in self.image.blobs.items() if b == self.layer)
        self.url = f"{self.a.url}/v2/app/blobs/{self.digest}?ns={self.ns}"
        self.assertEqual(await attempt(self.url), (200, self.layer))
        self.assertEqual(await until(lambda: self.s3.stat(key_for(self.digest))), len(self.layer))
        await until(self.row, lambda found: found)

    async def row(self) -> bool:
        """Whether the index has the blob's row."""
        with psycopg.connect(self.database) as db:
            return db.execute("SELECT 1 FROM blobs WHERE digest = %s", (self.digest,)).fetchone() is not None

    async def test_missing_blob_fetched_again(self) -> None:
        """A blob whose object was deleted is fetched from upstream again: 200, the right bytes, one more GET."""
        await self.s3.delete(key_for(self.digest))
        before = self.upstream.count("GET", self.digest)
        self.assertEqual(await attempt(self.url), (200, self.layer))
        self.assertEqual(self.upstream.count("GET", self.digest), before + 1)
        self.assertEqual(await until(lambda: self.s3.stat(key_for(self.digest))), len(self.layer))
        self.assertIn("is missing in the store; fetching it again", self.a.log_text())
        # Stored again: the next pull is a hit, with no upstream GET.
        self.assertEqual(await attempt(self.url), (200, self.layer))
        self.assertEqual(self.upstream.count("GET", self.digest), before + 1)
        self.assertEqual(await shared_cache_problems(self.s3, self.database), [])
        self.assertNotIn("Traceback", self.a.log_text())

    async def test_missing_blob_gone_upstream_too(self) -> None:
        """A blob whose object was deleted and that the upstream no longer has is a JSON BLOB_UNKNOWN."""
        await self.s3.delete(key_for(self.digest))
        del self.upstream.blobs[self.digest]
        answer = await attempt(self.url)
        assert answer is not None
        self.assertEqual(answer[0], 404, answer[1][:500])
        self.assertEqual(json.loads(answer[1])["errors"][0]["code"], "BLOB_UNKNOWN")
        self.assertFalse(await self.row())
        self.assertEqual(await shared_cache_problems(self.s3, self.database), [])
        self.assertNotIn("Traceback", self.a.log_text())

    async def test_missing_manifest_fetched_again(self) -> None:
        """A manifest whose object was deleted is fetched again by a replica that does not hold it in memory."""
        manifest_url = f"/v2/app/manifests/{self.image.digest}?ns={self.ns}"
        self.assertEqual(await attempt(self.a.url + manifest_url), (200, self.image.manifest))
        self.assertEqual(await until(lambda: self.s3.stat(key_for(self.image.digest))), len(self.image.manifest))
        await self.s3.delete(key_for(self.image.digest))
        b = await self.replica("b", [{"name": self.ns, "scheme": "http"}])
        before = self.upstream.count("GET", f"/manifests/{self.image.digest}")
        self.assertEqual(await attempt(b.url + manifest_url), (200, self.image.manifest))
        self.assertEqual(self.upstream.count("GET", f"/manifests/{self.image.digest}"), before + 1)
        self.assertEqual(await until(lambda: self.s3.stat(key_for(self.image.digest))), len(self.image.manifest))
        self.assertIn("is missing on disk; fetching it again", b.log_text())
        self.assertEqual(await shared_cache_problems(self.s3, self.database), [])
        self.assertNotIn("Traceback", b.log_text())
