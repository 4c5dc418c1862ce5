"""An index row that cannot be written after its file was renamed into place: the file goes again."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail
from twisted.web.client import ResponseFailed

from ociregistry.index import IndexUnavailable
from ociregistry.store import StorageFull
from tests.fakes import digest_of, make_image
from tests.test_pull import ServerTestCase


def full(*args: Any, **kwargs: Any) -> Deferred[Any]:
    """What the index answers a write when its disk is full."""
    return fail(StorageFull("the index cannot grow: database or disk is full"))


class RecordFaultTests(ServerTestCase):
    """Our site over a fake upstream, with an index whose writes of new rows fail."""

    def stored(self) -> list[str]:
        """The files under blobs/."""
        found: list[str] = []
        for _, _, names in os.walk(os.path.join(self.image_path, "blobs")):
            found += names
        return sorted(found)

    async def start_with_blob(self, content: bytes) -> str:
        """Start, with an upstream image whose layer is ``content``; the layer's digest."""
        await self.start()
        self.upstream.add_image("app", "v1", make_image(content))
        return digest_of(content)

    async def clean_end(self, path: str) -> bool:
        """Whether a GET's body ends cleanly (else the connection was aborted under it)."""
        response = await self.client.get(self.base + path)
        self.assertEqual(response.code, 200)
        try:
            await response.content()
        except ResponseFailed:
            return False
        return True

    def test_manifest_not_recorded(self) -> Deferred[None]:
        """A manifest whose row cannot be written is a JSON 507 and leaves no file in blobs/."""
        async def run() -> None:
            await self.start()
            image = make_image(b"layer")
            self.upstream.add_image("app", "v1", image)
            self.server_index.record_manifest = full  # type: ignore[method-assign]
            response, body = await self.get("/v2/app/manifests/v1")
            self.assertEqual(response.code, 507, body)
            self.assertEqual(json.loads(body)["errors"][0]["code"], "UNAVAILABLE")
            self.assertEqual(self.stored(), [])
            self.assertIsNone(self.index.manifest(image.digest))
        return Deferred.fromCoroutine(run())

    def test_blob_not_recorded(self) -> Deferred[None]:
        """A blob whose row cannot be written fails its download (507), never ends cleanly, and leaves no file."""
        async def run() -> None:
            content = b"blob" * 4096
            digest = await self.start_with_blob(content)
            self.server_index.record_blob = full  # type: ignore[method-assign]
            clean = await self.clean_end(f"/v2/app/blobs/{digest}")
            self.assertEqual(self.stored(), [])
            self.assertIsNone(self.index.blob_size(digest))
            self.assertFalse(clean)
            self.assertEqual(os.listdir(os.path.join(self.image_path, "tmp")), [])
        return Deferred.fromCoroutine(run())

    def test_blob_recorded_by_another_stays(self) -> Deferred[None]:
        """A file that a row names by the time the write failed stays: it is someone's cached blob."""
        async def run() -> None:
            content = b"shared" * 4096
            digest = await self.start_with_blob(content)
            record: Callable[..., Deferred[None]] = self.server_index.record_blob

            def recorded_then_lost(*args: Any) -> Deferred[None]:
                # The row is written (as another download's would be), but this answer is lost.
                written = record(*args)
                written.addCallback(lambda _: fail(IndexUnavailable("connection lost")))
                return written

            self.server_index.record_blob = recorded_then_lost  # type: ignore[method-assign]
            self.assertFalse(await self.clean_end(f"/v2/app/blobs/{digest}"))
            self.assertEqual(self.stored(), [digest.partition(":")[2]])
            self.assertEqual(self.index.blob_size(digest), len(content))
        return Deferred.fromCoroutine(run())
