"""The index: which manifests, tags and blobs the cache holds.

The index is the source of truth at start-up; the files under ``blobs/`` are
only trusted once a row here names them.  It is a public interface too: users
read it with ``sqlite3`` or ``psql`` (see README).

Every question and fact is written once, as a method of IndexConnection over
one DB-API connection, in SQL with ``?`` placeholders that an engine rewrites
when its driver wants another style.  The engine (ociregistry/sqlite.py,
ociregistry/postgres.py) decides where that work runs:

- ``Index.run``: the server's short lookups and writes.  sqlite runs them
  inline on the reactor's own connection (the Deferred has already fired);
  PostgreSQL on a bounded pool of threads, each with a connection of its own.
- ``Index.run_long``: whole-index work (listings, prunes) on a thread with a
  connection of its own, so the reactor never waits for it.
- ``Index.run_blocking``: on the calling thread, for the CLI and start-up.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ociregistry.errors import OCIError, ServiceUnavailable
from ociregistry.store import BlobStore

if TYPE_CHECKING:
    from ociregistry.content import ContentStore, ContentWriter

log = Logger()

P = ParamSpec("P")
T = TypeVar("T")
ToThread = Callable[..., "Deferred[Any]"]

# A prune's write transaction ends after this long, so that others wait at most that for the lock.
BATCH_SECONDS = 0.02
# How often a write waiting for another connection's lock tries again.  sqlite's
# own busy handler backs off to 100 ms, so a waiter would miss the short gaps
# between a prune's transactions and wait for the whole prune.
LOCK_POLL_SECONDS = 0.001
# The advisory lock of background pruning, so that one replica prunes at a time.
PRUNE_LOCK = 0x6F63697265670002
# A pull of a manifest whose pull time is older than this is written at once on a shared
# index (see Index.record_pull): well inside the grace of a prune (SHARED_GRACE_SECONDS).
PULL_WRITE_THROUGH_SECONDS = 60.0


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


def migrations(engine: str = "sqlite") -> list[tuple[int, str]]:
    """The packaged schema, as (version, SQL) in order: each shared file, then the engine's own of that number.

    ``schema/NNN_*.sql`` holds what every engine runs alike; ``schema/<engine>/NNN_*.sql``
    only what differs.
    """
    found: dict[int, list[tuple[int, str, str]]] = {}
    schema = resources.files("ociregistry").joinpath("schema")
    for order, folder in enumerate([schema, schema.joinpath(engine)]):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            match = re.match(r"(\d+)_.*\.sql\Z", entry.name)
            if match:
                found.setdefault(int(match.group(1)), []).append((order, entry.name, entry.read_text("utf-8")))
    return [(number, "\n".join(sql for _, _, sql in sorted(parts))) for number, parts in sorted(found.items())]


class IndexBusy(ServiceUnavailable):
    """Another process held the index's write lock for longer than this connection waits."""

    def __init__(self) -> None:
        super().__init__("the cache index is busy (a prune or check is running); retry")


class IndexUnavailable(ServiceUnavailable):
    """The index's database cannot be reached; requests that need it are answered 503 until it is back."""

    def __init__(self, why: str) -> None:
        super().__init__(f"the cache index is unavailable: {why}")


