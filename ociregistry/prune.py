"""Taking things out of the cache: pruning by pattern, age or size, and checking files against digests.

Pruning works while the server runs, and in the server on a thread of its
own with its own connection.  Rows are deleted in short write transactions,
and each one's files are unlinked after it commits: a crash then leaves only
files no row names, which ``check --repair`` sweeps, never a row without its
file.  A file fetched and recorded anew in between is a different file, and
is left alone.  A dry run works on an in-memory copy of the index and takes no
lock.  A client already streaming a file keeps its open descriptor (POSIX
unlink leaves the bytes to open readers), downloads in progress live in
``tmp/`` where pruning never looks, and a request that finds a row but no file
fetches the content again.

On a bucket (``storage.s3``) the rows go the same way, and the objects of
what they named are deleted after the transactions commit (``delete_pruned``),
unless a row names the digest again or a replica is downloading it, asked
just before each delete (a replica may fetch any of them again while a long
list is deleted): a crash
in between leaves objects no row names, which ``check --repair`` on the
bucket deletes once they are older than a grace (``check_bucket``).

With an index shared by several replicas, a blob a replica is downloading
(under a live lease) is never removed, what was pulled in the last minutes
is kept (see prune), and background pruning runs on one replica at a time
(an advisory lock: a pass that finds it taken is skipped).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ociregistry.config import PruneSettings, parse_duration
from ociregistry.index import CachedImage, Index, IndexConnection, Removal, utc
from ociregistry.s3 import S3Store, digest_for, key_for
from ociregistry.store import BlobStore

log = Logger()

_DEFAULT_FREQUENCY = 86400.0
_CHUNK = 1024 * 1024
# A file no row names is left alone this long after it was written: a download
# renames its file into place a moment before it records the row.
SETTLE_SECONDS = 600.0
# With an index shared by replicas, what was pulled or fetched this recently is
# kept: another replica may be serving it (see prune).
SHARED_GRACE_SECONDS = 600.0

T = TypeVar("T")
ToThread = Callable[..., "Deferred[Any]"]


@dataclass(frozen=True)
class Criteria:
    """Which images to prune: all given conditions must hold; the least recently pulled go first."""

    patterns: tuple[re.Pattern[str], ...] = ()
    created_before: str | None = None
    accessed_before: str | None = None
    max_size: int | None = None
    count: int | None = None

    def is_empty(self) -> bool:
        """Whether no condition is given (which would select everything)."""
        return not (self.patterns or self.created_before or self.accessed_before
                    or self.max_size is not None)

    def select(self, images: Iterable[CachedImage]) -> list[CachedImage]:
        """The images to remove, in order; with a size limit, the candidates to evict in order."""
        chosen = [
            image for image in sorted(images, key=lambda i: (i.pulled, i.reference))
            if (not self.patterns or any(p.search(image.reference) for p in self.patterns))
            and (self.created_before is None or image.created < self.created_before)
            and (self.accessed_before is None or image.pulled < self.accessed_before)
        ]
        return chosen if self.count is None else chosen[:self.count]


def parse_patterns(text: str) -> tuple[re.Pattern[str], ...]:
    """Comma-separated regular expressions, matched anywhere in ``registry/repository:tag``."""
    patterns = []
    for part in text.split(","):
        if part.strip():
            try:
                patterns.append(re.compile(part.strip()))
            except re.error as e:
                raise ValueError(f"invalid regular expression {part.strip()!r}: {e}") from None
    if not patterns:
        raise ValueError(f"no pattern in {text!r}")
    return tuple(patterns)


def parse_cutoff(text: str, now: float) -> str:
    """A point in time as the index stores it (UTC), from local ``YYYY-MM-DDTHH:MM:SS``,
    ISO 8601 with a zone, a date, or a duration ago such as ``30d`` or ``12h``."""
    try:
        return utc(now - parse_duration(text))
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"invalid date {text!r}: expected YYYY-MM-DDTHH:MM:SS (local time), YYYY-MM-DD, "
            "ISO 8601 with a zone, or a duration such as 30d or 12h") from None
    return utc(moment.timestamp())


def local_time(stored: str) -> str:
    """An index time (UTC) shown in local time, in the form ``prune --created-before`` takes."""
    moment = datetime.datetime.strptime(stored, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    return moment.astimezone().strftime("%Y-%m-%dT%H:%M:%S")


def criteria_for(settings: PruneSettings, now: float) -> Criteria:
    """The criteria of one pass of configured (``pruneConfig``) or requested (admin API) pruning."""
    cutoff = None if settings.duration is None else utc(now - settings.duration)
    if settings.type in ("accessed", "created") and cutoff is None:
        raise ValueError(f"pruning by {settings.type} needs a duration")
    if settings.type == "pattern" and not settings.expr:
        raise ValueError("pruning by pattern needs an expression")
    if settings.type == "size" and settings.max_size is None:
        raise ValueError("pruning by size needs a maximum size")
    return Criteria(
        patterns=parse_patterns(settings.expr or "") if settings.type == "pattern" else (),
        created_before=cutoff if settings.type == "created" else None,
        accessed_before=cutoff if settings.type == "accessed" else None,
        max_size=settings.max_size if settings.type == "size" else None,
        count=settings.count,
    )


def prune(index: IndexConnection, store: BlobStore, criteria: Criteria, dry_run: bool = False,
          grace: float | None = None) -> Removal:
    """Remove the images the criteria select and the files nothing uses any more.

    Images pulled and unused blobs recorded in the last ``grace`` seconds stay
    (by default SHARED_GRACE_SECONDS on a shared index, none on an embedded
    one), and so do blobs a replica is downloading.

    Why a grace: on one node a client streaming a file holds it open, and an
    unlink leaves its bytes to that reader.  Objects in shared storage have no
    such thing: a replica serving a blob from the bucket (or a client
    following a presigned redirect) holds no claim on it, and a delete makes
    its next read, a resumed range too, a 404.  What a replica may be serving
    is what clients pulled recently: a pull reads its manifest and then, within
    moments, its blobs, and the pull times every replica records (batched
    every few seconds, and written before the manifest is answered when the
    one in the index is old: Index.record_pull) say when.  A blob fetched without a cached manifest is
    judged by when it was recorded.
    """
    if grace is None:
        grace = SHARED_GRACE_SECONDS if index.shared else 0.0
    since = utc(index.seconds() - grace) if grace > 0 else None
    chosen = [image for image in criteria.select(index.cached_images()) if since is None or image.pulled < since]
    if not dry_run:
        return index.remove_images(chosen, fit=criteria.max_size, store=store, orphans_since=since)
    with index.trial() as trial:
        return trial.remove_images(chosen, fit=criteria.max_size, orphans_since=since)


def still_used(index: IndexConnection, digests: Iterable[str]) -> set[str]:
    """Of these digests, the ones a row names (again) or a replica is downloading under a live lease."""
    downloading = index.downloading()
    return {digest for digest in digests if digest in downloading or index.names(digest)}


def pruned_digests(removal: Removal) -> list[str]:
    """Every digest whose row a prune removed, each once."""
    return sorted({digest for digest, _ in removal.manifests + removal.blobs})


async def remove_objects(s3: S3Store, digests: Iterable[str],
                         used: Callable[[list[str]], Deferred[set[str]]]) -> int:
    """Delete the bucket's objects of these digests one after another, each unless ``used`` (``still_used``)
    says just before its delete that it is named or downloaded again; how many were deleted.

    Asked object by object, not once for all: deleting many objects takes a
    while, and meanwhile any replica may fetch one of them again, whose new
    object has the same key and whose row names it.  What is left is the
    moment between the question and the delete reaching the bucket.
    """
    count = 0
    for digest in digests:
        if digest in await used([digest]):
            continue
        await s3.delete(key_for(digest))
        count += 1
    return count


def describe_removal(removal: Removal, dry_run: bool) -> list[str]:
    """Lines saying what a prune removed (or would remove)."""
    verb = "would remove" if dry_run else "removed"
    lines = [f"{verb} image {image.reference} ({image.digest})" for image in removal.images]
    lines += [f"{verb} manifest {digest} ({size} bytes)" for digest, size in removal.manifests]
    lines += [f"{verb} blob {digest} ({size} bytes)" for digest, size in removal.blobs]
    lines.append(f"{verb} {len(removal.images)} images, {len(removal.manifests)} manifests, "
                 f"{len(removal.blobs)} blobs, {removal.size} bytes")
    return lines


def inline(function: Callable[..., T], *args: Any) -> Deferred[T]:
    """Run work at once on the calling thread (where no thread is wanted, as in tests)."""
    return maybeDeferred(function, *args)


def on_own_connection(index: Index, to_thread: ToThread, work: Callable[[IndexConnection], T]) -> Deferred[T]:
    """Run ``work`` on a thread, with a connection of its own to the index (pull times written first).

    Long reads and prunes then never hold up the reactor; their writes wait
    for the lock on that thread, and the reactor's own writes wait at most
    for one of their short transactions.
    """
    return index.run_long(work, to_thread)


def log_removal(lines: list[str], what: str) -> None:
    """Log what a prune removed as one event: thousands of events would hold up the reactor."""
    log.info("{what}: {summary}{details}", what=what, summary=lines[-1],
             details="".join(f"\n  {line}" for line in lines[:-1]))


async def delete_pruned(index: Index, s3: S3Store, removal: Removal, to_thread: ToThread = inline) -> int:
    """After a prune's rows are gone (committed), delete their objects from the bucket unless used again."""
    return await remove_objects(s3, pruned_digests(removal), lambda digests: on_own_connection(
        index, to_thread, lambda own: still_used(own, digests)))


