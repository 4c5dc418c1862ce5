"""The content store in an S3-compatible bucket, shared by every replica.

Manifests and blobs live at content-addressed keys (``s3.key_for``).  A new
object is written to a local spool file under the image path's ``tmp/`` (which
clients of this replica read while it grows, as with the files store) and, from
that file, to a multipart upload as the bytes arrive.  The upload lags the
spool by at most a few parts: past that, ``write`` asks the download to pause
its upstream until the bucket has taken more.  Only after the digest is
verified is the upload completed; on any failure it is aborted, so nothing
unverified ever becomes visible in the bucket.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable
from functools import partial

from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure

from ociregistry.content import ContentWriter, RemoteBlob
from ociregistry.errors import StorageUnavailable
from ociregistry.s3 import MIB, ObjectBody, S3Store, S3Writer, key_for
from ociregistry.store import BlobStore, DigestMismatch, Writer

log = Logger()

# How far the upload may fall behind the spool before the upstream is paused.
_LAG = 16 * MIB
# How much of the spool is handed to the upload at a time.
_SLICE = 1 * MIB
# How long a redirect to the bucket stays valid: long enough to follow, short enough not to share.
REDIRECT_SECONDS = 300


class BucketBlob(RemoteBlob):
    """A verified blob in the bucket, of the size the index records; its bytes are fetched when sent."""

    def __init__(self, store: BucketStore, digest: str, size: int) -> None:
        self.digest = digest
        self.size = size
        self._store = store

    def redirect(self) -> str | None:
        """A short-lived URL that serves the blob straight from the bucket, when redirects are on."""
        if not self._store.redirect:
            return None
        return self._store.s3.presign_get(key_for(self.digest), REDIRECT_SECONDS)

    async def open_range(self, start: int, end: int) -> ObjectBody:
        """The bytes ``start`` to ``end`` (exclusive), ready to deliver; StorageUnavailable if the bucket fails."""
        whole = start == 0 and end == self.size
        body = await self._store.s3.open_range(key_for(self.digest), None if whole else start,
                                               None if whole else end - 1)
        if body is None:
            # Removed since it was looked up (a prune); the client's next try fetches it again.
            raise StorageUnavailable(f"blob {self.digest} was removed from the bucket while it was asked for")
        return body


class BucketWriter:
    """A spool file that readers follow, uploaded to the bucket as it grows; completed once verified."""

    def __init__(self, spool: Writer, upload: S3Writer, aborting: set[Deferred[None]] | None = None) -> None:
        self.digest = spool.digest
        self.path = spool.path
        # One upload of a digest cannot be told from another replica's: an object whose
        # row could not be written is left for the sweep rather than removed.
        self.identity: tuple[int, int] | None = None
        self._spool = spool
        self._upload = upload
        self._uploaded = 0
        self._failure: Failure | None = None
        self._pump: Deferred[None] | None = None
        self._room: Deferred[None] | None = None
        self._reader: int | None = os.open(spool.path, os.O_RDONLY | os.O_CLOEXEC)
        # The store's aborts still under way, which closing it waits for.
        self._aborting = set() if aborting is None else aborting

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._spool.size

    def write(self, data: bytes) -> Deferred[None] | None:
        """Spool the bytes (readers see them at once); a Deferred while the upload is too far behind."""
        if self._failure is not None:
            self._failure.raiseException()
        try:
            self._spool.write(data)
        except BaseException:
            self.abort()
            raise
        if self._pump is None:
            self._start()
        if self._room is None and self.size - self._uploaded > _LAG:
            self._room = Deferred()
        return self._room

    async def _send(self) -> None:
        """Hand the spooled bytes to the upload in order, one slice at a time."""
        while self._uploaded < self.size and self._reader is not None:
            data = os.pread(self._reader, min(_SLICE, self.size - self._uploaded), self._uploaded)
            if not data:
                raise StorageUnavailable(f"the spool file of {self.digest} is shorter than written")
            await self._upload.write(data)
            self._uploaded += len(data)
            if self._room is not None and self.size - self._uploaded <= _LAG // 2:
                room, self._room = self._room, None
                room.callback(None)

    def _start(self) -> None:
        self._pump = pump = Deferred.fromCoroutine(self._send())
        # (Cleared at once when the slice was taken without waiting for the bucket.)
        pump.addBoth(self._pumped)

    def _pumped(self, result: Failure | None) -> None:
        self._pump = None
        if isinstance(result, Failure):
            self._failed(result)

    def _failed(self, failure: Failure) -> None:
        self._failure = failure
        room, self._room = self._room, None
        if room is not None:
            room.errback(failure)
        elif not failure.check(CancelledError):
            log.warn("The upload of {digest} failed: {why}", digest=self.digest, why=failure.getErrorMessage())

    async def commit(self) -> str:
        """Verify, send the rest, and complete the object in the bucket; returns its key."""
        actual = self._spool.actual_digest()
        if actual != self.digest:
            self.abort()
            raise DigestMismatch(self.digest, actual)
        try:
            while True:
                if self._failure is not None:
                    self._failure.raiseException()
                if self._pump is not None:
                    await self._pump
                elif self._uploaded < self.size:
                    self._start()
                else:
                    break
            return await self._upload.commit()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the spool file and abort the upload: nothing becomes visible."""
        if self._pump is not None:
            self._pump.cancel()
        self.release()
        aborted = Deferred.fromCoroutine(self._upload.abort())
        aborted.addErrback(lambda failure: log.failure("Aborting the upload of {digest}", failure, digest=self.digest))
        if not aborted.called:
            self._aborting.add(aborted)
            aborted.addBoth(lambda _: self._aborting.discard(aborted))

    def release(self) -> None:
        """Drop the spool file (readers that opened it keep their descriptors)."""
        if self._reader is not None:
            os.close(self._reader)
            self._reader = None
        self._spool.abort()


