"""The embedded index engine: sqlite, one file (``index.db``) under the image path, nothing else to run."""

from __future__ import annotations

import os
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Concatenate, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime

from ociregistry.index import LOCK_POLL_SECONDS, Engine, IndexBusy, IndexConnection, P, ToThread, migrations
from ociregistry.store import CacheUnusable, StorageFull

T = TypeVar("T")


class SqliteEngine(Engine):
    """The embedded index: one file, ``index.db`` under the image path.

    The server's short statements run inline on one connection; its
    ``busy_timeout`` is how long a write waits for another process's write
    lock before it fails with IndexBusy (503).
    """

    name = "sqlite"
    errors = (sqlite3.Error,)

    def __init__(self, path: str, clock: IReactorTime, busy_timeout: float = 5.0, read_only: bool = False) -> None:
        self.path = path
        self.clock = clock
        self.busy_timeout = busy_timeout
        self.read_only = read_only
        self._own: IndexConnection | None = None

    def connect(self) -> IndexConnection:
        """A connection of its own: the schema is migrated first, unless opened read-only."""
        if self.read_only:
            return IndexConnection(self, self._open_read_only())
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            # WAL with NORMAL is crash-safe; only the last commits may be lost on power loss,
            # and content files are synced before any row names them.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            # Writes wait in begin(); this only covers reads in sqlite's rare busy moments.
            db.execute("PRAGMA busy_timeout=1")
            connection = IndexConnection(self, db)
            connection.migrate()
        except sqlite3.DatabaseError as e:
            raise _unusable(self.path, e) from None
        return connection

    def _open_read_only(self) -> sqlite3.Connection:
        """An existing index for reading only, so that it works on a read-only image path."""
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"no cache index at {self.path}")
        uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=ro"
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
            raise _unusable(self.path, e) from None
        if version < migrations(self.name)[-1][0]:
            db.close()
            raise sqlite3.OperationalError(
                f"{self.path} has schema version {version}; open it writable once to upgrade it")
        return db

    def migrate(self, db: sqlite3.Connection) -> int:
        """Apply every schema file newer than the database in a transaction each; returns the version."""
        (version,) = db.execute("PRAGMA user_version").fetchone()
        for number, sql in migrations(self.name):
            if number > version:
                db.executescript(f"BEGIN;\n{sql}\nPRAGMA user_version={number};\nCOMMIT;")
                version = number
        return int(version)

    def begin(self, db: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE, waiting up to ``busy_timeout`` for another connection's write lock, trying every millisecond."""
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                db.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as e:
                if _primary(e) not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or time.monotonic() >= deadline:
                    raise
            time.sleep(LOCK_POLL_SECONDS)

    def in_transaction(self, db: sqlite3.Connection) -> bool:
        """Whether the connection is inside a transaction (sqlite ends one by itself after some errors)."""
        return db.in_transaction

    def write_error(self, error: Exception) -> Exception | None:
        """sqlite's full disk and lock timeouts as the errors clients get (507, 503)."""
        if isinstance(error, sqlite3.OperationalError):
            if _primary(error) == sqlite3.SQLITE_FULL:
                return StorageFull(f"the index cannot grow: {error}")
            if _primary(error) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                return IndexBusy()
        return None

    @contextmanager
    def trial(self, connection: IndexConnection) -> Iterator[IndexConnection]:
        """An in-memory copy of the index: the server's writes never wait for a dry run."""
        copy = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        connection.raw.backup(copy)
        copy.execute("PRAGMA foreign_keys=ON")
        try:
            yield IndexConnection(self, copy)
        finally:
            copy.close()

    def start(self) -> None:
        """Open (creating or migrating) the index file for the reactor's short statements."""
        self._own = self.connect()

    def short(self, interaction: Callable[Concatenate[IndexConnection, P], T],
              *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        """Inline on the reactor's connection: indexed lookups take microseconds, less than a thread hop."""
        try:
            return succeed(interaction(self.connection, *args, **kwargs))
        except Exception:
            return fail()

    def long(self, work: Callable[[IndexConnection], T], to_thread: ToThread) -> Deferred[T]:
        """On ``to_thread``, with a connection of its own that waits the default time for the lock."""
        def run() -> T:
            own = SqliteEngine(self.path, self.clock, read_only=self.read_only).connect()
            try:
                return work(own)
            finally:
                own.close()

        result: Deferred[T] = to_thread(run)
        return result

    def blocking(self, interaction: Callable[Concatenate[IndexConnection, P], T],
                 *args: P.args, **kwargs: P.kwargs) -> T:
        """On the reactor's connection, at once."""
        return interaction(self.connection, *args, **kwargs)

    @property
    def connection(self) -> IndexConnection:
        """The connection the reactor's short work uses, opened at first use."""
        if self._own is None:
            self.start()
        assert self._own is not None
        return self._own

    def close(self) -> None:
        """Close the reactor's connection."""
        if self._own is not None:
            self._own.close()
            self._own = None



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