async def prune_pass(index: Index, store: BlobStore, settings: PruneSettings, clock: IReactorTime,
                     to_thread: ToThread = inline, bucket: S3Store | None = None) -> None:
    """One pass of background pruning, logged; its errors are logged and do not stop later passes.

    With a ``bucket``, the objects of what it removed are deleted from it afterwards.
    """
    def alone(own: IndexConnection) -> Removal | None:
        with own.pruning_alone() as alone:
            if not alone:
                return None
            return prune(own, store, criteria, settings.dry_run)

    try:
        criteria = criteria_for(settings, clock.seconds())
        removal = await on_own_connection(index, to_thread, alone)
        if removal is None:
            log.info("Pruning ({type}) skipped: another replica is pruning the shared index", type=settings.type)
            return
        log_removal(describe_removal(removal, settings.dry_run), f"Pruning ({settings.type})")
        if bucket is not None and not settings.dry_run:
            await delete_pruned(index, bucket, removal, to_thread)
    except Exception:
        log.failure("Pruning pass failed")


def make_prune_service(settings: PruneSettings, index: Index, image_path: str,
                       clock: IReactorTime, to_thread: ToThread = inline,
                       bucket: S3Store | None = None) -> TimerService:
    """The background pruning of ``pruneConfig``: a pass every ``frequency`` (default a day)."""
    criteria_for(settings, clock.seconds())
    store = removal_store(image_path)
    service = TimerService(settings.frequency or _DEFAULT_FREQUENCY, lambda: Deferred.fromCoroutine(
        prune_pass(index, store, settings, clock, to_thread, bucket)))
    service.clock = clock
    return service


