"""The PostgreSQL engine: the index shared by several replicas (``index: {postgresql: URL}``).

The server's work never runs on the reactor: every call takes a connection
from a small pool and runs on a bounded set of worker threads, in short
transactions.  A serialization failure or deadlock is retried; a lost
connection is replaced and the call tried once more, and while the database
cannot be reached each call fails with IndexUnavailable (a JSON 503).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Concatenate, TypeVar

import psycopg
from psycopg import errors
from psycopg.pq import TransactionStatus
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ociregistry.index import (
    Engine,
    IndexBusy,
    IndexConnection,
    IndexUnavailable,
    P,
    ToThread,
    masked_url,
    migrations,
)
from ociregistry.store import CacheUnusable
from ociregistry.threads import WorkerThreads

log = Logger()

T = TypeVar("T")

# The advisory lock replicas take around a migration, so that only one applies it.
_MIGRATION_LOCK = 0x6F63697265670001
# How often a transaction that lost a serialization race or a deadlock is tried.
_ATTEMPTS = 5
_CONNECT_TIMEOUT_SECONDS = 5
_RETRYABLE = (errors.SerializationFailure, errors.DeadlockDetected)


class PostgresEngine(Engine):
    """The shared index in PostgreSQL (15 or newer), reached through psycopg 3."""

    name = "postgres"
    shared = True
    errors = (psycopg.Error,)
    lost = (psycopg.OperationalError,)

    def __init__(self, url: str, reactor: Any, pool_size: int = 8) -> None:
        self.url = url
        self.clock = reactor
        self._threads = WorkerThreads(reactor, "index", pool_size)
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._problem: str | None = None
        self._probing = False

    def sql(self, statement: str) -> str:
        """``?`` placeholders as psycopg's ``%s``."""
        return _translate(statement)

    def connect(self) -> IndexConnection:
        """A new connection with the schema up to date; CacheUnusable, in one line, if the database cannot be reached."""
        try:
            connection = IndexConnection(self, self._open())
            connection.migrate()
        except psycopg.Error as e:
            raise CacheUnusable(f"cannot use the PostgreSQL index at {masked_url(self.url)}: {_first_line(e)}") from None
        return connection

    def _open(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_SECONDS)

    def migrate(self, db: psycopg.Connection[Any]) -> int:
        """Apply every schema file newer than the database in one transaction, under an advisory lock."""
        with db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT max(version) FROM schema_version").fetchone()
            version = int(row[0]) if row and row[0] is not None else 0
            for number, sql in migrations(self.name):
                if number > version:
                    db.execute(sql)
                    db.execute("INSERT INTO schema_version (version) VALUES (%s)", (number,))
                    version = number
        return version

    def in_transaction(self, db: psycopg.Connection[Any]) -> bool:
        """Whether the connection is inside a transaction (a broken one is not)."""
        return db.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR,
                                              TransactionStatus.ACTIVE)

    def write_error(self, error: Exception) -> Exception | None:
        """A connection lost during a write is the 503 of an unreachable index."""
        if isinstance(error, psycopg.OperationalError) and not isinstance(error, _RETRYABLE):
            return IndexUnavailable(_first_line(error))
        return None

    @contextmanager
    def trial(self, connection: IndexConnection) -> Iterator[IndexConnection]:
        """The connection inside a transaction that is rolled back at the end."""
        db = connection.raw
        db.execute("BEGIN")
        try:
            yield connection
        finally:
            if self.in_transaction(db):
                db.execute("ROLLBACK")

    def try_lock(self, db: psycopg.Connection[Any], key: int) -> bool:
        """A session advisory lock: released by unlock, or by the server when the connection drops."""
        row = db.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
        return bool(row and row[0])

    def unlock(self, db: psycopg.Connection[Any], key: int) -> None:
        """Release the session advisory lock (a broken connection has lost it already)."""
        if not db.broken:
            db.execute("SELECT pg_advisory_unlock(%s)", (key,))

    def start(self) -> None:
        """Reach the database and migrate it; raises CacheUnusable when it cannot be used."""
        self._idle.append(self.connect().raw)

    def short(self, interaction: Callable[Concatenate[IndexConnection, P], T],
              *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        """On a worker thread with a pooled connection."""
        return self._threads.run(self._call, interaction, args, kwargs)

    def long(self, work: Callable[[IndexConnection], T], to_thread: ToThread) -> Deferred[T]:
        """On a worker thread too: the pool bounds the connections, not the kind of work."""
        return self._threads.run(self._call, work, (), {})

    def blocking(self, interaction: Callable[Concatenate[IndexConnection, P], T],
                 *args: P.args, **kwargs: P.kwargs) -> T:
        """On the calling thread, with a pooled connection."""
        return self._call(interaction, args, kwargs)

    def problem(self) -> str | None:
        """The last reason the database could not be reached, checked again in the background."""
        if self._problem is not None and not self._probing:
            self._probing = True
            probe = self.short(IndexConnection.readable)
            probe.addBoth(self._probed)
        return self._problem

    def _probed(self, result: object) -> None:
        self._probing = False
        if isinstance(result, str):
            self._problem = result

    def close(self) -> None:
        """Close the idle connections; those in use close as their calls end."""
        with self._lock:
            idle, self._idle = self._idle, []
        for db in idle:
            db.close()

    def _call(self, interaction: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        """Run an interaction with a pooled connection: retried after a lost race, once more on a new connection."""
        lost = False
        for attempt in range(_ATTEMPTS):
            db = self._take()
            try:
                result = interaction(IndexConnection(self, db), *args, **kwargs)
            except _RETRYABLE:
                self._give(db)
                if attempt == _ATTEMPTS - 1:
                    raise IndexBusy() from None
                continue
            except (psycopg.OperationalError, IndexUnavailable) as e:
                # The connection was lost (the database restarted?): once more on a new one.
                db.close()
                if lost:
                    self._unreachable(e.message if isinstance(e, IndexUnavailable) else _first_line(e))
                lost = True
                continue
            except BaseException:
                self._give(db)
                raise
            self._give(db)
            if self._problem is not None:
                self._problem = None
                log.info("The PostgreSQL index is reachable again")
            return result
        raise IndexBusy()

    def _take(self) -> psycopg.Connection[Any]:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        try:
            return self._open()
        except psycopg.Error as e:
            self._unreachable(_first_line(e))
            raise AssertionError("unreachable") from None

    def _give(self, db: psycopg.Connection[Any]) -> None:
        if db.closed or db.broken:
            return
        with self._lock:
            self._idle.append(db)

    def _unreachable(self, why: str) -> None:
        """Note that the database cannot be reached (logged once until it is back) and fail the call."""
        if self._problem is None:
            log.warn("The PostgreSQL index cannot be reached: {why}", why=why)
        self._problem = f"index is not reachable: {why}"
        raise IndexUnavailable(why)


@lru_cache(maxsize=512)
def _translate(statement: str) -> str:
    return statement.replace("%", "%%").replace("?", "%s")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