class Engine:
    """What differs between database engines, and where each kind of work runs.  One small subclass each."""

    name = ""
    # Whether several replicas may share the index (and the storage beside it).
    shared = False
    # The driver's errors: what a query against a broken database raises.
    errors: tuple[type[Exception], ...] = ()
    # Those of them that mean the connection to the database was lost: the engine reconnects.
    lost: tuple[type[Exception], ...] = ()
    clock: IReactorTime

    def sql(self, statement: str) -> str:
        """A statement written with ``?`` placeholders, as this engine's driver takes it."""
        return statement

    def connect(self) -> IndexConnection:
        """A new connection of its own, with the schema up to date."""
        raise NotImplementedError

    def migrate(self, db: Any) -> int:
        """Bring a raw connection's database up to the packaged schema; returns the version."""
        raise NotImplementedError

    def begin(self, db: Any) -> None:
        """Begin a write transaction on a raw connection."""
        db.execute("BEGIN")

    def in_transaction(self, db: Any) -> bool:
        """Whether a raw connection is inside a transaction."""
        raise NotImplementedError

    def write_error(self, error: Exception) -> Exception | None:
        """The error clients get for a failed write (507, 503), or None to let it pass."""
        return None

    def trial(self, connection: IndexConnection) -> AbstractContextManager[IndexConnection]:
        """A connection whose changes are thrown away, to work out what a change would do."""
        raise NotImplementedError

    def try_lock(self, db: Any, key: int) -> bool:
        """Take a lock other connections to the database cannot take meanwhile, unless one holds it: whether taken.

        An embedded index has one server, so there is no one to exclude.
        """
        return True

    def unlock(self, db: Any, key: int) -> None:
        """Give up a lock try_lock took."""

    def start(self) -> None:
        """Open what the server's short work uses (raises CacheUnusable when it cannot)."""

    def short(self, interaction: Callable[Concatenate[IndexConnection, P], T],
              *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        """Run a short interaction for the server."""
        raise NotImplementedError

    def long(self, work: Callable[[IndexConnection], T], to_thread: ToThread) -> Deferred[T]:
        """Run whole-index work off the reactor, with a connection of its own."""
        raise NotImplementedError

    def blocking(self, interaction: Callable[Concatenate[IndexConnection, P], T],
                 *args: P.args, **kwargs: P.kwargs) -> T:
        """Run an interaction on the calling thread and wait for it."""
        raise NotImplementedError

    def problem(self) -> str | None:
        """None if the index answers a query, else why not (without waiting on the reactor for long)."""
        return self.blocking(IndexConnection.readable)

    def close(self) -> None:
        """Close every connection."""


def index_engine(url: str | None, path: str, clock: IReactorTime, busy_timeout: float = 5.0,
                 read_only: bool = False) -> Engine:
    """The engine of a configuration: PostgreSQL at ``url`` when given, else sqlite at ``path``."""
    # Imported here: the engines build on this module, and the embedded default never loads the driver.
    if url is None:
        from ociregistry.sqlite import SqliteEngine

        return SqliteEngine(path, clock, busy_timeout, read_only)
    from ociregistry.postgres import PostgresEngine

    return PostgresEngine(url, clock)


def masked_url(url: str) -> str:
    """A database URL without its password, to show."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


class Index:
    """The index as the server uses it: each question or fact answers with a Deferred; pull times are batched.

    ``run`` runs any IndexConnection method (or a function of an IndexConnection)
    where the engine runs short work; ``run_long`` and ``run_blocking`` likewise.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._clock = engine.clock
        self._pulls: dict[str, float] = {}
        self._pulls_failing = False
        engine.start()

    def run(self, interaction: Callable[Concatenate[IndexConnection, P], T],
            *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        """Run a short interaction where the engine runs the server's work."""
        return self.engine.short(interaction, *args, **kwargs)

    def run_long(self, work: Callable[[IndexConnection], T], to_thread: ToThread) -> Deferred[T]:
        """Run whole-index work off the reactor with a connection of its own, pull times written first."""
        return self.flush_pulls().addCallback(lambda _: self.engine.long(work, to_thread))

    def run_blocking(self, interaction: Callable[Concatenate[IndexConnection, P], T],
                     *args: P.args, **kwargs: P.kwargs) -> T:
        """Run an interaction on the calling thread (start-up, the CLI), waiting for it."""
        return self.engine.blocking(interaction, *args, **kwargs)

    def manifest(self, digest: str) -> Deferred[ManifestRecord | None]:
        """The cached manifest with this digest, if any."""
        return self.engine.short(IndexConnection.manifest, digest)

    def tag(self, registry: str, repository: str, tag: str) -> Deferred[tuple[ManifestRecord, str] | None]:
        """The manifest a cached tag points at, and when the tag was last confirmed upstream."""
        return self.engine.short(IndexConnection.tag, registry, repository, tag)

    def point_tag(self, registry: str, repository: str, tag: str, digest: str) -> Deferred[bool]:
        """Point a tag at a cached manifest, confirmed now; False if the manifest is not cached (any more)."""
        return self.engine.short(IndexConnection.point_tag, registry, repository, tag, digest)

    def references(self, digest: str) -> Deferred[list[Reference]]:
        """What a cached manifest refers to."""
        return self.engine.short(IndexConnection.references, digest)

    def record_manifest(self, digest: str, media_type: str, size: int, registry: str, repository: str,
                        references: Iterable[Reference], tag: str | None = None) -> Deferred[ManifestRecord]:
        """Add a verified, stored manifest (and point a tag at it) in one transaction."""
        return self.engine.short(IndexConnection.record_manifest, digest, media_type, size, registry,
                                 repository, list(references), tag)

    def tags(self, registry: str, repository: str) -> Deferred[list[str]]:
        """The cached tags of a repository, sorted."""
        return self.engine.short(IndexConnection.tags, registry, repository)

    def blob_size(self, digest: str) -> Deferred[int | None]:
        """The size of a cached blob, or None when it is not cached."""
        return self.engine.short(IndexConnection.blob_size, digest)

    def record_blob(self, digest: str, size: int) -> Deferred[None]:
        """Add a verified, stored blob."""
        return self.engine.short(IndexConnection.record_blob, digest, size)

    async def record_file(self, store: ContentStore, writer: ContentWriter, record: Callable[[], Deferred[T]]) -> T:
        """Rename a verified file into place, then write the row that names it (``record``).

        When the row cannot be written (the disk is full, the index unreachable)
        the file goes again, unless a row names it by then or another writer's
        file replaced it: blobs/ keeps no file that no row names.
        """
        await writer.commit()
        try:
            return await record()
        except CancelledError:
            # The row may be written yet: a file too many is swept by ``check --repair``.
            raise
        except Exception as e:
            # Only files can be told apart by identity (see ContentWriter.identity).
            if writer.identity is not None and isinstance(store, BlobStore):
                try:
                    await self.engine.short(IndexConnection.remove_unnamed, store, writer.digest, writer.identity)
                except CancelledError:
                    raise
                except Exception as again:
                    log.warn("Stored {digest} is not recorded ({why}) and stays until check --repair: {again}",
                             digest=writer.digest, why=str(e), again=str(again))
            raise

    def forget_blob(self, digest: str) -> Deferred[None]:
        """Drop a blob row whose file has gone, so that it is fetched again."""
        return self.engine.short(IndexConnection.forget_blob, digest)

    def forget_manifest(self, digest: str) -> Deferred[None]:
        """Drop a manifest row (and its tags and references) whose file has gone."""
        return self.engine.short(IndexConnection.forget_manifest, digest)

    def set_times(self, digest: str, created: str, pulled: str) -> Deferred[None]:
        """Set when a manifest entered the cache and was last pulled (for imported caches)."""
        return self.engine.short(IndexConnection.set_times, digest, created, pulled)

    def totals(self) -> Deferred[tuple[int, int, int]]:
        """How many manifests and blobs are cached, and their bytes on disk."""
        return self.engine.short(IndexConnection.totals)

    def readable(self) -> str | None:
        """None if the index answers a query, else why not."""
        return self.engine.problem()

    def record_pull(self, digest: str, last: str | None = None) -> Deferred[int]:
        """Note that a client pulled a manifest; written later in a batch, or at once on a shared index
        when the pull time it holds (``last``) is older than PULL_WRITE_THROUGH_SECONDS.

        Another replica's prune keeps what was pulled within its grace, judged by
        the pull times in the index: a manifest pulled again after a long while
        must say so there before the client reads its blobs, not at the next flush.
        Fires once written (never with a failure: serving never depends on it).
        """
        now = self._clock.seconds()
        self._pulls[digest] = now
        if not self.engine.shared or last is None or last >= utc(now - PULL_WRITE_THROUGH_SECONDS):
            return succeed(0)
        # A client that goes away stops waiting; the write goes on.
        written: Deferred[int] = Deferred()
        self.flush_pulls().addErrback(self._pulls_not_written).addCallback(
            lambda count: None if written.called else written.callback(count))
        return written

    def _pulls_not_written(self, failure: Failure) -> int:
        log.failure("Could not record pull times", failure)
        return 0

    def flush_pulls(self) -> Deferred[int]:
        """Write the pull times noted since the last flush in one transaction; how many.

        When the disk is full or the index busy or unreachable they are kept for
        the next flush (and that is logged once): serving never depends on them.
        """
        pulls, self._pulls = self._pulls, {}
        if not pulls:
            return succeed(0)
        rows = [(utc(when), digest) for digest, when in pulls.items()]
        return self.engine.short(IndexConnection.write_pulls, rows).addCallbacks(
            self._pulls_written, self._pulls_kept, callbackArgs=(len(pulls),), errbackArgs=(pulls,))

    def _pulls_written(self, _: None, count: int) -> int:
        if self._pulls_failing:
            self._pulls_failing = False
            log.info("Pull times are written again")
        return count

    def _pulls_kept(self, failure: Failure, pulls: dict[str, float]) -> int | Failure:
        error = failure.value
        if not isinstance(error, OCIError):
            return failure
        for digest, when in pulls.items():
            self._pulls[digest] = max(when, self._pulls.get(digest, when))
        if not self._pulls_failing:
            self._pulls_failing = True
            log.warn("Pull times are kept in memory until they can be written: {why}", why=error.message)
        return 0

    def close(self) -> Deferred[None]:
        """Write pending pull times and close the database."""
        def closed(result: int | Failure) -> Failure | None:
            self.engine.close()
            return result if isinstance(result, Failure) else None

        return self.flush_pulls().addBoth(closed)


class IndexConnection:
    """One connection to the index, used from one thread at a time; every question and fact, blocking.

    Methods that write open a short transaction of their own (joining one
    already open on this connection), so that any of them can be run as a
    unit of work by Index.run, Index.run_long or Index.run_blocking.
    """

    def __init__(self, engine: Engine, db: Any) -> None:
        self._engine = engine
        self._db = db
        self._clock = engine.clock

    @property
    def raw(self) -> Any:
        """The driver's connection."""
        return self._db

    @property
    def shared(self) -> bool:
        """Whether several replicas may share this index."""
        return self._engine.shared

    def migrate(self) -> int:
        """Apply every schema file newer than the database; returns the version."""
        return self._engine.migrate(self._db)

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    def trial(self) -> AbstractContextManager[IndexConnection]:
        """A connection whose changes are thrown away, to work out what a prune would do."""
        return self._engine.trial(self)

    def seconds(self) -> float:
        """Now, by the index's clock."""
        return float(self._clock.seconds())

    def _now(self) -> str:
        return utc(self._clock.seconds())

    def _execute(self, statement: str, args: tuple[Any, ...] = ()) -> Any:
        return self._db.execute(self._engine.sql(statement), args)

    def _executemany(self, statement: str, rows: list[tuple[Any, ...]]) -> None:
        if rows:
            self._db.cursor().executemany(self._engine.sql(statement), rows)

    def _transaction(self) -> _Transaction:
        return _Transaction(self._engine, self._db)

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Turn the engine's full disk and lock timeouts into the errors clients get (507, 503)."""
        try:
            yield
        except Exception as e:
            mapped = self._engine.write_error(e)
            if mapped is None:
                raise
            raise mapped from None

    def write_pulls(self, rows: list[tuple[str, str]]) -> None:
        """Write pull times, (time, digest), in one transaction."""
        with self._writing(), self._transaction():
            self._executemany("UPDATE manifests SET pulled = ? WHERE digest = ?", rows)

    def manifest(self, digest: str) -> ManifestRecord | None:
        """The cached manifest with this digest, if any."""
        row = self._execute(
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
        row = self._execute(
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
            cursor = self._execute(
                "INSERT INTO tags (registry, repository, tag, digest, updated)"
                " SELECT ?, ?, ?, digest, ? FROM manifests WHERE digest = ?"
                " ON CONFLICT (registry, repository, tag)"
                " DO UPDATE SET digest = excluded.digest, updated = excluded.updated",
                (registry, repository, tag, self._now(), digest),
            )
        return bool(cursor.rowcount > 0)

    def references(self, digest: str) -> list[Reference]:
        """What a cached manifest refers to."""
        rows = self._execute(
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
            self._execute(
                "INSERT INTO manifests (digest, media_type, size, registry, repository, created, pulled)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (digest) DO NOTHING",
                (digest, media_type, size, registry, repository, now, now),
            )
            self._executemany(
                "INSERT INTO manifest_refs (manifest, child, kind, media_type, size, platform)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
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
            self._execute("SELECT 1 FROM manifests LIMIT 1").fetchall()
        except self._engine.lost:
            raise
        except self._engine.errors as e:
            return f"index is not readable: {e}"
        return None

    def totals(self) -> tuple[int, int, int]:
        """How many manifests and blobs are cached, and their bytes on disk."""
        manifests, manifest_bytes = self._execute("SELECT count(*), coalesce(sum(size), 0) FROM manifests").fetchone()
        blobs, blob_bytes = self._execute("SELECT count(*), coalesce(sum(size), 0) FROM blobs").fetchone()
        return int(manifests), int(blobs), int(manifest_bytes + blob_bytes)

    def tags(self, registry: str, repository: str) -> list[str]:
        """The cached tags of a repository, sorted."""
        rows = self._execute("SELECT tag FROM tags WHERE registry = ? AND repository = ?", (registry, repository))
        # Sorted here: a PostgreSQL database's collation may not sort by code point as sqlite does.
        return sorted(tag for (tag,) in rows)

    def blob_size(self, digest: str) -> int | None:
        """The size of a cached blob, or None when it is not cached."""
        row = self._execute("SELECT size FROM blobs WHERE digest = ?", (digest,)).fetchone()
        return int(row[0]) if row else None

    def record_blob(self, digest: str, size: int) -> None:
        """Add a verified, stored blob."""
        with self._writing(), self._transaction():
            self._execute(
                "INSERT INTO blobs (digest, size, created) VALUES (?, ?, ?) ON CONFLICT (digest) DO NOTHING",
                (digest, size, self._now()),
            )

    def forget_blob(self, digest: str) -> None:
        """Drop a blob row whose file has gone, so that it is fetched again."""
        with self._writing(), self._transaction():
            self._execute("DELETE FROM blobs WHERE digest = ?", (digest,))

    def forget_manifest(self, digest: str) -> None:
        """Drop a manifest row (and its tags and references) whose file has gone."""
        with self._writing(), self._transaction():
            self._execute("DELETE FROM manifests WHERE digest = ?", (digest,))

    def names(self, digest: str) -> bool:
        """Whether a manifest or blob row names this digest now."""
        return self._execute(
            "SELECT 1 FROM manifests WHERE digest = ? UNION ALL SELECT 1 FROM blobs WHERE digest = ?",
            (digest, digest)).fetchone() is not None

    def remove_unnamed(self, store: BlobStore, digest: str, identity: tuple[int, int]) -> None:
        """Remove a digest's file unless a row names it now, or it is no longer the file ``identity`` names."""
        if not self.names(digest):
            store.remove(digest, identity)

    def stored_size(self, digest: str, kind: str) -> int | None:
        """The size a manifest (kind 'manifest') or blob row records now, or None without a row."""
        table = "manifests" if kind == "manifest" else "blobs"
        row = self._execute(f"SELECT size FROM {table} WHERE digest = ?", (digest,)).fetchone()
        return int(row[0]) if row else None

    def blob_rows(self) -> list[tuple[str, int, str]]:
        """Every blob row: (digest, size, created)."""
        return sorted((d, int(s), c) for d, s, c in self._execute("SELECT digest, size, created FROM blobs"))

    def tag_rows(self, digest: str) -> list[tuple[str, str, str, str]]:
        """The tags pointing at a manifest: (registry, repository, tag, updated)."""
        return sorted(self._execute("SELECT registry, repository, tag, updated FROM tags WHERE digest = ?",
                                    (digest,)).fetchall())

    def copy_blob(self, digest: str, size: int, created: str) -> None:
        """Add a blob row as another index recorded it (moving a cache in); an existing row stays."""
        with self._writing(), self._transaction():
            self._execute("INSERT INTO blobs (digest, size, created) VALUES (?, ?, ?) ON CONFLICT (digest) DO NOTHING",
                          (digest, size, created))

    def copy_manifest(self, record: ManifestRecord, references: Iterable[Reference],
                      tags: Iterable[tuple[str, str, str, str]]) -> None:
        """Add a manifest row, its references and tags as another index recorded them, in one transaction.

        What the rows hold already (a replica pulled it, or an earlier run copied it) stays.
        """
        with self._writing(), self._transaction():
            self._execute(
                "INSERT INTO manifests (digest, media_type, size, registry, repository, created, pulled)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (digest) DO NOTHING",
                (record.digest, record.media_type, record.size, record.registry, record.repository,
                 record.created, record.pulled))
            self._executemany(
                "INSERT INTO manifest_refs (manifest, child, kind, media_type, size, platform)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [(record.digest, r.child, r.kind, r.media_type, r.size, r.platform) for r in references])
            self._executemany(
                "INSERT INTO tags (registry, repository, tag, digest, updated) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (registry, repository, tag) DO NOTHING",
                [(registry, repository, tag, record.digest, updated) for registry, repository, tag, updated in tags])

    def cached_images(self, every_manifest: bool = False) -> list[CachedImage]:
        """Every image as users name it: each tag, and each top-level manifest cached only by digest.

        With ``every_manifest``, the platform manifests of indexes are listed too.
        Sizes count the cached manifests and blobs an image uses, each once.
        """
        manifests = {
            row[0]: ManifestRecord(*row)
            for row in self._execute(
                "SELECT digest, media_type, size, registry, repository, created, pulled FROM manifests")
        }
        children: dict[str, list[tuple[str, str]]] = {}
        parents: set[str] = set()
        for manifest, child, kind in self._execute("SELECT manifest, child, kind FROM manifest_refs"):
            children.setdefault(manifest, []).append((child, kind))
            if kind == "manifest":
                parents.add(child)
        blobs = dict(self._execute("SELECT digest, size FROM blobs"))
        tags: dict[str, list[tuple[str, str, str]]] = {}
        for registry, repository, tag, digest in self._execute(
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
        (size,) = self._execute(
            "SELECT (SELECT coalesce(sum(size), 0) FROM manifests)"
            " + (SELECT coalesce(sum(size), 0) FROM blob_refcounts"
            "     WHERE refcount > 0 AND digest NOT IN (SELECT digest FROM manifests))"
        ).fetchone()
        return int(size)

    def remove_images(self, images: Iterable[CachedImage], fit: int | None = None,
                      store: BlobStore | None = None, batch: int = 100,
                      orphans_since: str | None = None) -> Removal:
        """Untag images, drop the manifests and blobs nothing else uses, then every unreferenced blob.

        With ``fit``, stops once the cache is no larger than that many bytes.
        Works in transactions of at most ``batch`` images and BATCH_SECONDS,
        so a server sharing the index waits only that long for the lock.
        Each transaction commits before the ``store``'s files of what it dropped
        are removed, so a crash leaves files no row names (which ``check
        --repair`` sweeps), never a row without its file; a file fetched and
        recorded anew meanwhile is left alone.  Without a store, only rows change.
        A blob some replica is downloading (under a live lease) is never
        removed, nor, with ``orphans_since``, an unused blob recorded since then.
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
                # Read in each transaction: a replica may claim a download while the prune runs.
                kept = self.downloading()
                while pending and (fit is None or size > fit) and (
                        taken == 0 or (taken < batch and time.monotonic() - began < BATCH_SECONDS)):
                    image = pending.pop()
                    size -= self._remove_image(image, manifests, blobs, doomed, kept)
                    removed.append(image)
                    taken += 1
                finished = not pending or (fit is not None and size <= fit)
                if finished:
                    orphans = {
                        digest: size for digest, size, created in self._execute(
                            "SELECT u.digest, u.size, b.created FROM blobs_unreferenced u"
                            " JOIN blobs b ON b.digest = u.digest")
                        if digest not in kept and (orphans_since is None or created < orphans_since)}
                    self._drop_blobs(orphans, blobs, doomed)
                # Which files the rows named, while no one can record those digests again.
                files = {digest: store.identity(digest) for digest in doomed} if store is not None else {}
            for digest, identity in sorted(files.items()):
                if store is not None and identity is not None:
                    self.remove_unnamed(store, digest, identity)
            if finished:
                return Removal(tuple(removed), tuple(manifests.items()), tuple(blobs.items()))
            # A gap between transactions, for a writer that waits for the lock.
            time.sleep(LOCK_POLL_SECONDS * 2)

    def _remove_image(self, image: CachedImage, manifests: dict[str, int], blobs: dict[str, int],
                      doomed: set[str], kept: set[str]) -> int:
        """Untag one image and drop what only it used; returns the bytes freed."""
        if image.tag is not None:
            self._execute("DELETE FROM tags WHERE registry = ? AND repository = ? AND tag = ?",
                             (image.registry, image.repository, image.tag))
        dropped: dict[str, int] = {}
        used: set[str] = set()
        self._drop_unused(image.digest, dropped, used)
        freed = {}
        for blob in sorted(used):
            size = None if blob in blobs else self.blob_size(blob)
            if size is not None and blob not in kept and not self._execute(
                    "SELECT 1 FROM manifest_refs WHERE child = ? AND kind IN ('config', 'layer') LIMIT 1",
                    (blob,)).fetchone():
                freed[blob] = size
        self._drop_blobs(freed, blobs, doomed)
        doomed.update(digest for digest in dropped if self.blob_size(digest) is None)
        manifests.update(dropped)
        return sum(dropped.values()) + sum(freed.values())

    def _drop_blobs(self, found: dict[str, int], blobs: dict[str, int], doomed: set[str]) -> None:
        """Delete blob rows, marking their files to go (unless the digest is also a cached manifest)."""
        self._executemany("DELETE FROM blobs WHERE digest = ?", [(digest,) for digest in found])
        doomed.update(digest for digest in found if self.manifest(digest) is None)
        blobs.update(found)

    def _drop_unused(self, digest: str, dropped: dict[str, int], used: set[str]) -> None:
        """Delete a manifest no tag or cached index uses, then its platform manifests likewise.

        Collects the dropped manifests' sizes and the blobs they used.
        """
        in_use = self._execute(
            "SELECT 1 FROM tags WHERE digest = ?"
            " UNION ALL SELECT 1 FROM manifest_refs WHERE child = ? AND kind = 'manifest' LIMIT 1",
            (digest, digest)).fetchone()
        record = self.manifest(digest)
        if in_use or record is None:
            return
        references = self.references(digest)
        self._execute("DELETE FROM manifests WHERE digest = ?", (digest,))
        dropped[digest] = record.size
        used.update(r.child for r in references if r.kind != "manifest")
        for reference in references:
            if reference.kind == "manifest":
                self._drop_unused(reference.child, dropped, used)

    def blob_refcounts(self, substring: str = "") -> list[tuple[str, int, int]]:
        """Cached blobs whose digest contains ``substring``: (digest, size, reference count)."""
        rows = self._execute(
            "SELECT digest, size, refcount FROM blob_refcounts WHERE instr(digest, ?) > 0", (substring,))
        return sorted((digest, int(size), int(count)) for digest, size, count in rows)

    def stored_objects(self) -> list[tuple[str, int, str]]:
        """Every file the index vouches for: (digest, size, 'manifest' or 'blob')."""
        rows = self._execute(
            "SELECT digest, size, 'manifest' FROM manifests"
            " UNION ALL SELECT digest, size, 'blob' FROM blobs")
        return sorted((digest, int(size), kind) for digest, size, kind in rows)

    def set_times(self, digest: str, created: str, pulled: str) -> None:
        """Set when a manifest entered the cache and was last pulled (for imported caches)."""
        with self._writing(), self._transaction():
            self._execute("UPDATE manifests SET created = ?, pulled = ? WHERE digest = ?",
                             (created, pulled, digest))

    def claim_download(self, registry: str, digest: str, owner: str, now: float,
                       lease: float) -> tuple[str, str, tuple[str, str] | None]:
        """Take the download of a digest for ``owner`` unless another holds a live lease.

        Returns the owner and expiry after, and, when ``owner`` took the lease
        over, the multipart upload (key, upload id) the previous owner recorded
        with it, for the new owner to abort.  One statement inserts the lease,
        or takes over one that has expired (or is ``owner``'s own, from an
        earlier life): two claimants never both get it.  When it stays
        another's, that row is locked until the transaction ends, so the owner
        read next is the one that won.
        """
        with self._writing(), self._transaction():
            before = self._execute("SELECT upload_key, upload_id FROM downloads WHERE registry = ? AND digest = ?",
                                   (registry, digest)).fetchone()
            row = self._execute(
                "INSERT INTO downloads (registry, digest, owner, expires, started) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (registry, digest) DO UPDATE"
                " SET owner = excluded.owner, expires = excluded.expires, started = excluded.started,"
                " upload_key = NULL, upload_id = NULL"
                " WHERE downloads.expires <= ? OR downloads.owner = excluded.owner"
                " RETURNING owner, expires",
                (registry, digest, owner, utc(now + lease), utc(now), utc(now))).fetchone()
            if row is None:
                row = self._execute("SELECT owner, expires FROM downloads WHERE registry = ? AND digest = ?",
                                    (registry, digest)).fetchone()
                before = None
        previous = (str(before[0]), str(before[1])) if before and before[0] and before[1] else None
        return str(row[0]), str(row[1]), previous

    def renew_downloads(self, keys: list[tuple[str, str]], owner: str, now: float,
                        lease: float) -> list[tuple[str, str]]:
        """Extend ``owner``'s leases of these (registry, digest); the ones it no longer holds."""
        lost = []
        with self._writing(), self._transaction():
            for registry, digest in keys:
                cursor = self._execute(
                    "UPDATE downloads SET expires = ? WHERE registry = ? AND digest = ? AND owner = ?",
                    (utc(now + lease), registry, digest, owner))
                if cursor.rowcount == 0:
                    lost.append((registry, digest))
        return lost

    def release_downloads(self, keys: list[tuple[str, str]], owner: str) -> None:
        """End ``owner``'s leases of these (registry, digest), if it still holds them."""
        with self._writing(), self._transaction():
            self._executemany("DELETE FROM downloads WHERE registry = ? AND digest = ? AND owner = ?",
                              [(registry, digest, owner) for registry, digest in keys])

    def record_upload(self, keys: list[tuple[str, str]], owner: str, key: str, upload_id: str) -> None:
        """Note the multipart upload ``owner`` writes these (registry, digest) to, with its leases of them."""
        with self._writing(), self._transaction():
            self._executemany("UPDATE downloads SET upload_key = ?, upload_id = ?"
                              " WHERE registry = ? AND digest = ? AND owner = ?",
                              [(key, upload_id, registry, digest, owner) for registry, digest in keys])

    def uploads_of(self, owner: str) -> list[tuple[str, str]]:
        """The multipart uploads (key, upload id) recorded with ``owner``'s leases."""
        return [(str(key), str(upload_id)) for key, upload_id in self._execute(
            "SELECT upload_key, upload_id FROM downloads WHERE owner = ? AND upload_key IS NOT NULL"
            " AND upload_id IS NOT NULL ORDER BY registry, digest", (owner,))]

    def leased_uploads(self, now: float) -> set[str]:
        """The ids of the multipart uploads recorded with live leases: downloads in progress write to them."""
        return {str(upload_id) for (upload_id,) in self._execute(
            "SELECT upload_id FROM downloads WHERE expires > ? AND upload_id IS NOT NULL", (utc(now),))}

    def release_downloads_of(self, owner: str) -> int:
        """End every lease ``owner`` holds (those of its previous life at start); how many."""
        with self._writing(), self._transaction():
            cursor = self._execute("DELETE FROM downloads WHERE owner = ?", (owner,))
        return int(cursor.rowcount)

    def download_owner(self, registry: str, digest: str, now: float) -> str | None:
        """The replica downloading a digest under a live lease, if any."""
        row = self._execute("SELECT owner FROM downloads WHERE registry = ? AND digest = ? AND expires > ?",
                            (registry, digest, utc(now))).fetchone()
        return str(row[0]) if row else None

    def downloading(self) -> set[str]:
        """The digests some replica is downloading now, under a live lease."""
        return {digest for (digest,) in self._execute(
            "SELECT digest FROM downloads WHERE expires > ?", (self._now(),))}

    @contextmanager
    def pruning_alone(self) -> Iterator[bool]:
        """Whether this connection may prune while no other does (PostgreSQL's advisory lock), held inside."""
        alone = self._engine.try_lock(self._db, PRUNE_LOCK)
        try:
            yield alone
        finally:
            if alone:
                self._engine.unlock(self._db, PRUNE_LOCK)



class _Transaction:
    """BEGIN ... COMMIT, rolled back on error (a failed COMMIT too).

    The engine begins it (sqlite waits for another connection's write lock).
    Inside another transaction it is part of that one.
    """

    def __init__(self, engine: Engine, db: Any) -> None:
        self._engine = engine
        self._db = db
        self._nested = False

    def __enter__(self) -> None:
        self._nested = self._engine.in_transaction(self._db)
        if not self._nested:
            self._engine.begin(self._db)

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        if self._nested:
            return
        if kind is None:
            try:
                self._db.execute("COMMIT")
                return
            except self._engine.errors:
                self._rollback()
                raise
        self._rollback()

    def _rollback(self) -> None:
        # sqlite rolls back by itself after some errors (a full disk among them).
        if self._engine.in_transaction(self._db):
            self._db.execute("ROLLBACK")


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
