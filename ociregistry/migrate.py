"""Moving in: copy a single-node cache (index.db and the files under blobs/) into the shared index and bucket.

Each object is streamed from its file to the bucket (multipart past one
part, through the S3 driver), hashed as it is read: the upload is completed
only when the bytes hash to the name, so a corrupt file is reported and
never becomes visible.  Only then is its row written in the shared index,
with the times the old index recorded: a run killed at any moment leaves
no row without its object.  A second run skips what the bucket and the
index hold already (an object of the right size and its row), so a run
that was interrupted ends complete when started again.  Blobs go before
manifests, so that a replica that finds a manifest row finds its blobs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from twisted.internet.defer import Deferred, FirstError, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool

from ociregistry.index import Index, IndexConnection
from ociregistry.s3 import MIB, S3Store, key_for
from ociregistry.store import DigestMismatch

# How much of a file is read at a time (the S3 driver gathers parts from these).
_CHUNK = 1 * MIB


@dataclass
class Totals:
    """How a migration went so far: objects copied, found in place already, skipped; bytes uploaded."""

    objects: int = 0
    copied: int = 0
    present: int = 0
    skipped: int = 0
    uploaded: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> int:
        """Objects dealt with, however."""
        return self.copied + self.present + self.skipped

    def line(self) -> str:
        """The counts and bytes, in one line."""
        elapsed = max(time.monotonic() - self.started, 1e-6)
        return (f"{self.done} of {self.objects} objects: {self.copied} copied, {self.present} already there, "
                f"{self.skipped} skipped; {self.uploaded / 1e6:.1f} MB uploaded in {elapsed:.1f}s "
                f"({self.uploaded / 1e6 / elapsed:.1f} MB/s)")


class MigrationProgress:
    """A status line redrawn on a terminal, else a line every ``every`` objects; problems on ``errors``."""

    def __init__(self, out: TextIO, errors: TextIO, clock: IReactorTime, tty: bool, every: int = 100) -> None:
        self.totals = Totals()
        self._out = out
        self._errors = errors
        self._tty = tty
        self._every = every
        self._loop = LoopingCall(self._draw)
        self._loop.clock = clock
        if tty:
            self._loop.start(0.25)

    def object_done(self) -> None:
        """One object dealt with."""
        if not self._tty and self.totals.done % self._every == 0:
            print(self.totals.line(), file=self._out, flush=True)

    def problem(self, line: str) -> None:
        """An object that is skipped, and why."""
        self._clear()
        print(line, file=self._errors, flush=True)

    def finish(self) -> None:
        """Stop redrawing and print the totals."""
        if self._loop.running:
            self._loop.stop()
        self._clear()
        print(self.totals.line(), file=self._out, flush=True)

    def _draw(self) -> None:
        self._out.write("\r" + self.totals.line())
        self._out.flush()

    def _clear(self) -> None:
        if self._tty:
            self._out.write("\r\x1b[K")


class Migration:
    """Copies one cache's objects and rows into a shared index and bucket, a few objects at a time."""

    def __init__(self, source: IndexConnection, root: str, index: Index, s3: S3Store, reactor: Any,
                 progress: MigrationProgress, concurrency: int = 4) -> None:
        self._source = source
        self._root = root
        self._index = index
        self._s3 = s3
        self._reactor = reactor
        self._progress = progress
        self._concurrency = concurrency

    async def run(self) -> Totals:
        """Copy every blob, then every manifest; the totals (``skipped`` counts what was reported)."""
        objects = self._source.stored_objects()
        blobs = {digest: (size, created) for digest, size, created in self._source.blob_rows()}
        self._progress.totals.objects = len(objects)
        for kind in ("blob", "manifest"):
            pending = iter([(digest, size) for digest, size, of in objects if of == kind])
            try:
                await gatherResults([Deferred.fromCoroutine(self._work(kind, pending, blobs))
                                     for _ in range(self._concurrency)], consumeErrors=True)
            except FirstError as e:
                e.subFailure.raiseException()
        return self._progress.totals

    async def _work(self, kind: str, pending: Iterator[tuple[str, int]],
                    blobs: dict[str, tuple[int, str]]) -> None:
        for digest, size in pending:
            await self._one(kind, digest, size, blobs)
            self._progress.object_done()

    async def _one(self, kind: str, digest: str, size: int, blobs: dict[str, tuple[int, str]]) -> None:
        """Copy one object unless the bucket has it, then its row unless the index has it."""
        totals = self._progress.totals
        if await self._s3.stat(key_for(digest)) == size:
            if await self._index.run(IndexConnection.stored_size, digest, kind) == size:
                totals.present += 1
                return
        else:
            problem = await self._upload(digest, size)
            if problem is not None:
                totals.skipped += 1
                self._progress.problem(f"skipped {kind} {digest}: {problem}")
                return
            totals.uploaded += size
        if kind == "blob":
            await self._index.run(IndexConnection.copy_blob, digest, size, blobs[digest][1])
        else:
            record = self._source.manifest(digest)
            assert record is not None
            await self._index.run(IndexConnection.copy_manifest, record, self._source.references(digest),
                                  self._source.tag_rows(digest))
        totals.copied += 1

    async def _upload(self, digest: str, size: int) -> str | None:
        """Stream the file to the bucket, completed only if it hashes to ``digest``; None, or why it was not."""
        algorithm, _, encoded = digest.partition(":")
        path = os.path.join(self._root, "blobs", algorithm, encoded[:2], encoded)
        try:
            f = open(path, "rb")
        except OSError as e:
            return f"cannot read {path}: {e.strerror}"
        writer = self._s3.begin(key_for(digest), digest)
        with f:
            try:
                while chunk := await self._read(f):
                    await writer.write(chunk)
            except OSError as e:
                await writer.abort()
                return f"cannot read {path}: {e.strerror}"
        if writer.size != size:
            await writer.abort()
            return f"{path} has {writer.size} bytes, the index says {size}"
        try:
            await writer.commit()
        except DigestMismatch as e:
            return f"content hashes to {e.actual}"
        return None

    def _read(self, f: Any) -> Deferred[bytes]:
        """The next chunk of a file, read on a thread so that uploads carry on meanwhile."""
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f.read, _CHUNK)

