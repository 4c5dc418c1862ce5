"""The sqlite index: which manifests, tags and blobs the cache holds.

The index is the source of truth at start-up; the files under ``blobs/`` are
only trusted once a row here names them.  It is a public interface too: users
read it with ``sqlite3`` (see README).
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Iterable, Iterator

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ociregistry.errors import OCIError
from ociregistry.store import CacheUnusable, StorageFull

if TYPE_CHECKING:
    from ociregistry.store import BlobStore

log = Logger()

# A prune's write transaction ends after this long, so that others wait at most that for the lock.
BATCH_SECONDS = 0.02
# How often a write waiting for another connection's lock tries again.  sqlite's
# own busy handler backs off to 100 ms, so a waiter would miss the short gaps
# between a prune's transactions and wait for the whole prune.
_LOCK_POLL_SECONDS = 0.001


@dataclass(frozen=True)
class ManifestRecord:
    """One cached manifest, index or list."""

    digest: str
    media_type: str
    size: int
    registry: str
    repository: str
    created: str
    pulled: str


@dataclass(frozen=True)
class Reference:
    """Something a manifest refers to: a platform manifest, a config or a layer."""

    child: str
    kind: str
    media_type: str
    size: int
    platform: str | None = None


def utc(seconds: float) -> str:
    """Format a POSIX time as the index stores it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def migrations() -> list[tuple[int, str]]:
    """The packaged schema files, as (version, SQL) in order."""
    found = []
    for entry in resources.files("ociregistry").joinpath("schema").iterdir():
        match = re.match(r"(\d+)_.*\.sql\Z", entry.name)
        if match:
            found.append((int(match.group(1)), entry.read_text("utf-8")))
    return sorted(found)


class IndexBusy(OCIError):
    """Another process held the index's write lock for longer than this connection waits."""

    def __init__(self) -> None:
        super().__init__(503, "UNAVAILABLE", "the cache index is busy (a prune or check is running); retry")


