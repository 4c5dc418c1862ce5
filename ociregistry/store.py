"""Content-addressed files under the image path, written crash-safely.

Every manifest and blob lives at ``blobs/<algorithm>/<hex>``.  New content is
written to a private file in ``tmp/`` while it is hashed, synced, and only
renamed into place once its digest is verified, so a crash leaves either
nothing or a complete, verified object.  A write that fails for any reason
closes its file and removes it; a full disk is a ``StorageFull`` (507) for new
content, while what is stored keeps being served.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ociregistry.content import ContentWriter, StoredBlob
from ociregistry.errors import InsufficientStorage

log = Logger()

DeferToThread = Callable[..., "Deferred[None]"]

# Below this much free space new content is refused before it is written, and
# /health reports the disk as full.
MINIMUM_FREE = 1024 * 1024
_FULL = (errno.ENOSPC, errno.EDQUOT)


class StorageFull(InsufficientStorage):
    """The disk under the image path has no room for new content."""

    def __init__(self, why: str) -> None:
        super().__init__(f"the cache has no room for new content: {why}")
        self.why = why


class CacheUnusable(Exception):
    """The image path or its index cannot be used at all; the message says why and what to do."""


class DigestMismatch(Exception):
    """The bytes written do not hash to the digest they were fetched as."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class SizeExceeded(Exception):
    """More bytes arrived than the limit allows."""


