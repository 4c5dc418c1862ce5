"""The content store's interface: where verified manifests and blobs live, and how they are written.

Two implementations share it: files under the image path (store.py, the
embedded default) and objects in an S3-compatible bucket (bucket.py, for
replicas sharing one cache).  As in CNCF distribution's storage driver it is
small: a reader opened at lookup, a writer that commits only verified bytes
or cancels, a whole read for small objects, and a check for /health.
Everything above it (the cache, downloads, the web resources) uses only this.
"""

from __future__ import annotations

import os
from typing import Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer


class BlobSource:
    """What a response reads a blob from: a complete file, or a download in progress."""

    size: int | None
    digest: str

    def open(self) -> int:
        """A read-only descriptor for the bytes (positional reads only)."""
        raise NotImplementedError

    def available(self) -> int:
        """How many bytes from the start may be sent now."""
        raise NotImplementedError

    def wait_for(self, offset: int) -> Deferred[None]:
        """Fires when more than ``offset`` bytes are available, or the blob is complete.

        Fails if the download fails.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release what ``open`` would have handed over, when nothing is sent."""


class StoredBlob(BlobSource):
    """A verified blob on disk, opened already: a prune cannot take it away any more."""

    size: int

    def __init__(self, digest: str, size: int, fd: int) -> None:
        self.digest = digest
        self.size = size
        self._fd: int | None = fd

    def open(self) -> int:
        fd, self._fd = self._fd, None
        assert fd is not None, "a stored blob is sent once"
        return fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def available(self) -> int:
        return self.size

    def wait_for(self, offset: int) -> Deferred[None]:
        return succeed(None)


class Body(Protocol):
    """Some of a stored object's bytes, delivered once to a consumer that paces the store."""

    @property
    def length(self) -> int:
        """How many bytes ``deliver`` writes."""

    async def deliver(self, consumer: IConsumer) -> None:
        """Write the bytes to ``consumer``; fails (midway, perhaps) when the store does."""


class RemoteBlob:
    """A verified blob that the store itself sends: by a redirect to it, or a Range it answers."""

    digest: str
    size: int

    def redirect(self) -> str | None:
        """A short-lived URL clients may fetch the blob from instead, or None."""
        raise NotImplementedError

    async def open_range(self, start: int, end: int) -> Body:
        """The bytes ``start`` to ``end`` (exclusive), ready to deliver; fails before any is sent."""
        raise NotImplementedError


class ContentWriter(Protocol):
    """New content being written: readable at ``path`` as it grows, visible only once committed."""

    digest: str
    path: str
    # What the committed content is, where the store can tell (a file's device and inode),
    # so that it is removed again only if no other writer replaced it.
    identity: tuple[int, int] | None

    @property
    def size(self) -> int:
        """How many bytes were written so far."""

    def write(self, data: bytes) -> Deferred[None] | None:
        """Append bytes; a Deferred means "wait for it before writing more" (backpressure)."""

    async def commit(self) -> object:
        """Verify the digest and make the content visible; DigestMismatch (and nothing stored) if wrong."""

    def abort(self) -> None:
        """Discard what was written; nothing becomes visible."""

    def release(self) -> None:
        """The content is committed and no new reader can join: drop what only readers used."""


class ContentStore(Protocol):
    """Verified content by digest, and the local temporary area that downloads stream from."""

    root: str

    def prepare(self) -> int:
        """Create what is needed and sweep temporary files of a previous run; how many were swept."""

    def writable(self) -> str | None:
        """None if new content can be stored, else why not (for /health)."""

    def begin(self, digest: str, limit: int | None = None) -> ContentWriter:
        """Start writing content that must hash to ``digest``."""

    def relay(self, digest: str) -> ContentWriter:
        """A local temporary file for a blob another replica stores: hashed as it grows, never committed here."""

    def adopt(self, spool: ContentWriter, limit: int | None = None) -> ContentWriter:
        """Take over a relay's temporary file: what it holds is stored first, then what follows."""

    async def open_blob(self, digest: str, size: int) -> BlobSource | RemoteBlob | None:
        """A reader for stored content of a known size, or None when it is gone."""

    async def read_manifest(self, digest: str) -> bytes | None:
        """The whole content of a small stored object (a manifest), or None."""
