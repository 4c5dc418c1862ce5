"""The pull-through cache: answers from the index and store, else from upstream.

Manifest fetches are coalesced by (registry, repository, reference), blob
downloads and HEADs by (registry, digest), so concurrent clients cause one
upstream request, and a client never waits on another registry than the one it
named.  Content already verified on disk is shared by digest.  Replicas in a
cluster coalesce manifest fetches and blob downloads between them too
(cluster.py): one replica fetches, the others ask it.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ociregistry.bucket import BucketStore
from ociregistry.cluster import Cluster, Peer, PeerNotFound, manifest_subject, open_from_peer
from ociregistry.content import BlobSource, ContentStore, RemoteBlob
from ociregistry.downloads import BlobDownload, Downloads, Stored
from ociregistry.errors import (
    DigestMismatch,
    InvalidDigest,
    ManifestUnknown,
    NotFound,
    OCIError,
    ServiceUnavailable,
    Transient,
    Unavailable,
    blob_unknown,
    manifest_unknown,
    name_unknown,
)
from ociregistry.grammar import Upstream as Where
from ociregistry.grammar import check_digest, is_digest
from ociregistry.index import Index, IndexConnection, ManifestRecord, utc
from ociregistry.inflight import InFlight
from ociregistry.manifests import IMAGE_TYPES, describe
from ociregistry.s3 import S3Store
from ociregistry.upstream import Upstream, UpstreamNotFound

log = Logger()



# Manifests are small and never change for a digest; keeping the hot ones in
# memory spares a file read per request (the index still decides what exists).
_MANIFEST_MEMORY = 16 * 1024 * 1024
# Tags served stale are marked so that the warning is logged once per outage.  Clients
# name the tags, so the marks are bounded: a mark dropped early only repeats a warning.
_STALE_MARKS = 4096

K = TypeVar("K", bound=Hashable)


class ContentCache:
    """The most recently used contents by digest, up to a number of bytes."""

    def __init__(self, budget: int) -> None:
        self._budget = budget
        self._size = 0
        self._entries: OrderedDict[str, bytes] = OrderedDict()

    def get(self, digest: str) -> bytes | None:
        """The content, if held; it becomes the most recently used."""
        content = self._entries.get(digest)
        if content is not None:
            self._entries.move_to_end(digest)
        return content

    def put(self, digest: str, content: bytes) -> None:
        """Hold a content, dropping the least recently used beyond the budget."""
        if digest in self._entries or len(content) > self._budget:
            return
        self._entries[digest] = content
        self._size += len(content)
        while self._size > self._budget:
            _, dropped = self._entries.popitem(last=False)
            self._size -= len(dropped)


class Marks(Generic[K]):
    """A set of the most recently marked keys, up to a number of them."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._keys: OrderedDict[K, None] = OrderedDict()

    def __contains__(self, key: K) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: K) -> None:
        """Mark a key, forgetting the least recently marked beyond the limit."""
        self._keys[key] = None
        self._keys.move_to_end(key)
        if len(self._keys) > self._limit:
            self._keys.popitem(last=False)

    def discard(self, key: K) -> None:
        """Unmark a key, if marked."""
        self._keys.pop(key, None)


class Manifest(NamedTuple):
    """A manifest to serve, and where it came from: hit, miss (fetched) or stale."""

    record: ManifestRecord
    content: bytes
    source: str


@dataclass(frozen=True)
class Freshness:
    """How the cache treats tags and upstreams."""

    tag_ttl: float = 300.0
    always_pull_latest: bool = False
    air_gapped: bool = False


def air_gapped_error(what: NotFound) -> NotFound:
    """A not-found error that says why nothing was fetched."""
    return type(what)(f"{what.message} (not cached, and this server is air-gapped)", what.detail)