class BlobStore:
    """The content-addressed files and the temporary area for writes in progress."""

    def __init__(self, root: str, defer_to_thread: DeferToThread) -> None:
        self.root = root
        self._blobs = os.path.join(root, "blobs")
        self._tmp = os.path.join(root, "tmp")
        self._defer_to_thread = defer_to_thread
        # The room the last write that found no space had, until there is more than that.
        self._full_at: int | None = None

    def prepare(self) -> int:
        """Create the directories and sweep writes a previous run left behind.

        Returns how many abandoned temporary files were removed; raises
        CacheUnusable when the image path cannot be written.
        """
        try:
            os.makedirs(self._blobs, exist_ok=True)
            swept = 0
            if os.path.isdir(self._tmp):
                swept = len(os.listdir(self._tmp))
                shutil.rmtree(self._tmp)
            os.makedirs(self._tmp)
        except OSError as e:
            raise CacheUnusable(f"image path {self.root} is not writable: {e.strerror}") from None
        return swept

    def writable(self) -> str | None:
        """None if new content fits under the image path, else why not."""
        probe = os.path.join(self._tmp, f"health-{uuid.uuid4().hex}")
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.unlink(probe)
        except OSError as e:
            return f"image path is not writable: {e.strerror}"
        return self.full()

    def free(self) -> int:
        """Bytes free for us on the disk under the image path."""
        found = os.statvfs(self.root)
        return found.f_bavail * found.f_frsize

    def full(self) -> str | None:
        """Why new content does not fit (too little free space, or a write failed since), or None."""
        free = self.free()
        if free < MINIMUM_FREE:
            return f"image path is full: {free} bytes free"
        if self._full_at is not None:
            if free < self._full_at + MINIMUM_FREE:
                return f"image path is full: the last write found no space left ({free} bytes free)"
            log.info("The image path has room again ({free} bytes free)", free=free)
            self._full_at = None
        return None

    def failed(self, error: OSError, written: int = 0) -> StorageFull | OSError:
        """What a failed write means for clients: StorageFull when the disk is full.

        The disk counts as full (for /health and new writes) until it has
        more room than this write had: what is free now and the ``written``
        bytes of its file, which go with it.
        """
        if error.errno not in _FULL:
            return error
        if self._full_at is None:
            log.warn("The image path is full: {why}", why=error.strerror)
        self._full_at = self.free() + written
        return StorageFull(error.strerror or "no space left on device")

    def path_for(self, digest: str) -> str:
        """The file that holds (or will hold) the content with this digest.

        The digest must already be validated by the grammar, which keeps this
        path inside the image path.
        """
        algorithm, _, encoded = digest.partition(":")
        return os.path.join(self._blobs, algorithm, encoded[:2], encoded)

    def read(self, digest: str) -> bytes | None:
        """The whole content of a small stored object (a manifest), or None."""
        try:
            with open(self.path_for(digest), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    async def read_manifest(self, digest: str) -> bytes | None:
        """The whole content of a stored manifest, or None."""
        return self.read(digest)

    async def open_blob(self, digest: str, size: int) -> StoredBlob | None:
        """The stored file of a digest, opened now (so that a prune cannot take it away), or None."""
        try:
            fd = os.open(self.path_for(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        return StoredBlob(digest, size, fd)

    def begin(self, digest: str, limit: int | None = None) -> Writer:
        """Start writing content that must hash to ``digest``; StorageFull when the disk is full."""
        why = self.full()
        if why is not None:
            raise StorageFull(why)
        return Writer(self, digest, os.path.join(self._tmp, uuid.uuid4().hex), limit)

    def relay(self, digest: str) -> Writer:
        """A temporary file for a blob another replica stores: hashed as it grows, never committed here."""
        return self.begin(digest)

    def adopt(self, spool: ContentWriter, limit: int | None = None) -> ContentWriter:
        """Store what a relay's temporary file holds and what follows: the file is committed by rename."""
        return spool

    def identity(self, digest: str) -> tuple[int, int] | None:
        """Which file holds a digest now (device and inode), or None when there is none."""
        try:
            found = os.stat(self.path_for(digest))
        except FileNotFoundError:
            return None
        return found.st_dev, found.st_ino

    def remove(self, digest: str, identity: tuple[int, int] | None = None) -> None:
        """Delete stored content (only if it is still the file ``identity`` names, when given).

        Readers holding the file open keep their bytes.
        """
        if identity is not None and self.identity(digest) != identity:
            return
        try:
            os.unlink(self.path_for(digest))
        except FileNotFoundError:
            pass


class Writer:
    """A temporary file that is hashed as it is written and committed by rename."""

    def __init__(self, store: BlobStore, digest: str, path: str, limit: int | None) -> None:
        self.digest = digest
        self.path = path
        self.size = 0
        # Which file (device and inode) the commit put in place.
        self.identity: tuple[int, int] | None = None
        self._store = store
        self._limit = limit
        self._hash = hashlib.new(digest.partition(":")[0])
        self._fd: int | None = None
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise store.failed(e) from None

    def write(self, data: bytes) -> None:
        """Append bytes, hashing them; raise SizeExceeded past the limit.

        A failed write discards the file: the writer is then done.
        """
        if self._fd is None:
            raise ValueError(f"the write of {self.digest} was abandoned")
        if self._limit is not None and self.size + len(data) > self._limit:
            self.abort()
            raise SizeExceeded(f"{self.digest} is larger than {self._limit} bytes")
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as e:
            error = self._store.failed(e, self.size)
            self.abort()
            raise error from None
        self._hash.update(data)
        self.size += len(data)

    def actual_digest(self) -> str:
        """The digest of the bytes written so far."""
        return f"{self._hash.name}:{self._hash.hexdigest()}"

    async def commit(self) -> str:
        """Verify, sync and rename into place; returns the final path.

        The rename happens on the reactor thread so that anyone looking at
        ``path`` always finds the file; the syncs happen in a worker thread.
        """
        actual = self.actual_digest()
        if actual != self.digest:
            self.abort()
            raise DigestMismatch(self.digest, actual)
        fd = self._fd
        if fd is None:
            raise ValueError(f"the write of {self.digest} was abandoned")
        final = self._store.path_for(self.digest)
        directory = os.path.dirname(final)
        try:
            await self._store._defer_to_thread(os.fsync, fd)
            found = os.fstat(fd)
            self.identity = (found.st_dev, found.st_ino)
            self._close()
            os.makedirs(directory, exist_ok=True)
            os.replace(self.path, final)
        except OSError as e:
            error = self._store.failed(e, self.size)
            self.abort()
            raise error from None
        except BaseException:
            self.abort()
            raise
        self.path = final
        await self._store._defer_to_thread(_sync_directory, directory)
        return final

    def release(self) -> None:
        """Nothing to drop: the committed file is what readers read."""

    def abort(self) -> None:
        """Discard the temporary file."""
        self._close()
        if os.path.dirname(self.path) == self._store._tmp:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _sync_directory(path: str) -> None:
    """Make a rename durable: the directory entry itself must reach the disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