class BucketStore:
    """Verified content in a bucket, with a local spool under the image path for downloads in progress."""

    def __init__(self, s3: S3Store, spool: BlobStore, redirect: bool = False,
                 abandon_uploads_after: float = 3600.0) -> None:
        self.s3 = s3
        self.redirect = redirect
        self._abandon_after = abandon_uploads_after
        self.root = spool.root
        self._spool = spool
        self._problem: str | None = None
        self._aborting: set[Deferred[None]] = set()
        # Told (digest, key, upload id) of each multipart upload once begun: a cluster records it with its lease.
        self.upload_begun: Callable[[str, str, str], Awaitable[None]] | None = None

    @property
    def abandon_uploads_after(self) -> float:
        """How old an upload no one recorded must be before the sweep takes it for a crashed writer's."""
        return self._abandon_after

    def prepare(self) -> int:
        """Create the spool area and sweep spool files of a previous run."""
        return self._spool.prepare()

    def writable(self) -> str | None:
        """Why the bucket (last checked) or the spool cannot take new content, or None."""
        return self._problem or self._spool.writable()

    async def check(self) -> None:
        """Ask the bucket whether it answers, for /health; a change is logged."""
        try:
            await self.s3.check_bucket()
        except CancelledError:
            raise
        except StorageUnavailable as e:
            if self._problem is None:
                log.warn("The bucket is failing: {why}", why=e.message)
            self._problem = e.message
            return
        if self._problem is not None:
            log.info("The bucket answers again")
        self._problem = None

    async def sweep(self, stale: bool = True, keep: Iterable[str] = ()) -> None:
        """Abort again the uploads whose abort failed; with ``stale``, those a crashed replica left too (begun
        long enough ago, and not in ``keep``: downloads of other replicas in progress)."""
        try:
            await self.s3.retry_aborts()
            swept = await self.s3.sweep_uploads(self._abandon_after, keep) if stale else 0
        except CancelledError:
            raise
        except StorageUnavailable as e:
            log.warn("Could not sweep stale uploads: {why}", why=e.message)
            return
        if swept:
            log.info("Aborted {swept} multipart uploads left by crashed replicas", swept=swept)

    async def abort_uploads(self, uploads: list[tuple[str, str]], whose: str) -> None:
        """Abort multipart uploads (key, upload id) a download left (``whose``); one that fails is retried by the sweep."""
        for key, upload_id in uploads:
            try:
                await self.s3.abort_upload(key, upload_id)
            except CancelledError:
                raise
            except StorageUnavailable as e:
                log.warn("Could not abort the upload of {key} left by {whose} ({why}); the sweep tries again",
                         key=key, whose=whose, why=e.message)
            else:
                log.info("Aborted the upload of {key} left by {whose}", key=key, whose=whose)

    def begin(self, digest: str, limit: int | None = None) -> BucketWriter:
        """Start spooling and uploading content that must hash to ``digest``; StorageUnavailable while the bucket fails."""
        if self._problem is not None:
            # Refused before the client's first byte, rather than cut off once the first part fails.
            raise StorageUnavailable(self._problem)
        return self.adopt(self._spool.begin(digest, limit), limit)

    def relay(self, digest: str) -> Writer:
        """A spool file only, for a blob another replica downloads and stores: hashed as it grows, never uploaded."""
        return self._spool.begin(digest)

    def adopt(self, spool: ContentWriter, limit: int | None = None) -> BucketWriter:
        """Upload a spool file to the bucket, what it holds already first, then the rest as it grows."""
        assert isinstance(spool, Writer), "a relay spools to a file (relay)"
        digest = spool.digest
        began = None if self.upload_begun is None else partial(self.upload_begun, digest)
        return BucketWriter(spool, self.s3.begin(key_for(digest), digest, limit, began), self._aborting)

    async def open_blob(self, digest: str, size: int) -> BucketBlob | None:
        """The blob in the bucket, as the index recorded it, or None when the bucket holds no such object.

        One HEAD asks (as CNCF distribution stats a blob before serving it), so
        that a row whose object is gone is forgotten and the blob fetched again,
        as a file that is gone is; the bytes are asked for when sent.
        """
        if await self.s3.stat(key_for(digest)) != size:
            return None
        return BucketBlob(self, digest, size)

    async def read_manifest(self, digest: str) -> bytes | None:
        """A stored manifest, read whole from the bucket, or None."""
        return await self.s3.read(key_for(digest))

    async def close(self) -> None:
        """Let the aborts of failed uploads end, then close the connections to the bucket."""
        await DeferredList(list(self._aborting))
        await self.s3.close()