def removal_store(image_path: str) -> BlobStore:
    """The store of an image path, for reading and removing files only (it writes nothing)."""
    return BlobStore(image_path, lambda function, *args: succeed(function(*args)))


@dataclass(frozen=True)
class Problem:
    """A file that does not hold what the index says, or a file no row names."""

    digest: str
    kind: str
    what: str


def check(index: IndexConnection, store: BlobStore, repair: bool = False,
          progress: Callable[[str], None] = lambda line: None,
          settle: float = SETTLE_SECONDS) -> list[Problem]:
    """Verify every indexed file against its size and digest, and find files no row names.

    Safe beside a running server: what a prune or a download changed since
    the listing is looked at again before it counts, and a file written in
    the last ``settle`` seconds is left to the download recording it.
    With ``repair``, corrupt or missing content loses its row and file (so it
    is fetched again) and unindexed files are removed.
    """
    problems = []
    known = set()
    for digest, size, kind in index.stored_objects():
        known.add(digest)
        progress(f"checking {kind} {digest}")
        what = _verify(store.path_for(digest), digest, size)
        if what is None:
            continue
        # Gone from the index since the listing (pruned), or whole again (fetched anew): no problem.
        if index.stored_size(digest, kind) != size or _verify(store.path_for(digest), digest, size) is None:
            continue
        problems.append(Problem(digest, kind, what))
        if repair:
            if kind == "manifest":
                index.forget_manifest(digest)
            else:
                index.forget_blob(digest)
            store.remove(digest)
    for digest in unindexed(index, store, settle):
        if digest not in known:
            problems.append(Problem(digest, "file", "not in the index"))
            if repair:
                store.remove(digest)
    return problems