class Cache:
    """Everything a pull needs, from disk when cached and from upstream when not."""

    def __init__(
        self,
        index: Index,
        store: ContentStore,
        upstream: Upstream,
        downloads: Downloads,
        clock: IReactorTime,
        freshness: Freshness = Freshness(),
    ) -> None:
        self._index = index
        self._store = store
        self._upstream = upstream
        self._downloads = downloads
        self._clock = clock
        self._freshness = freshness
        self._manifest_fetches: InFlight[tuple[str, str, str], Manifest] = InFlight()
        # The fetches this replica gets from the replica that leads them, and from which one.
        self._following: dict[tuple[str, str, str], str] = {}
        # Per registry, like downloads: see downloads.py for why not per repository too.
        self._blob_heads: InFlight[tuple[str, str], int | None] = InFlight()
        self._stale: Marks[tuple[str, str, str]] = Marks(_STALE_MARKS)
        self._contents = ContentCache(_MANIFEST_MEMORY)

    @property
    def cluster(self) -> Cluster | None:
        """This replica's part in a cluster of replicas, or None when it is on its own."""
        return self._downloads.cluster

    @property
    def store(self) -> ContentStore:
        """Where the verified content lives."""
        return self._store

    async def close(self) -> None:
        """Abandon downloads, close upstream connections, record pull times and close the index."""
        self._upstream.stop_retrying()
        await self._downloads.close()
        await self._upstream.close()
        await self._index.close()

    @property
    def bucket(self) -> S3Store | None:
        """The bucket the content is in, for the prunes that delete what they remove; None on files."""
        return self._store.s3 if isinstance(self._store, BucketStore) else None

    def totals(self) -> tuple[int, int, int]:
        """Cached manifests, blobs, and their bytes on disk (waiting for the index: for start-up)."""
        return self._index.run_blocking(IndexConnection.totals)

    def downloading(self) -> int:
        """How many blob downloads are in progress."""
        return len(self._downloads)

    def health(self) -> str | None:
        """None when the index is readable and the image path writable, else the problem."""
        return self._index.readable() or self._store.writable()

    async def manifest(self, where: Where, reference: str, peer: bool = False) -> Manifest:
        """A manifest by tag or digest, fetched and stored on a miss, revalidated when stale.

        A ``peer`` (another replica, which found this one leading the fetch)
        is answered from this replica's own fetch, never from another replica.
        """
        if is_digest(reference):
            found = await self._cached_manifest_by_digest(reference)
            if found is None:
                found = await self._fetch(where, reference, peer)
        else:
            found = await self._tagged(where, reference, peer)
        await self._index.record_pull(found.record.digest, found.record.pulled)
        return found

    async def _tagged(self, where: Where, tag: str, peer: bool) -> Manifest:
        cached, fresh = await self._tag_lookup(where, tag)
        if cached is not None and fresh:
            return cached
        if self._freshness.air_gapped:
            raise air_gapped_error(manifest_unknown(tag))

        async def fresh_now() -> Manifest | None:
            again, fresh = await self._tag_lookup(where, tag)
            return again if fresh else None

        return await self._coalesced(where, tag, lambda: self._resolve_tag(where, tag, cached), peer, fresh_now)

    async def _tag_lookup(self, where: Where, tag: str) -> tuple[Manifest | None, bool]:
        """The manifest a tag points at in the cache, if any, and whether the tag is fresh."""
        found = await self._index.tag(where.registry, where.repository, tag)
        cached = await self._cached_manifest(found[0] if found else None)
        fresh = cached is not None and found is not None and (
            self._freshness.air_gapped or self._fresh(where, tag, found[1]))
        return cached, fresh

    def _fresh(self, where: Where, tag: str, confirmed: str) -> bool:
        """Whether a tag confirmed upstream at ``confirmed`` (as the index writes times) is still fresh."""
        ttl = self._upstream.settings(where.registry).manifest_ttl
        if ttl is None:
            ttl = self._freshness.tag_ttl
        if self._freshness.always_pull_latest and tag == "latest":
            ttl = 0.0
        # The index's times compare as text, which spares parsing one per request.
        return ttl == math.inf or confirmed > utc(self._clock.seconds() - ttl)

    async def _resolve_tag(self, where: Where, tag: str, cached: Manifest | None) -> Manifest:
        """Ask upstream with one HEAD where a tag points; fetch the manifest only if it is new.

        When the upstream cannot answer, a cached tag is served as it is.
        """
        key = (where.registry, where.repository, tag)
        try:
            try:
                digest = await self._upstream.manifest_digest(where.registry, where.repository, tag)
            except UpstreamNotFound:
                if cached is None:
                    raise manifest_unknown(tag) from None
                raise ManifestUnknown("the upstream no longer has this tag") from None
            if digest is None or not _verifiable(digest):
                found = await self._fetch_manifest(where, tag, tag)
            else:
                found = await self._point(where, tag, digest, cached)
        except OCIError as e:
            if cached is None:
                raise
            if key not in self._stale:
                self._stale.add(key)
                log.warn("Serving cached {where}:{tag}: upstream could not confirm it ({why})",
                         where=str(where), tag=tag, why=e.message)
            return cached._replace(source="stale")
        self._stale.discard(key)
        return found

    async def _point(self, where: Where, tag: str, digest: str, cached: Manifest | None) -> Manifest:
        """Point a tag at the digest upstream named, fetching the manifest unless it is cached.

        A prune may remove the manifest at any time (while upstream was asked, or
        from another process): the index then does not point the tag, and the
        manifest is fetched again.
        """
        if cached is not None and digest == cached.record.digest:
            found: Manifest | None = cached
        else:
            found = await self._cached_manifest_by_digest(digest)
        if found is None or not await self._index.point_tag(where.registry, where.repository, tag, digest):
            # Within the tag's fetch, which this replica leads: coalesced here, claimed by the tag.
            found = await self._manifest_fetches.run((where.registry, where.repository, digest),
                                                     lambda: self._fetch_manifest(where, digest, tag))
            # A fetch joined by digest may have recorded no tag.  Should a prune take the
            # manifest yet again, the answer stands and the tag is recorded on the next pull.
            await self._index.point_tag(where.registry, where.repository, tag, digest)
        if cached is not None and digest != cached.record.digest:
            log.info("Tag {tag} of {where} moved to {digest}", tag=tag, where=str(where), digest=digest)
        return found

    async def _cached_manifest(self, record: ManifestRecord | None) -> Manifest | None:
        if record is None:
            return None
        content = self._contents.get(record.digest)
        if content is None:
            content = await self._store.read_manifest(record.digest)
            if content is None or len(content) != record.size:
                log.warn("Cached manifest {digest} is missing on disk; fetching it again", digest=record.digest)
                await self._index.forget_manifest(record.digest)
                return None
            self._contents.put(record.digest, content)
        log.debug("Serving manifest {digest} from cache", digest=record.digest)
        return Manifest(record, content, "hit")

    async def _fetch(self, where: Where, digest: str, peer: bool) -> Manifest:
        """A manifest by digest from upstream (or the replica fetching it)."""
        if self._freshness.air_gapped:
            raise air_gapped_error(manifest_unknown(digest))
        return await self._coalesced(where, digest, lambda: self._fetch_manifest(where, digest, None), peer,
                                     lambda: self._cached_manifest_by_digest(digest))

    async def _cached_manifest_by_digest(self, digest: str) -> Manifest | None:
        """The cached manifest of a digest, if any."""
        return await self._cached_manifest(await self._index.manifest(digest))

    def _coalesced(self, where: Where, reference: str, fetch: Callable[[], Coroutine[Any, Any, Manifest]],
                   peer: bool, cached: Callable[[], Awaitable[Manifest | None]]) -> Deferred[Manifest]:
        """Run a manifest fetch once in this replica, and with a cluster once across the replicas.

        A replica that gets the lease first asks ``cached`` for what another
        replica may have fetched since this one looked.  A peer's request
        joins this replica's fetch or starts one that claims nothing: the
        peer asks because this replica leads the fetch, or did.  It is
        refused while this replica follows another for it, so that no two
        replicas wait on each other.
        """
        key = (where.registry, where.repository, reference)
        cluster = self.cluster
        if peer and key in self._following:
            raise ServiceUnavailable(f"this replica gets {reference} from {self._following[key]}; ask it")
        if cluster is None or peer:
            return self._manifest_fetches.run(key, fetch)

        async def lead() -> Manifest:
            return await cached() or await fetch()

        async def follow(owner: Peer) -> Manifest:
            self._following[key] = owner.url
            try:
                return await self._from_peer(where, reference, owner)
            finally:
                del self._following[key]

        return self._manifest_fetches.run(key, lambda: cluster.lead_or_follow(
            where.registry, manifest_subject(where.repository, reference), lead, follow,
            f"manifest {reference} of {where}"))

    async def _from_peer(self, where: Where, reference: str, owner: Peer) -> Manifest:
        """The manifest as the replica leading its fetch answers it, once that one has it in the shared index."""
        cluster, peers = self.cluster, self._downloads.peers
        assert cluster is not None and peers is not None
        try:
            response = await open_from_peer(peers, owner.url, where.registry, where.repository, "manifests",
                                            reference, cluster.url)
        except PeerNotFound:
            raise manifest_unknown(reference) from None
        content = await self._upstream.read_manifest(response, owner.url)
        named = (response.headers.getRawHeaders(b"docker-content-digest") or [b""])[0].decode("latin-1")
        if not _verifiable(named) or _digest(content, named.partition(":")[0]) != named or (
                is_digest(reference) and reference != named):
            raise Unavailable(f"{owner.url} answered {reference} with content that is not {named or 'named'}")
        record = await self._index.manifest(named)
        if record is None:
            raise Unavailable(f"{owner.url} answered {reference} with {named}, which the index does not hold")
        self._contents.put(named, content)
        return Manifest(record, content, "peer")

    async def _fetch_manifest(self, where: Where, reference: str, tag: str | None) -> Manifest:
        log.info("Pulling manifest {reference} from upstream {where}", reference=reference, where=str(where))
        try:
            content, content_type, header_digest = await self._upstream.fetch_manifest(
                where.registry, where.repository, reference
            )
        except UpstreamNotFound:
            raise manifest_unknown(reference) from None
        algorithm = reference.partition(":")[0] if is_digest(reference) else "sha256"
        digest = _digest(content, algorithm)
        if is_digest(reference) and digest != reference:
            raise DigestMismatch(f"upstream sent a manifest that does not match {reference}")
        if header_digest and header_digest.startswith(f"{algorithm}:") and header_digest != digest:
            raise DigestMismatch(f"upstream's Docker-Content-Digest {header_digest} does not match its manifest")
        media_type, references = describe(content, content_type, f"upstream {where.registry}")

        def row() -> Deferred[ManifestRecord]:
            return self._index.record_manifest(
                digest, media_type, len(content), where.registry, where.repository, references, tag=tag
            )

        if await self._index.manifest(digest) is None:
            writer = self._store.begin(digest)
            room = writer.write(content)
            if room is not None:
                await room
            try:
                record = await self._index.record_file(self._store, writer, row)
            finally:
                # Nobody reads a manifest while it is written: what readers would use can go.
                writer.release()
        else:
            record = await row()
        if media_type in IMAGE_TYPES:
            self._downloads.prefetch(where.registry, where.repository, [r.child for r in references])
        self._contents.put(digest, content)
        return Manifest(record, content, "miss")

    async def _stored_blob(self, digest: str) -> BlobSource | RemoteBlob | None:
        size = await self._index.blob_size(digest)
        if size is None:
            manifest = await self._index.manifest(digest)
            if manifest is None:
                return None
            size = manifest.size
        stored = await self._store.open_blob(digest, size)
        if stored is None:
            log.warn("Cached blob {digest} is missing in the store; fetching it again", digest=digest)
            await self._index.forget_blob(digest)
        return stored

    async def blob(self, where: Where, digest: str, peer: bool = False) -> BlobSource | RemoteBlob:
        """A blob to stream: on disk, or a download (joined or started) that has begun.

        A ``peer`` (another replica) is answered only from the store or this
        replica's own download from upstream, never from a relay, so that no
        request goes round the replicas.
        """
        stored = await self._stored_blob(digest)
        if stored is not None:
            return stored
        if self._freshness.air_gapped:
            raise air_gapped_error(blob_unknown(digest))
        download = self._downloads.fetch(where.registry, where.repository, digest, peer)
        try:
            await download.started.observe()
        except Stored:
            # Another replica stored it between the lookup above and this replica's claim.
            stored = await self._stored_blob(digest)
            if stored is None:
                raise ServiceUnavailable(f"blob {digest} was removed as it was looked up; retry") from None
            return stored
        if peer and download.relayed_from is not None:
            raise ServiceUnavailable(f"this replica streams {digest} from {download.relayed_from}; ask it")
        return download

    async def store_blob(self, where: Where, digest: str) -> BlobDownload | None:
        """Have a blob stored without reading it (a load): the download that stores it, or None once it is."""
        stored = await self._stored_blob(digest)
        if stored is not None:
            if isinstance(stored, BlobSource):
                stored.close()
            return None
        if self._freshness.air_gapped:
            raise air_gapped_error(blob_unknown(digest))
        return await self._downloads.store(where.registry, where.repository, digest)

    async def blob_size(self, where: Where, digest: str) -> int | None:
        """A blob's size for HEAD, asking upstream without downloading when not cached."""
        size = await self._index.blob_size(digest)
        if size is not None:
            return size
        download = self._downloads.running(where.registry, digest)
        if download is not None and download.started.fired:
            await download.started.observe()
            return download.size
        manifest = await self._index.manifest(digest)
        if manifest is not None:
            return manifest.size
        if self._freshness.air_gapped:
            raise air_gapped_error(blob_unknown(digest))

        async def head() -> int | None:
            try:
                return await self._upstream.head_blob(where.registry, where.repository, digest)
            except UpstreamNotFound:
                raise blob_unknown(digest) from None

        return await self._blob_heads.run((where.registry, digest), head)

    async def tags(self, where: Where, query: dict[str, str]) -> tuple[list[str], bool]:
        """The tag list: from upstream when reachable, else the cached tags."""
        if self._freshness.air_gapped:
            tags = await self._index.tags(where.registry, where.repository)
            if not tags:
                raise air_gapped_error(name_unknown(where.repository))
            return _page(tags, query)
        try:
            return await self._upstream.list_tags(where.registry, where.repository, query)
        except UpstreamNotFound:
            raise name_unknown(where.repository) from None
        except Transient:
            tags = await self._index.tags(where.registry, where.repository)
            if not tags:
                raise
            log.info("Upstream {registry} unavailable; listing cached tags", registry=where.registry)
        return _page(tags, query)


def _page(tags: list[str], query: dict[str, str]) -> tuple[list[str], bool]:
    """One page of a sorted tag list, per the n and last parameters."""
    last = query.get("last")
    if last:
        tags = [tag for tag in tags if tag > last]
    if "n" in query:
        count = int(query["n"])
        return tags[:count], len(tags) > count
    return tags, False


def _digest(content: bytes, algorithm: str) -> str:
    """The digest of a content by an algorithm hashlib knows."""
    return f"{algorithm}:{hashlib.new(algorithm, content).hexdigest()}"


def _verifiable(digest: str) -> bool:
    try:
        check_digest(digest)
        return True
    except InvalidDigest:
        return False