class Index:
    """One sqlite connection, used from one thread at a time with short statements.

    ``busy_timeout`` is how long a write waits for another process's write
    lock before it fails with IndexBusy (503); the server's reactor keeps it short.
    """

    def __init__(self, path: str, clock: IReactorTime, busy_timeout: float = 5.0) -> None:
        self.path = path
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._pulls: dict[str, float] = {}
        self._pulls_failing = False
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL with NORMAL is crash-safe; only the last commits may be lost on power loss,
            # and content files are synced before any row names them.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            # Writes wait in _Transaction; this only covers reads in sqlite's rare busy moments.
            self._db.execute("PRAGMA busy_timeout=1")
            self.migrate()
        except sqlite3.DatabaseError as e:
            raise _unusable(path, e) from None

    def reopen(self) -> "Index":
        """Another connection to the same database, for work on a thread of its own."""
        return Index(self.path, self._clock)

    def migrate(self) -> int:
        """Apply every schema file newer than the database; returns the version."""
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        for number, sql in migrations():
            if number > version:
                self._db.executescript(f"BEGIN;\n{sql}\nPRAGMA user_version={number};\nCOMMIT;")
                version = number
        return int(version)

    def close(self) -> None:
        """Write pending pull times and close the database."""
        self.flush_pulls()
        self._db.close()

    def _now(self) -> str:
        return utc(self._clock.seconds())

    def manifest(self, digest: str) -> ManifestRecord | None:
        """The cached manifest with this digest, if any."""
        row = self._db.execute(
            "SELECT digest, media_type, size, registry, repository, created, pulled"
            " FROM manifests WHERE digest = ?",
            (digest,),
        ).fetchone()
        return ManifestRecord(*row) if row else None

    def manifest_for_tag(self, registry: str, repository: str, tag: str) -> ManifestRecord | None:
        """The manifest a cached tag points at, if the tag is cached."""
        found = self.tag(registry, repository, tag)
        return found[0] if found else None

    def tag(self, registry: str, repository: str, tag: str) -> tuple[ManifestRecord, str] | None:
        """The manifest a cached tag points at, and when the tag was last confirmed upstream."""
        row = self._db.execute(
            "SELECT m.digest, m.media_type, m.size, m.registry, m.repository, m.created, m.pulled, t.updated"
            " FROM tags t JOIN manifests m ON m.digest = t.digest"
            " WHERE t.registry = ? AND t.repository = ? AND t.tag = ?",
            (registry, repository, tag),
        ).fetchone()
        return (ManifestRecord(*row[:7]), row[7]) if row else None

    def point_tag(self, registry: str, repository: str, tag: str, digest: str) -> bool:
        """Point a tag at a cached manifest, confirmed now; False if the manifest is not cached (any more)."""
        # One statement, so that a prune in between cannot make it a foreign key failure.
        with self._writing(), self._transaction():
            cursor = self._db.execute(
                "INSERT INTO tags (registry, repository, tag, digest, updated)"
                " SELECT ?, ?, ?, digest, ? FROM manifests WHERE digest = ?"
                " ON CONFLICT (registry, repository, tag)"
                " DO UPDATE SET digest = excluded.digest, updated = excluded.updated",
                (registry, repository, tag, self._now(), digest),
            )
        return cursor.rowcount > 0

    def references(self, digest: str) -> list[Reference]:
        """What a cached manifest refers to."""
        rows = self._db.execute(
            "SELECT child, kind, media_type, size, platform FROM manifest_refs WHERE manifest = ?",
            (digest,),
        )
        return [Reference(*row) for row in rows]

    def record_manifest(
        self,
        digest: str,
        media_type: str,
        size: int,
        registry: str,
        repository: str,
        references: Iterable[Reference],
        tag: str | None = None,
    ) -> ManifestRecord:
        """Add a verified, stored manifest (and point a tag at it) in one transaction."""
        now = self._now()
        with self._writing(), self._transaction():
            self._db.execute(
                "INSERT INTO manifests (digest, media_type, size, registry, repository, created, pulled)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (digest) DO NOTHING",
                (digest, media_type, size, registry, repository, now, now),
            )
            self._db.executemany(
                "INSERT OR IGNORE INTO manifest_refs (manifest, child, kind, media_type, size, platform)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(digest, r.child, r.kind, r.media_type, r.size, r.platform) for r in references],
            )
            if tag is not None:
                self.point_tag(registry, repository, tag, digest)
        record = self.manifest(digest)
        assert record is not None
        return record

    def readable(self) -> str | None:
        """None if the index answers a query, else why not."""
        try:
            self._db.execute("SELECT 1 FROM manifests LIMIT 1").fetchall()
        except sqlite3.Error as e:
            return f"index is not readable: {e}"
        return None

    def totals(self) -> tuple[int, int, int]:
        """How many manifests and blobs are cached, and their bytes on disk."""
        manifests, manifest_bytes = self._db.execute("SELECT count(*), coalesce(sum(size), 0) FROM manifests").fetchone()
        blobs, blob_bytes = self._db.execute("SELECT count(*), coalesce(sum(size), 0) FROM blobs").fetchone()
        return int(manifests), int(blobs), int(manifest_bytes + blob_bytes)

    def tags(self, registry: str, repository: str) -> list[str]:
        """The cached tags of a repository, sorted."""
        rows = self._db.execute(
            "SELECT tag FROM tags WHERE registry = ? AND repository = ? ORDER BY tag",
            (registry, repository),
        )
        return [tag for (tag,) in rows]

    def blob_size(self, digest: str) -> int | None:
        """The size of a cached blob, or None when it is not cached."""
        row = self._db.execute("SELECT size FROM blobs WHERE digest = ?", (digest,)).fetchone()
        return int(row[0]) if row else None

    def record_blob(self, digest: str, size: int) -> None:
        """Add a verified, stored blob."""
        with self._writing(), self._transaction():
            self._db.execute(
                "INSERT INTO blobs (digest, size, created) VALUES (?, ?, ?) ON CONFLICT (digest) DO NOTHING",
                (digest, size, self._now()),
            )

    def forget_blob(self, digest: str) -> None:
        """Drop a blob row whose file has gone, so that it is fetched again."""
        with self._writing(), self._transaction():
            self._db.execute("DELETE FROM blobs WHERE digest = ?", (digest,))

    def forget_manifest(self, digest: str) -> None:
        """Drop a manifest row (and its tags and references) whose file has gone."""
        with self._writing(), self._transaction():
            self._db.execute("DELETE FROM manifests WHERE digest = ?", (digest,))

    def names(self, digest: str) -> bool:
        """Whether a manifest or blob row names this digest now."""
        return self._db.execute(
            "SELECT 1 FROM manifests WHERE digest = ? UNION ALL SELECT 1 FROM blobs WHERE digest = ?",
            (digest, digest)).fetchone() is not None

    def stored_size(self, digest: str, kind: str) -> int | None:
        """The size a manifest (kind 'manifest') or blob row records now, or None without a row."""
        table = "manifests" if kind == "manifest" else "blobs"
        row = self._db.execute(f"SELECT size FROM {table} WHERE digest = ?", (digest,)).fetchone()
        return int(row[0]) if row else None

    def record_pull(self, digest: str) -> None:
        """Note that a client pulled a manifest; written later in a batch."""
        self._pulls[digest] = self._clock.seconds()

    def flush_pulls(self) -> int:
        """Write the pull times noted since the last flush in one transaction; returns how many.

        When the disk is full or the index busy they are kept for the next
        flush (and that is logged once): serving never depends on them.
        """
        pulls, self._pulls = self._pulls, {}
        if not pulls:
            return 0
        try:
            with self._writing(), self._transaction():
                self._db.executemany(
                    "UPDATE manifests SET pulled = ? WHERE digest = ?",
                    [(utc(when), digest) for digest, when in pulls.items()],
                )
        except OCIError as e:
            for digest, when in pulls.items():
                self._pulls[digest] = max(when, self._pulls.get(digest, when))
            if not self._pulls_failing:
                self._pulls_failing = True
                log.warn("Pull times are kept in memory until they can be written: {why}", why=e.message)
            return 0
        if self._pulls_failing:
            self._pulls_failing = False
            log.info("Pull times are written again")
        return len(pulls)

    def _transaction(self) -> "_Transaction":
        return _Transaction(self._db, self._busy_timeout)

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Turn sqlite's full disk and lock timeouts into the errors clients get (507, 503)."""
        try:
            yield
        except sqlite3.OperationalError as e:
            if _primary(e) == sqlite3.SQLITE_FULL:
                raise StorageFull(f"the index cannot grow: {e}") from None
            if _primary(e) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise IndexBusy() from None
            raise

    @classmethod
    def _on(cls, db: sqlite3.Connection, clock: IReactorTime) -> "Index":
        """An index over an open connection, as it is (no migration)."""
        index = cls.__new__(cls)
        index.path = ""
        index._clock = clock
        index._busy_timeout = 5.0
        index._pulls = {}
        index._pulls_failing = False
        index._db = db
        return index

    @classmethod
    def read_only(cls, path: str, clock: IReactorTime) -> "Index":
        """Open an existing index for reading only, so that it works on a read-only image path."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no cache index at {path}")
        uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
        db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        try:
            try:
                (version,) = db.execute("PRAGMA user_version").fetchone()
            except sqlite3.OperationalError:
                # A WAL database in a directory we cannot write: nobody can be writing it either.
                db.close()
                db = sqlite3.connect(uri + "&immutable=1", uri=True, isolation_level=None,
                                     check_same_thread=False)
                (version,) = db.execute("PRAGMA user_version").fetchone()
        except sqlite3.DatabaseError as e:
            db.close()
            raise _unusable(path, e) from None
        if version < migrations()[-1][0]:
            db.close()
            raise sqlite3.OperationalError(
                f"{path} has schema version {version}; open it writable once to upgrade it")
        return cls._on(db, clock)

    def snapshot(self) -> "Index":
        """An in-memory copy of the index, to work out changes without touching the cache."""
        copy = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        self._db.backup(copy)
        copy.execute("PRAGMA foreign_keys=ON")
        return Index._on(copy, self._clock)

    def cached_images(self, every_manifest: bool = False) -> list["CachedImage"]:
        """Every image as users name it: each tag, and each top-level manifest cached only by digest.

        With ``every_manifest``, the platform manifests of indexes are listed too.
        Sizes count the cached manifests and blobs an image uses, each once.
        """
        manifests = {
            row[0]: ManifestRecord(*row)
            for row in self._db.execute(
                "SELECT digest, media_type, size, registry, repository, created, pulled FROM manifests")
        }
        children: dict[str, list[tuple[str, str]]] = {}
        parents: set[str] = set()
        for manifest, child, kind in self._db.execute("SELECT manifest, child, kind FROM manifest_refs"):
            children.setdefault(manifest, []).append((child, kind))
            if kind == "manifest":
                parents.add(child)
        blobs = dict(self._db.execute("SELECT digest, size FROM blobs"))
        tags: dict[str, list[tuple[str, str, str]]] = {}
        for registry, repository, tag, digest in self._db.execute(
                "SELECT registry, repository, tag, digest FROM tags"):
            tags.setdefault(digest, []).append((registry, repository, tag))
        images = []
        for digest, record in manifests.items():
            names: list[tuple[str, str, str | None]] = list(tags.get(digest, []))
            if not names and (every_manifest or digest not in parents):
                names.append((record.registry, record.repository, None))
            if not names:
                continue
            closure = _closure(digest, manifests, children)
            size = sum(manifests[d].size for d in closure if d in manifests)
            size += sum(blobs[d] for d in closure if d in blobs and d not in manifests)
            pulled = max(manifests[d].pulled for d in closure if d in manifests)
            for registry, repository, tag in names:
                images.append(CachedImage(registry, repository, tag, digest, record.media_type,
                                          record.created, pulled, size))
        return sorted(images, key=lambda image: image.reference)

    def cache_size(self) -> int:
        """Bytes of every cached manifest and of every blob a cached manifest uses."""
        (size,) = self._db.execute(
            "SELECT (SELECT coalesce(sum(size), 0) FROM manifests)"
            " + (SELECT coalesce(sum(size), 0) FROM blob_refcounts"
            "     WHERE refcount > 0 AND digest NOT IN (SELECT digest FROM manifests))"
        ).fetchone()
        return int(size)

    def remove_images(self, images: Iterable["CachedImage"], fit: int | None = None,
                      store: "BlobStore | None" = None, batch: int = 100) -> "Removal":
        """Untag images, drop the manifests and blobs nothing else uses, then every unreferenced blob.

        With ``fit``, stops once the cache is no larger than that many bytes.
        Works in transactions of at most ``batch`` images and BATCH_SECONDS,
        so a server sharing the index waits only that long for the lock.
        Each transaction commits before the ``store``'s files of what it dropped
        are removed, so a crash leaves files no row names (which ``check
        --repair`` sweeps), never a row without its file; a file fetched and
        recorded anew meanwhile is left alone.  Without a store, only rows change.
        """
        pending = list(images)
        pending.reverse()
        removed: list[CachedImage] = []
        manifests: dict[str, int] = {}
        blobs: dict[str, int] = {}
        size = self.cache_size() if fit is not None else 0
        while True:
            doomed: set[str] = set()
            with self._transaction():
                began = time.monotonic()
                taken = 0
                while pending and (fit is None or size > fit) and (
                        taken == 0 or (taken < batch and time.monotonic() - began < BATCH_SECONDS)):
                    image = pending.pop()
                    size -= self._remove_image(image, manifests, blobs, doomed)
                    removed.append(image)
                    taken += 1
                finished = not pending or (fit is not None and size <= fit)
                if finished:
                    orphans = dict(self._db.execute("SELECT digest, size FROM blobs_unreferenced"))
                    self._drop_blobs(orphans, blobs, doomed)
                # Which files the rows named, while no one can record those digests again.
                files = {digest: store.identity(digest) for digest in doomed} if store is not None else {}
            for digest, identity in sorted(files.items()):
                if store is not None and identity is not None and not self.names(digest):
                    store.remove(digest, identity)
            if finished:
                return Removal(tuple(removed), tuple(manifests.items()), tuple(blobs.items()))
            # A gap between transactions, for a writer that waits for the lock.
            time.sleep(_LOCK_POLL_SECONDS * 2)

    def _remove_image(self, image: "CachedImage", manifests: dict[str, int], blobs: dict[str, int],
                      doomed: set[str]) -> int:
        """Untag one image and drop what only it used; returns the bytes freed."""
        if image.tag is not None:
            self._db.execute("DELETE FROM tags WHERE registry = ? AND repository = ? AND tag = ?",
                             (image.registry, image.repository, image.tag))
        dropped: dict[str, int] = {}
        used: set[str] = set()
        self._drop_unused(image.digest, dropped, used)
        freed = {}
        for blob in sorted(used):
            size = None if blob in blobs else self.blob_size(blob)
            if size is not None and not self._db.execute(
                    "SELECT 1 FROM manifest_refs WHERE child = ? AND kind IN ('config', 'layer') LIMIT 1",
                    (blob,)).fetchone():
                freed[blob] = size
        self._drop_blobs(freed, blobs, doomed)
        doomed.update(digest for digest in dropped if self.blob_size(digest) is None)
        manifests.update(dropped)
        return sum(dropped.values()) + sum(freed.values())

    def _drop_blobs(self, found: dict[str, int], blobs: dict[str, int], doomed: set[str]) -> None:
        """Delete blob rows, marking their files to go (unless the digest is also a cached manifest)."""
        self._db.executemany("DELETE FROM blobs WHERE digest = ?", [(digest,) for digest in found])
        doomed.update(digest for digest in found if self.manifest(digest) is None)
        blobs.update(found)

    def _drop_unused(self, digest: str, dropped: dict[str, int], used: set[str]) -> None:
        """Delete a manifest no tag or cached index uses, then its platform manifests likewise.

        Collects the dropped manifests' sizes and the blobs they used.
        """
        in_use = self._db.execute(
            "SELECT 1 FROM tags WHERE digest = ?"
            " UNION ALL SELECT 1 FROM manifest_refs WHERE child = ? AND kind = 'manifest' LIMIT 1",
            (digest, digest)).fetchone()
        record = self.manifest(digest)
        if in_use or record is None:
            return
        references = self.references(digest)
        self._db.execute("DELETE FROM manifests WHERE digest = ?", (digest,))
        dropped[digest] = record.size
        used.update(r.child for r in references if r.kind != "manifest")
        for reference in references:
            if reference.kind == "manifest":
                self._drop_unused(reference.child, dropped, used)

    def blob_refcounts(self, substring: str = "") -> list[tuple[str, int, int]]:
        """Cached blobs whose digest contains ``substring``: (digest, size, reference count)."""
        rows = self._db.execute(
            "SELECT digest, size, refcount FROM blob_refcounts WHERE instr(digest, ?) > 0 ORDER BY digest",
            (substring,))
        return [(digest, int(size), int(count)) for digest, size, count in rows]

    def stored_objects(self) -> list[tuple[str, int, str]]:
        """Every file the index vouches for: (digest, size, 'manifest' or 'blob')."""
        rows = self._db.execute(
            "SELECT digest, size, 'manifest' FROM manifests"
            " UNION ALL SELECT digest, size, 'blob' FROM blobs ORDER BY 1")
        return [(digest, int(size), kind) for digest, size, kind in rows]

    def set_times(self, digest: str, created: str, pulled: str) -> None:
        """Set when a manifest entered the cache and was last pulled (for imported caches)."""
        with self._transaction():
            self._db.execute("UPDATE manifests SET created = ?, pulled = ? WHERE digest = ?",
                             (created, pulled, digest))


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on error (a failed COMMIT too).

    Waits up to ``wait`` seconds for another connection's write lock, trying
    every millisecond.  Inside another transaction it is part of that one.
    """

    def __init__(self, db: sqlite3.Connection, wait: float) -> None:
        self._db = db
        self._wait = wait
        self._nested = False

    def __enter__(self) -> None:
        self._nested = self._db.in_transaction
        if self._nested:
            return
        deadline = time.monotonic() + self._wait
        while True:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as e:
                if _primary(e) not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or time.monotonic() >= deadline:
                    raise
            time.sleep(_LOCK_POLL_SECONDS)

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        if self._nested:
            return
        if kind is None:
            try:
                self._db.execute("COMMIT")
                return
            except sqlite3.Error:
                self._rollback()
                raise
        self._rollback()

    def _rollback(self) -> None:
        # sqlite rolls back by itself after some errors (a full disk among them).
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")


