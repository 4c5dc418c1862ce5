"""The sqlite index: which manifests, tags and blobs the cache holds.

The index is the source of truth at start-up; the files under ``blobs/`` are
only trusted once a row here names them.  It is a public interface too: users
read it with ``sqlite3`` (see README).
"""

from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass
from importlib import resources
from typing import Iterable

from twisted.internet.interfaces import IReactorTime


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


class Index:
    """One sqlite connection, used from the reactor thread with short statements."""

    def __init__(self, path: str, clock: IReactorTime) -> None:
        self._clock = clock
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # WAL with NORMAL is crash-safe; only the last commits may be lost on power loss,
        # and content files are synced before any row names them.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._pulls: dict[str, float] = {}
        self.migrate()

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
        row = self._db.execute(
            "SELECT m.digest, m.media_type, m.size, m.registry, m.repository, m.created, m.pulled"
            " FROM tags t JOIN manifests m ON m.digest = t.digest"
            " WHERE t.registry = ? AND t.repository = ? AND t.tag = ?",
            (registry, repository, tag),
        ).fetchone()
        return ManifestRecord(*row) if row else None

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
        with self._transaction():
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
                self._db.execute(
                    "INSERT INTO tags (registry, repository, tag, digest, updated) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT (registry, repository, tag)"
                    " DO UPDATE SET digest = excluded.digest, updated = excluded.updated",
                    (registry, repository, tag, digest, now),
                )
        record = self.manifest(digest)
        assert record is not None
        return record

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
        self._db.execute(
            "INSERT INTO blobs (digest, size, created) VALUES (?, ?, ?) ON CONFLICT (digest) DO NOTHING",
            (digest, size, self._now()),
        )

    def forget_blob(self, digest: str) -> None:
        """Drop a blob row whose file has gone, so that it is fetched again."""
        self._db.execute("DELETE FROM blobs WHERE digest = ?", (digest,))

    def forget_manifest(self, digest: str) -> None:
        """Drop a manifest row (and its tags and references) whose file has gone."""
        self._db.execute("DELETE FROM manifests WHERE digest = ?", (digest,))

    def record_pull(self, digest: str) -> None:
        """Note that a client pulled a manifest; written later in a batch."""
        self._pulls[digest] = self._clock.seconds()

    def flush_pulls(self) -> int:
        """Write the pull times noted since the last flush in one transaction."""
        pulls, self._pulls = self._pulls, {}
        if pulls:
            with self._transaction():
                self._db.executemany(
                    "UPDATE manifests SET pulled = ? WHERE digest = ?",
                    [(utc(when), digest) for digest, when in pulls.items()],
                )
        return len(pulls)

    def _transaction(self) -> "_Transaction":
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on error."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")
