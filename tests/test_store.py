"""Crash-safe content-addressed files and the sqlite index."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ociregistry.index import Index, IndexConnection, Reference, migrations
from ociregistry.sqlite import SqliteEngine
from ociregistry.store import BlobStore, DigestMismatch, SizeExceeded
from tests.fakes import connection_of


def inline(function: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """Run 'thread' work inline, so the tests stay synchronous."""
    return succeed(function(*args))


def digest_of(content: bytes) -> str:
    return "sha256:" + hashlib.sha256(content).hexdigest()


class BlobStoreTests(SynchronousTestCase):
    """Writes are verified before anything appears under blobs/."""

    def setUp(self) -> None:
        self.root = self.mktemp()
        self.store = BlobStore(self.root, inline)
        self.store.prepare()

    def test_commit_verified(self) -> None:
        """Verified content is renamed into place and the temporary area is empty again."""
        content = b"hello" * 1000
        writer = self.store.begin(digest_of(content))
        writer.write(content[:100])
        self.assertFalse(os.path.exists(self.store.path_for(digest_of(content))))
        writer.write(content[100:])
        path = self.successResultOf(Deferred.fromCoroutine(writer.commit()))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), content)
        self.assertEqual(os.listdir(os.path.join(self.root, "tmp")), [])

    def test_mismatch_leaves_nothing(self) -> None:
        """Bytes that do not match the digest are discarded."""
        writer = self.store.begin(digest_of(b"right"))
        writer.write(b"wrong")
        self.failureResultOf(Deferred.fromCoroutine(writer.commit()), DigestMismatch)
        self.assertFalse(os.path.exists(self.store.path_for(digest_of(b"right"))))
        self.assertEqual(os.listdir(os.path.join(self.root, "tmp")), [])

    def test_limit(self) -> None:
        """Writing past the limit raises."""
        writer = self.store.begin(digest_of(b"x" * 10), limit=5)
        self.assertRaises(SizeExceeded, writer.write, b"x" * 10)
        writer.abort()

    def test_prepare_sweeps(self) -> None:
        """Temporary files left by a crash are removed at start."""
        self.store.begin(digest_of(b"a")).write(b"a")
        self.assertEqual(BlobStore(self.root, inline).prepare(), 1)
        self.assertEqual(os.listdir(os.path.join(self.root, "tmp")), [])


class IndexCases:
    """Manifests, tags, references and the views, on any engine: ``self.index`` is a connection to an empty index."""

    index: IndexConnection
    assertEqual: Any
    assertIsNotNone: Any
    assertIsNone: Any

    def rows(self, statement: str) -> list[tuple[Any, ...]]:
        """What a statement a user might type returns, on the index's own connection."""
        return [tuple(row) for row in self.index.raw.execute(statement).fetchall()]

    def test_tags_move(self) -> None:
        """A tag points at the last manifest recorded for it; the old manifest stays."""
        self.index.record_manifest("sha256:" + "1" * 64, "t", 10, "docker.io", "library/a", [], tag="v1")
        self.index.record_manifest("sha256:" + "2" * 64, "t", 20, "docker.io", "library/a", [], tag="v1")
        record = self.index.manifest_for_tag("docker.io", "library/a", "v1")
        assert record is not None
        self.assertEqual(record.digest, "sha256:" + "2" * 64)
        self.assertIsNotNone(self.index.manifest("sha256:" + "1" * 64))
        self.assertIsNone(self.index.manifest_for_tag("docker.io", "library/a", "V1"))

    def test_refcounts_and_views(self) -> None:
        """Blob reference counts and the images view follow the references."""
        layer = Reference("sha256:" + "c" * 64, "layer", "l", 100)
        config = Reference("sha256:" + "d" * 64, "config", "c", 5)
        self.index.record_manifest("sha256:" + "a" * 64, "m", 50, "r", "x", [config, layer], tag="1")
        self.index.record_manifest("sha256:" + "b" * 64, "m", 60, "r", "y", [layer], tag="2")
        self.index.record_blob(layer.child, 100)
        self.index.record_blob("sha256:" + "e" * 64, 7)
        counts = dict(self.rows("SELECT digest, refcount FROM blob_refcounts"))
        self.assertEqual(counts, {layer.child: 2, "sha256:" + "e" * 64: 0})
        self.assertEqual(self.rows("SELECT digest FROM blobs_unreferenced"), [("sha256:" + "e" * 64,)])
        sizes = dict(self.rows("SELECT image, total_size FROM images"))
        self.assertEqual(sizes, {"r/x": 155, "r/y": 160})
        self.assertEqual(self.index.blob_refcounts("eee"), [("sha256:" + "e" * 64, 7, 0)])

    def test_tags_sorted_and_forgotten(self) -> None:
        """Tags list sorted by code point; a forgotten manifest takes its tags and references along."""
        digest = "sha256:" + "f" * 64
        for tag in ("b", "B", "a", "_x"):
            self.index.record_manifest(digest, "m", 1, "r", "x", [Reference("sha256:" + "c" * 64, "layer", "l", 3)],
                                       tag=tag)
        self.assertEqual(self.index.tags("r", "x"), ["B", "_x", "a", "b"])
        self.assertEqual(self.index.totals(), (1, 0, 1))
        self.index.forget_manifest(digest)
        self.assertEqual((self.index.tags("r", "x"), self.index.references(digest)), ([], []))


class IndexTests(IndexCases, SynchronousTestCase):
    """The cases on the embedded sqlite index, and what only it has: the pragmas, batched pull times."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.path = self.mktemp()
        self.server = Index(SqliteEngine(self.path, self.clock))
        self.addCleanup(self.server.close)
        self.index = connection_of(self.server)

    def test_schema_version(self) -> None:
        """A new database is at the newest schema version, in WAL mode."""
        db = sqlite3.connect(self.path)
        self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], migrations()[-1][0])
        self.assertEqual(db.execute("PRAGMA journal_mode").fetchone()[0], "wal")

    def test_pulls_batched(self) -> None:
        """Pull times are kept in memory until flushed."""
        digest = "sha256:" + "f" * 64
        self.index.record_manifest(digest, "m", 1, "r", "x", [])
        self.clock.advance(3600)
        self.server.record_pull(digest)
        record = self.index.manifest(digest)
        assert record is not None
        self.assertEqual(record.pulled, "2023-11-14T22:13:20Z")
        self.assertEqual(self.successResultOf(self.server.flush_pulls()), 1)
        record = self.index.manifest(digest)
        assert record is not None
        self.assertEqual(record.pulled, "2023-11-14T23:13:20Z")