async def check_bucket(index: IndexConnection, s3: S3Store, repair: bool = False,
                       settle: float = SETTLE_SECONDS) -> list[Problem]:
    """Compare the index with the bucket's listing: rows without their object, and objects no row names.

    Objects were verified before they were completed, so sizes are compared,
    not digests.  What changed since the listing is looked at again before it
    counts, and an object written in the last ``settle`` seconds (a download
    about to record it) or under a download lease is left alone.  With
    ``repair``, a row without its object goes (so it is fetched again) and an
    object no row names is deleted.
    """
    problems = []
    rows = index.stored_objects()
    listed = {digest: entry for entry in await s3.list("blobs/")
              if (digest := digest_for(entry.key)) is not None}
    for digest, size, kind in rows:
        entry = listed.get(digest)
        if entry is not None and entry.size == size:
            continue
        found = await s3.stat(key_for(digest))
        if found == size or index.stored_size(digest, kind) != size:
            continue
        problems.append(Problem(digest, kind, "missing" if found is None
                                else f"has {found} bytes, the index says {size}"))
        if repair:
            if kind == "manifest":
                index.forget_manifest(digest)
            else:
                index.forget_blob(digest)
            if found is not None and not still_used(index, [digest]):
                await s3.delete(key_for(digest))
    settled = time.time() - settle
    named = {digest for digest, _, _ in rows}
    candidates = [digest for digest, entry in listed.items() if digest not in named and entry.modified <= settled]
    used = still_used(index, candidates)
    orphans = [digest for digest in candidates if digest not in used]
    problems += [Problem(digest, "object", "not in the index") for digest in orphans]
    if repair:
        await remove_objects(s3, orphans, lambda digests: succeed(still_used(index, digests)))
    return problems


def unindexed(index: IndexConnection, store: BlobStore, settle: float = SETTLE_SECONDS) -> list[str]:
    """The files under ``blobs/`` that no row names and no download is about to record."""
    found = []
    settled = time.time() - settle
    for digest in _files(store):
        try:
            written = os.stat(store.path_for(digest)).st_mtime
        except FileNotFoundError:
            continue
        if written <= settled and not index.names(digest):
            found.append(digest)
    return found


def _verify(path: str, digest: str, size: int) -> str | None:
    algorithm, _, expected = digest.partition(":")
    try:
        hasher = hashlib.new(algorithm)
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                hasher.update(chunk)
            actual_size = f.tell()
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as e:
        return f"unreadable: {e}"
    if actual_size != size:
        return f"has {actual_size} bytes, the index says {size}"
    if hasher.hexdigest() != expected:
        return f"content hashes to {algorithm}:{hasher.hexdigest()}"
    return None


def _files(store: BlobStore) -> list[str]:
    """The digests of the files under ``blobs/``."""
    found = []
    top = os.path.join(store.root, "blobs")
    for algorithm in sorted(os.listdir(top)) if os.path.isdir(top) else []:
        for prefix in sorted(os.listdir(os.path.join(top, algorithm))):
            for name in sorted(os.listdir(os.path.join(top, algorithm, prefix))):
                found.append(f"{algorithm}:{name}")
    return found
