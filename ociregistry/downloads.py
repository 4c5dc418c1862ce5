"""Blob downloads: one upstream GET per registry and digest, streamed to every reader as it grows.

Downloads are coalesced per upstream registry, never across registries: a
client asking one registry must not wait on another that is slow or hostile.
The same digest may then be downloaded from two registries at once, each into
a temporary file of its own; both are verified, the first renames its file into
place, and the second's rename replaces it with identical bytes (readers
holding the first file open keep it).

A download writes into the store's temporary file.  Readers (client
responses) open that file and read what has been written so far, waiting for
more as it arrives; when the digest is verified the file is renamed into
place and the index row added.  Until then the last byte is held back, so a
client never sees a clean end to bytes that turn out wrong.

Replicas on one index and bucket (a Cluster) download each blob once between
them: the in-flight download first claims the blob's lease.  The owner
downloads from upstream and stores the blob; every other replica relays the
owner's stream (cluster.py) into a spool file of its own, which its readers
follow just the same, and checks the digest of what it relayed, but stores
nothing: the owner does.  When the owner cannot be reached or its stream
breaks, the relay claims again, and takes the download over once the owner's
lease has expired; the bytes relayed so far stay, and are uploaded first.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent

from ociregistry.cluster import Cluster, Peer, PeerNotFound, open_from_peer
from ociregistry.content import BlobSource, ContentStore, ContentWriter
from ociregistry.errors import DigestMismatch as WrongContent
from ociregistry.errors import OCIError, ServiceUnavailable, Unavailable, blob_unknown
from ociregistry.index import Index
from ociregistry.inflight import Observable
from ociregistry.metrics import Metrics
from ociregistry.store import DigestMismatch, SizeExceeded
from ociregistry.upstream import Upstream, UpstreamNotFound

log = Logger()


class Stored(Exception):
    """The blob was recorded in the index after the lookup that started its download: read it from the store."""


class BlobDownload(BlobSource):
    """A blob being fetched from upstream into a temporary file."""

    def __init__(self, digest: str, writer: ContentWriter | None) -> None:
        self.digest = digest
        self.size = None
        # With a cluster, the writer is chosen once the lease says who stores the blob.
        self.writer = writer
        # The replica whose download this one relays, or None when this one is from upstream.
        self.relayed_from: str | None = None
        self._complete = False
        self._failure: Failure | None = None
        self._waiters: list[tuple[int, Deferred[None]]] = []
        self.started: Observable[None] = Observable()
        self.finished: Observable[None] = Observable()

    @property
    def _writer(self) -> ContentWriter:
        assert self.writer is not None, "readers join a download once it has begun"
        return self.writer

    def open(self) -> int:
        return os.open(self._writer.path, os.O_RDONLY | os.O_CLOEXEC)

    def available(self) -> int:
        if self._failure is not None or self.writer is None:
            return 0
        if self._complete:
            return self._writer.size
        return max(0, self._writer.size - 1)

    def wait_for(self, offset: int) -> Deferred[None]:
        if self._failure is not None:
            return fail(self._failure)
        if self._complete or self.available() > offset:
            return succeed(None)
        waiter: Deferred[None] = Deferred(lambda d: self._waiters.remove((offset, d)))
        self._waiters.append((offset, waiter))
        return waiter

    def begin(self, size: int | None) -> None:
        """The upstream (or the owner) answered: readers may send headers now; a source taking over says it again."""
        if not self.started.fired:
            self.size = size
            self.started.fire(None)

    def sink(self, count: Callable[[int], object]) -> Callable[[bytes], Deferred[None] | None]:
        """Where a source's body goes, each chunk counted: what an earlier source that broke wrote is skipped."""
        skip = self._writer.size

        def write(data: bytes) -> Deferred[None] | None:
            nonlocal skip
            count(len(data))
            if skip:
                taken = min(skip, len(data))
                skip -= taken
                data = data[taken:]
                if not data:
                    return None
            return self.write(data)

        return write

    def write(self, data: bytes) -> Deferred[None] | None:
        """Store more bytes and wake the readers waiting for them; a Deferred says "pause until it fires"."""
        if self.size is not None and self._writer.size + len(data) > self.size:
            raise SizeExceeded(f"upstream sent more than {self.size} bytes for {self.digest}")
        room = self._writer.write(data)
        available = self.available()
        ready = [w for w in self._waiters if w[0] < available]
        if ready:
            self._waiters = [w for w in self._waiters if w[0] >= available]
            for _, waiter in ready:
                waiter.callback(None)
        return room

    async def commit(self, index: Index, store: ContentStore) -> int:
        """Verify, store and record; readers may then send the last byte."""
        if self.size is not None and self._writer.size != self.size:
            raise Unavailable(f"upstream ended {self.digest} early")
        await index.record_file(store, self._writer, lambda: index.record_blob(self.digest, self._writer.size))
        self._complete = True
        self.size = self._writer.size
        self._wake(None)
        return self.size

    def verify(self) -> int:
        """A relay is complete: check the digest of what it relayed; readers may then send the last byte.

        Nothing is stored: the owner stores the blob.
        """
        if self.size is not None and self._writer.size != self.size:
            raise Unavailable(f"{self.relayed_from} ended {self.digest} early")
        actual = self._writer.actual_digest()  # type: ignore[attr-defined]
        if actual != self.digest:
            raise DigestMismatch(self.digest, actual)
        self._complete = True
        self.size = self._writer.size
        self._wake(None)
        return self.size

    def release(self) -> None:
        """No new reader can join now: what only readers used may go (readers keep their descriptors)."""
        if self.relayed_from is not None:
            # A relay's spool file is all there is of it.
            self._writer.abort()
        else:
            self._writer.release()

    def fail(self, failure: Failure) -> None:
        """Abandon the download; every reader and waiter gets the failure."""
        if self.writer is not None:
            self.writer.abort()
        self._failure = failure
        if not self.started.fired:
            self.started.fire(failure)
        self._wake(failure)

    def _wake(self, result: Failure | None) -> None:
        waiters, self._waiters = self._waiters, []
        for _, waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)


