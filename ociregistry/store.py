"""Content-addressed files under the image path, written crash-safely.

Every manifest and blob lives at ``blobs/<algorithm>/<hex>``.  New content is
written to a private file in ``tmp/`` while it is hashed, synced, and only
renamed into place once its digest is verified, so a crash leaves either
nothing or a complete, verified object.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from typing import Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

log = Logger()

DeferToThread = Callable[..., "Deferred[None]"]


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

    def prepare(self) -> int:
        """Create the directories and sweep writes a previous run left behind.

        Returns how many abandoned temporary files were removed.
        """
        os.makedirs(self._blobs, exist_ok=True)
        swept = 0
        if os.path.isdir(self._tmp):
            swept = len(os.listdir(self._tmp))
            shutil.rmtree(self._tmp)
        os.makedirs(self._tmp)
        return swept

    def writable(self) -> str | None:
        """None if a file can be created in the temporary area, else why not."""
        probe = os.path.join(self._tmp, f"health-{uuid.uuid4().hex}")
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.unlink(probe)
        except OSError as e:
            return f"image path is not writable: {e.strerror}"
        return None

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

    def begin(self, digest: str, limit: int | None = None) -> "Writer":
        """Start writing content that must hash to ``digest``."""
        return Writer(self, digest, os.path.join(self._tmp, uuid.uuid4().hex), limit)

    def remove(self, digest: str) -> None:
        """Delete stored content; readers holding it open keep their bytes."""
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
        self._store = store
        self._limit = limit
        self._hash = hashlib.new(digest.partition(":")[0])
        self._fd: int | None = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644
        )

    def write(self, data: bytes) -> None:
        """Append bytes, hashing them; raise SizeExceeded past the limit."""
        assert self._fd is not None
        if self._limit is not None and self.size + len(data) > self._limit:
            raise SizeExceeded(f"{self.digest} is larger than {self._limit} bytes")
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
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
        assert fd is not None
        try:
            await self._store._defer_to_thread(os.fsync, fd)
        except BaseException:
            self.abort()
            raise
        self._close()
        final = self._store.path_for(self.digest)
        directory = os.path.dirname(final)
        os.makedirs(directory, exist_ok=True)
        os.replace(self.path, final)
        self.path = final
        await self._store._defer_to_thread(_sync_directory, directory)
        return final

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