def _primary(error: sqlite3.Error) -> int:
    """sqlite's primary result code of an error (without the extended part)."""
    return int(getattr(error, "sqlite_errorcode", 0) or 0) & 0xFF


def _unusable(path: str, error: sqlite3.DatabaseError) -> CacheUnusable:
    """A start-up error naming what is wrong with the index file and what to do."""
    code = _primary(error)
    if code == sqlite3.SQLITE_NOTADB:
        return CacheUnusable(
            f"{path} is not an sqlite database ({error}): move it aside to start with an empty index, "
            "then run 'ociregistry check --repair' to remove the files it no longer names")
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
        return CacheUnusable(f"cannot open {path} for writing ({error}): the image path must be writable")
    return CacheUnusable(f"cannot use the index {path}: {error}")


@dataclass(frozen=True)
class CachedImage:
    """An image as users name it: a tag, or a manifest cached only by its digest."""

    registry: str
    repository: str
    tag: str | None
    digest: str
    media_type: str
    created: str
    pulled: str
    size: int

    @property
    def reference(self) -> str:
        """``registry/repository:tag``, or ``registry/repository@digest`` when untagged."""
        where = f"{self.registry}/{self.repository}"
        return f"{where}:{self.tag}" if self.tag is not None else f"{where}@{self.digest}"


@dataclass(frozen=True)
class Removal:
    """What a prune took (or, dry, would take) out of the cache: images, then manifest and blob files."""

    images: tuple[CachedImage, ...]
    manifests: tuple[tuple[str, int], ...]
    blobs: tuple[tuple[str, int], ...]

    @property
    def size(self) -> int:
        """The bytes the removed files held."""
        return sum(size for _, size in self.manifests + self.blobs)


def _closure(digest: str, manifests: dict[str, ManifestRecord],
             children: dict[str, list[tuple[str, str]]]) -> set[str]:
    """A manifest and everything it refers to, through the platform manifests of an index."""
    found = {digest}
    pending = [digest]
    while pending:
        for child, kind in children.get(pending.pop(), []):
            if child not in found:
                found.add(child)
                if kind == "manifest" and child in manifests:
                    pending.append(child)
    return found
