"""Failing writes: no space left on the disk, a full index, a write lock held by another process."""

from __future__ import annotations

import errno
import os
import sqlite3
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ociregistry import index as index_module
from ociregistry.index import Index, IndexBusy
from ociregistry.sqlite import SqliteEngine
from ociregistry.store import MINIMUM_FREE, BlobStore, StorageFull
from tests.fakes import connection_of
from tests.test_store import digest_of, inline


def no_space(*args: Any) -> Any:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


class FullStore(BlobStore):
    """A store whose disk has as many bytes free as the test says."""

    room = 100 * MINIMUM_FREE

    def free(self) -> int:
        return self.room


class WriterFailureTests(SynchronousTestCase):
    """Every way a write can fail closes the file and removes it; no space is a StorageFull (507)."""

    def setUp(self) -> None:
        self.root = self.mktemp()
        self.store = FullStore(self.root, inline)
        self.store.prepare()
        self.tmp = os.path.join(self.root, "tmp")

    def test_write_without_space(self) -> None:
        """A write that finds no space leaves no descriptor and no file, and the store reports the disk full."""
        writer = self.store.begin(digest_of(b"content"))
        fd = writer._fd
        assert fd is not None
        self.patch(os, "write", no_space)
        error = self.assertRaises(StorageFull, writer.write, b"content")
        self.assertEqual(error.status, 507)
        self.assertFalse(is_open(fd))
        self.assertEqual(os.listdir(self.tmp), [])
        self.assertIn("no space left", self.store.writable() or "")

    def test_commit_without_space(self) -> None:
        """A rename that fails (no room for a directory) leaves nothing behind either."""
        writer = self.store.begin(digest_of(b"content"))
        writer.write(b"content")
        fd = writer._fd
        assert fd is not None
        self.patch(os, "replace", no_space)
        self.failureResultOf(Deferred.fromCoroutine(writer.commit()), StorageFull)
        self.assertFalse(is_open(fd))
        self.assertEqual(os.listdir(self.tmp), [])
        self.assertFalse(os.path.exists(self.store.path_for(digest_of(b"content"))))

    def test_other_failures_clean_up(self) -> None:
        """Any other OSError is raised as it is, and cleans up the same way."""
        writer = self.store.begin(digest_of(b"content"))
        fd = writer._fd
        assert fd is not None

        def broken(*args: Any) -> Any:
            raise OSError(errno.EIO, "I/O error")

        self.patch(os, "write", broken)
        self.assertRaises(OSError, writer.write, b"content")
        self.assertFalse(is_open(fd))
        self.assertEqual(os.listdir(self.tmp), [])
        self.assertIsNone(self.store.writable())

    def test_full_until_room_returns(self) -> None:
        """Below the minimum, new content is refused up front; with room again it is accepted by itself."""
        self.store.room = MINIMUM_FREE - 1
        self.assertRaises(StorageFull, self.store.begin, digest_of(b"x"))
        self.assertIn("image path is full", self.store.writable() or "")
        self.assertEqual(os.listdir(self.tmp), [])
        self.store.room = 2 * MINIMUM_FREE
        self.assertIsNone(self.store.writable())
        self.store.begin(digest_of(b"x")).abort()

    def test_failed_write_counts_its_room(self) -> None:
        """After a 3 MiB write failed, freeing its own bytes is not room enough; more than that is."""
        writer = self.store.begin(digest_of(b"big"))
        writer.write(b"x" * (3 << 20))
        self.store.room = 0
        self.patch(os, "write", no_space)
        self.assertRaises(StorageFull, writer.write, b"x")
        self.store.room = 3 << 20
        self.assertIsNotNone(self.store.writable())
        self.store.room = (3 << 20) + MINIMUM_FREE
        self.assertIsNone(self.store.writable())


class IndexFaultTests(SynchronousTestCase):
    """sqlite's full disk and lock timeouts become client errors, and pull times are never lost to them."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.path = self.mktemp()
        self.server = Index(SqliteEngine(self.path, self.clock, busy_timeout=0.05))
        self.addCleanup(self.server.close)
        self.index = connection_of(self.server)
        self.index.record_manifest("sha256:" + "a" * 64, "application/vnd.oci.image.manifest.v1+json",
                                   10, "quay.io", "app", [], tag="v1")

    def fill_index(self) -> None:
        """Let the database grow no more, as on a full disk."""
        (pages,) = self.index._db.execute("PRAGMA page_count").fetchone()
        self.index._db.execute(f"PRAGMA max_page_count={pages}")

    def test_full_index(self) -> None:
        """A write to a full database is a StorageFull (507) and leaves the index usable."""
        self.fill_index()
        for number in range(200):
            try:
                self.index.record_blob(f"sha256:{number:064x}", 5)
            except StorageFull as e:
                self.assertEqual(e.status, 507)
                self.assertIn("database or disk is full", e.message)
                break
        else:
            self.fail("the index never filled up")
        self.assertFalse(self.index._db.in_transaction)
        self.assertIsNotNone(self.index.manifest("sha256:" + "a" * 64))

    def test_pulls_kept_while_full(self) -> None:
        """Pull times that cannot be written wait for the next flush, logged once, and are written then."""
        digest = "sha256:" + "a" * 64
        warnings: list[str] = []
        self.patch(index_module.log, "warn", lambda format, **fields: warnings.append(format))
        self.server.record_pull(digest)
        self.patch(self.index, "_transaction", lambda: FailingTransaction(sqlite3.SQLITE_FULL))
        self.assertEqual(self.successResultOf(self.server.flush_pulls()), 0)
        self.clock.advance(60)
        self.server.record_pull(digest)
        self.assertEqual(self.successResultOf(self.server.flush_pulls()), 0)
        self.assertEqual(len(warnings), 1)
        del self.index._transaction
        self.assertEqual(self.successResultOf(self.server.flush_pulls()), 1)
        record = self.index.manifest(digest)
        assert record is not None
        self.assertEqual(record.pulled, "1970-01-01T00:01:00Z")

    def test_busy_is_a_quick_503(self) -> None:
        """While another process holds the write lock, a write fails with IndexBusy after the short timeout."""
        other = sqlite3.connect(self.path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        self.addCleanup(other.close)
        error = self.assertRaises(IndexBusy, self.index.record_blob, "sha256:" + "b" * 64, 5)
        self.assertEqual(error.status, 503)
        self.server.record_pull("sha256:" + "a" * 64)
        self.assertEqual(self.successResultOf(self.server.flush_pulls()), 0)
        other.execute("COMMIT")
        self.assertEqual(self.successResultOf(self.server.flush_pulls()), 1)
        self.index.record_blob("sha256:" + "b" * 64, 5)


class FailingTransaction:
    """A transaction whose statements fail as sqlite fails them."""

    def __init__(self, code: int) -> None:
        self.code = code

    def __enter__(self) -> None:
        error = sqlite3.OperationalError("database or disk is full")
        error.sqlite_errorcode = self.code  # type: ignore[attr-defined]
        raise error

    def __exit__(self, *args: object) -> None:
        pass
