"""The pull-through cache: answers from the index and store, else from upstream.

Manifest fetches are coalesced by (registry, repository, reference) and blob
downloads by digest, so concurrent clients cause one upstream request.
"""

from __future__ import annotations

import hashlib
import os

from twisted.logger import Logger

from ociregistry.downloads import BlobSource, Downloads, StoredBlob
from ociregistry.errors import OCIError, blob_unknown, manifest_unknown, name_unknown
from ociregistry.grammar import Upstream as Where
from ociregistry.grammar import is_digest
from ociregistry.index import Index, ManifestRecord
from ociregistry.inflight import InFlight
from ociregistry.manifests import IMAGE_TYPES, describe
from ociregistry.store import BlobStore
from ociregistry.upstream import Upstream, UpstreamNotFound

log = Logger()

Manifest = tuple[ManifestRecord, bytes]


class Cache:
    """Everything a pull needs, from disk when cached and from upstream when not."""

    def __init__(self, index: Index, store: BlobStore, upstream: Upstream, downloads: Downloads) -> None:
        self._index = index
        self._store = store
        self._upstream = upstream
        self._downloads = downloads
        self._manifest_fetches: InFlight[tuple[str, str, str], Manifest] = InFlight()
        self._blob_heads: InFlight[str, int | None] = InFlight()

    async def close(self) -> None:
        """Abandon downloads, close upstream connections, record pull times and close the index."""
        await self._downloads.close()
        await self._upstream.close()
        self._index.close()

    async def manifest(self, where: Where, reference: str) -> Manifest:
        """A manifest by tag or digest, fetched and stored on a miss."""
        cached = self._cached_manifest(where, reference)
        if cached is None:
            key = (where.registry, where.repository, reference)
            cached = await self._manifest_fetches.run(key, lambda: self._fetch_manifest(where, reference))
        self._index.record_pull(cached[0].digest)
        return cached

    def _cached_manifest(self, where: Where, reference: str) -> Manifest | None:
        if is_digest(reference):
            record = self._index.manifest(reference)
        else:
            record = self._index.manifest_for_tag(where.registry, where.repository, reference)
        if record is None:
            return None
        content = self._store.read(record.digest)
        if content is None or len(content) != record.size:
            log.warn("Cached manifest {digest} is missing on disk; fetching it again", digest=record.digest)
            self._index.forget_manifest(record.digest)
            return None
        log.debug("Serving manifest {digest} from cache", digest=record.digest)
        return record, content

    async def _fetch_manifest(self, where: Where, reference: str) -> Manifest:
        log.info("Pulling manifest {reference} from upstream {where}", reference=reference, where=str(where))
        try:
            content, content_type, header_digest = await self._upstream.fetch_manifest(
                where.registry, where.repository, reference
            )
        except UpstreamNotFound:
            raise manifest_unknown(reference)
        algorithm = reference.partition(":")[0] if is_digest(reference) else "sha256"
        digest = f"{algorithm}:{hashlib.new(algorithm, content).hexdigest()}"
        if is_digest(reference) and digest != reference:
            raise OCIError(502, "DIGEST_INVALID", f"upstream sent a manifest that does not match {reference}")
        if header_digest and header_digest.startswith(f"{algorithm}:") and header_digest != digest:
            raise OCIError(502, "DIGEST_INVALID", f"upstream's Docker-Content-Digest {header_digest} does not match its manifest")
        media_type, references = describe(content, content_type, f"upstream {where.registry}")
        if self._index.manifest(digest) is None:
            writer = self._store.begin(digest)
            writer.write(content)
            await writer.commit()
        record = self._index.record_manifest(
            digest, media_type, len(content), where.registry, where.repository, references,
            tag=None if is_digest(reference) else reference,
        )
        if media_type in IMAGE_TYPES:
            self._downloads.prefetch(where.registry, where.repository, [r.child for r in references])
        return record, content

    def _stored_blob(self, digest: str) -> StoredBlob | None:
        size = self._index.blob_size(digest)
        if size is None:
            manifest = self._index.manifest(digest)
            if manifest is None:
                return None
            size = manifest.size
        path = self._store.path_for(digest)
        if not os.path.exists(path):
            log.warn("Cached blob {digest} is missing on disk; fetching it again", digest=digest)
            self._index.forget_blob(digest)
            return None
        return StoredBlob(digest, size, path)

    async def blob(self, where: Where, digest: str) -> BlobSource:
        """A blob to stream: on disk, or a download (joined or started) that has begun."""
        stored = self._stored_blob(digest)
        if stored is not None:
            return stored
        download = self._downloads.fetch(where.registry, where.repository, digest)
        await download.started.observe()
        return download

    async def blob_size(self, where: Where, digest: str) -> int | None:
        """A blob's size for HEAD, asking upstream without downloading when not cached."""
        size = self._index.blob_size(digest)
        if size is not None:
            return size
        download = self._downloads.running(digest)
        if download is not None and download.started.fired:
            await download.started.observe()
            return download.size
        manifest = self._index.manifest(digest)
        if manifest is not None:
            return manifest.size

        async def head() -> int | None:
            try:
                return await self._upstream.head_blob(where.registry, where.repository, digest)
            except UpstreamNotFound:
                raise blob_unknown(digest)

        return await self._blob_heads.run(digest, head)

    async def tags(self, where: Where, query: dict[str, str]) -> tuple[list[str], bool]:
        """The tag list: from upstream when reachable, else the cached tags."""
        try:
            return await self._upstream.list_tags(where.registry, where.repository, query)
        except UpstreamNotFound:
            raise name_unknown(where.repository)
        except OCIError as e:
            tags = self._index.tags(where.registry, where.repository)
            if e.status < 500 and e.status != 429 or not tags:
                raise
            log.info("Upstream {registry} unavailable; listing cached tags", registry=where.registry)
        last = query.get("last")
        if last:
            tags = [tag for tag in tags if tag > last]
        if "n" in query:
            count = int(query["n"])
            return tags[:count], len(tags) > count
        return tags, False