# The repository is not part of the key: upstream grants pulls per repository, but
# the bytes are verified against the digest, so a download from one repository of a
# registry is the very content a client of another repository there asked for (and
# verified content on disk is shared by digest in any case).
_Key = tuple[str, str]  # (registry, digest)


class Downloads:
    """The blob downloads in progress, at most one per registry and digest."""

    def __init__(
        self,
        store: ContentStore,
        index: Index,
        upstream: Upstream,
        metrics: Metrics,
        prefetch_concurrency: int = 3,
        cluster: Cluster | None = None,
        peers: IAgent | None = None,
    ) -> None:
        # With a cluster (replicas sharing the index and a bucket), ``peers`` reaches the other replicas.
        self.cluster = cluster
        self._peers = peers
        self._metrics = metrics
        self._store = store
        self._index = index
        self._upstream = upstream
        self._running: dict[_Key, BlobDownload] = {}
        self._tasks: dict[_Key, Deferred[None]] = {}
        self._prefetch_concurrency = prefetch_concurrency
        self._prefetches: dict[str, DeferredSemaphore] = {}
        self._closed = False

    def __len__(self) -> int:
        return len(self._running)

    @property
    def peers(self) -> IAgent | None:
        """What reaches the other replicas, with a cluster."""
        return self._peers

    def running(self, registry: str, digest: str) -> BlobDownload | None:
        """The download in progress of a digest from a registry, if any."""
        return self._running.get((registry, digest))

    def fetch(self, registry: str, repository: str, digest: str, peer: bool = False) -> BlobDownload:
        """Join the download of a blob from a registry, starting it if it is not running.

        For a ``peer`` (another replica relaying this one) a download started
        here is from upstream, never from a replica in turn.
        """
        key = (registry, digest)
        download = self._running.get(key)
        if download is None:
            claims = self.cluster is not None and not peer
            download = BlobDownload(digest, None if claims else self._store.begin(digest))
            self._running[key] = download
            task = Deferred.fromCoroutine(self._run(download, registry, repository, claims))
            if key in self._running:
                self._tasks[key] = task
        return download

    async def close(self) -> None:
        """Abandon every download: their temporary files go, readers are cut off."""
        self._closed = True
        for task in list(self._tasks.values()):
            task.cancel()

    def prefetch(self, registry: str, repository: str, digests: list[str]) -> None:
        """Fetch blobs in the background, a few at a time per registry, so the image is complete offline.

        Each registry has slots of its own: a slow one holds back only its own images.
        """
        slots = self._prefetches.get(registry)
        if slots is None:
            slots = self._prefetches[registry] = DeferredSemaphore(self._prefetch_concurrency)
        # Queued before any is watched, so that the slots are dropped only when all are done.
        jobs = [slots.run(self._prefetch_one, registry, repository, digest) for digest in digests]
        for job in jobs:
            job.addBoth(self._prefetched, registry, slots)

    def _prefetched(self, result: Failure | None, registry: str, slots: DeferredSemaphore) -> None:
        # Registries are named by clients: forget the slots of one with nothing left to fetch.
        if slots.tokens == slots.limit and not slots.waiting and self._prefetches.get(registry) is slots:
            del self._prefetches[registry]
        if isinstance(result, Failure):
            if result.check(OCIError):
                # A failure named for what went wrong (the index or the store is down) needs no traceback.
                log.warn("Prefetch from {registry} failed: {why}", registry=registry, why=result.getErrorMessage())
            else:
                log.failure("Prefetch from {registry} failed", result, registry=registry)

    def _prefetch_one(self, registry: str, repository: str, digest: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._prefetch(registry, repository, digest))

    async def store(self, registry: str, repository: str, digest: str) -> BlobDownload | None:
        """The download that stores a blob nobody waits to read (a prefetch, a load); None once stored, or closing.

        While another replica holds the blob's lease, this waits for the lease to
        end and looks again rather than relay bytes it would not store; a replica
        still preloading answers no peer, so two relaying each other would wait forever.
        """
        key = (registry, digest)
        while await self._index.blob_size(digest) is None and not self._closed:
            if self.cluster is not None and key not in self._running:
                claim = await self.cluster.claim(registry, digest)
                if isinstance(claim, Peer):
                    await self.cluster.outlast(registry, digest)
                    continue
                if await self._index.blob_size(digest) is not None:
                    # Stored by the owner between the look and the claim.
                    await self.cluster.release(registry, digest)
                    return None
            return self.fetch(registry, repository, digest)
        return None

    async def _prefetch(self, registry: str, repository: str, digest: str) -> None:
        download = None if self._closed else await self.store(registry, repository, digest)
        if download is None:
            return
        waiting = download.finished.observe()
        # A failed prefetch is logged by the download; the image is fetched on demand later.
        waiting.addErrback(lambda failure: None)
        await waiting

    async def _run(self, download: BlobDownload, registry: str, repository: str, claims: bool) -> None:
        digest = download.digest
        key = (registry, digest)
        result: Failure | None = None
        try:
            if claims:
                await self._claimed(download, registry, repository)
            else:
                await self._download(download, registry, repository)
        except UpstreamNotFound:
            result = Failure(blob_unknown(digest))
        except Stored:
            result = Failure()
        except CancelledError:
            result = Failure(ServiceUnavailable(f"download of {digest} was abandoned"))
        except DigestMismatch as e:
            log.warn("Upstream {registry} sent wrong bytes for {digest} (they hash to {actual})",
                     registry=registry, digest=digest, actual=e.actual)
            result = Failure(WrongContent(f"upstream sent content that does not match {digest}"))
        except OCIError:
            result = Failure()
        except SizeExceeded as e:
            result = Failure(Unavailable(str(e)))
        except Exception as e:
            log.failure("Download of {digest} from {registry} failed", digest=digest, registry=registry)
            result = Failure(Unavailable(f"download of {digest} failed: {e}"))
        del self._running[key]
        self._tasks.pop(key, None)
        if result is not None:
            download.fail(result)
        else:
            download.release()
        download.finished.fire(result)


    async def _download(self, download: BlobDownload, registry: str, repository: str) -> None:
        """Download from upstream, verify, store and record."""
        digest = download.digest
        response = await self._upstream.open_blob(registry, repository, digest)
        length = response.length
        download.begin(length if isinstance(length, int) else None)
        fetched = self._metrics.bytes_fetched.labels(registry)
        await self._upstream.read_body(response, download.sink(fetched.inc), registry)
        # If another registry's download of this digest committed first, this commit
        # renames identical verified bytes over its file, and the index keeps one row.
        size = await download.commit(self._index, self._store)
        log.info("Fetched blob {digest} ({size} bytes) from {registry}/{repository}",
                 digest=digest, size=size, registry=registry, repository=repository)

    async def _claimed(self, download: BlobDownload, registry: str, repository: str) -> None:
        """Download as the cluster's owner of the blob, or relay the owner's download, taking it over if it dies."""
        cluster = self.cluster
        assert cluster is not None
        digest = download.digest

        async def lead() -> None:
            # The owner before may have recorded the blob and released the lease after this
            # replica's lookup missed: then nothing is downloaded again.  (Once readers follow a
            # relay, the download is taken over instead.)
            if not download.started.fired and await self._index.blob_size(digest) is not None:
                raise Stored(digest)
            # What a relay spooled before its owner died is uploaded first.
            relayed = download.writer
            download.writer = self._store.begin(digest) if relayed is None else self._store.adopt(relayed)
            download.relayed_from = None
            await self._download(download, registry, repository)

        await cluster.lead_or_follow(registry, digest, lead,
                                     lambda owner: self._relay(download, owner, registry, repository),
                                     f"blob {digest}")

    async def _relay(self, download: BlobDownload, owner: Peer, registry: str, repository: str) -> None:
        """Stream the owner's download into a spool file of this replica's, and verify it; the owner stores it."""
        assert self.cluster is not None and self._peers is not None
        digest = download.digest
        try:
            response = await open_from_peer(self._peers, owner.url, registry, repository, "blobs", digest,
                                            self.cluster.url)
        except PeerNotFound:
            raise blob_unknown(digest) from None
        if download.writer is None:
            download.writer = self._store.relay(digest)
        download.relayed_from = owner.url
        length = response.length
        download.begin(length if isinstance(length, int) else None)
        await self._upstream.read_body(response, download.sink(lambda count: None), owner.url)
        size = download.verify()
        log.info("Streamed blob {digest} ({size} bytes) from {peer}, which stores it",
                 digest=digest, size=size, peer=owner.url)
