"""The ``ociregistry`` command: load, list, prune and check the cache, import the Go server's store."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any, TextIO

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python import usage

from ociregistry import __version__
from ociregistry.bucket import BucketStore
from ociregistry.cache import Cache
from ociregistry.config import ConfigError, FileSettings, load_config_file, parse_duration, parse_size
from ociregistry.downloads import BlobDownload
from ociregistry.errors import OCIError, StorageUnavailable
from ociregistry.index import CachedImage, Index, IndexConnection, index_engine
from ociregistry.load import Importer, Loaded, Loader, LoadError, host_platform, in_threads, load_files
from ociregistry.manifests import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from ociregistry.metrics import Metrics
from ociregistry.migrate import Migration, MigrationProgress
from ociregistry.prune import (
    SETTLE_SECONDS,
    Criteria,
    Problem,
    check,
    check_bucket,
    describe_removal,
    local_time,
    parse_cutoff,
    parse_patterns,
    prune,
    pruned_digests,
    removal_store,
    remove_objects,
    still_used,
)
from ociregistry.s3 import S3Store
from ociregistry.sqlite import SqliteEngine
from ociregistry.store import CacheUnusable
from ociregistry.tap import Options, ServerConfig, build_config, open_cache

DEFAULT_IMAGE_PATH = "/var/lib/ociregistry"
_TYPES = {OCI_INDEX: "oci-index", DOCKER_LIST: "docker-list", OCI_MANIFEST: "oci-image",
          DOCKER_MANIFEST: "docker-image"}


class CommandError(Exception):
    """A problem to report in one line, exiting non-zero."""


def human_size(size: int) -> str:
    """Bytes for people: 512B, 1.5KiB, 20.0MiB."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size}B" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _settings(args: argparse.Namespace) -> FileSettings:
    if not args.config_file:
        return FileSettings()
    try:
        return load_config_file(args.config_file)
    except ConfigError as e:
        raise CommandError(str(e)) from None


def _image_path(args: argparse.Namespace) -> str:
    return os.path.abspath(args.image_path or _settings(args).image_path or DEFAULT_IMAGE_PATH)


def _cache_config(args: argparse.Namespace, **options: Any) -> ServerConfig:
    """The server's configuration for a command that fills the cache (load, import-go-cache).

    With ``storage.s3`` the command spools under a directory of its own in the
    image path's ``tmp/`` (a replica running on the same node keeps its own
    spool), and takes no download leases: other replicas could not reach it.
    """
    given = Options()
    given.update({"image-path": args.image_path, "index-url": args.index_url, **options})
    try:
        config = build_config(given, _settings(args))
    except usage.UsageError as e:
        raise CommandError(str(e)) from None
    if config.storage is None:
        return config
    spool = os.path.join(config.image_path, "tmp", f"{args.command}-{uuid.uuid4().hex[:12]}")
    return replace(config, image_path=spool, advertise_url=None)


def _opened(config: ServerConfig, command: str, reactor: Any) -> tuple[Cache, Index]:
    """The cache a command fills; a cache that cannot be used ends the command in one line."""
    try:
        cache, index, _ = open_cache(config, reactor, Metrics())
    except CacheUnusable as e:
        print(f"ociregistry {command}: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    return cache, index


async def _closed(cache: Cache, config: ServerConfig) -> None:
    """Close a command's cache; a spool of its own goes too."""
    await cache.close()
    if isinstance(cache.store, BucketStore):
        # The aborts of uploads that failed end before the command does.
        await cache.store.close()
        shutil.rmtree(config.image_path, ignore_errors=True)


def _index(args: argparse.Namespace, writable: bool) -> IndexConnection:
    from twisted.internet import reactor

    path = os.path.join(_image_path(args), "index.db")
    url = getattr(args, "index_url", None) or _settings(args).index_url
    if url is not None:
        try:
            return index_engine(url, path, reactor).connect()
        except CacheUnusable as e:
            raise CommandError(str(e)) from None
    if not os.path.isfile(path):
        raise CommandError(f"no cache at {os.path.dirname(path)} (no index.db); give --image-path")
    try:
        return SqliteEngine(path, reactor, read_only=not writable).connect()
    except CacheUnusable as e:
        raise CommandError(str(e)) from None
    except sqlite3.Error as e:
        raise CommandError(f"cannot open {path}: {e}") from None


def _react(work: Callable[[Any], Coroutine[Any, Any, None]]) -> None:
    """Run a coroutine on the reactor and exit with its status."""
    from twisted.internet.task import react

    react(lambda reactor: Deferred.fromCoroutine(work(reactor)))


class Progress:
    """How a load goes: a status line redrawn on a terminal, and a line per image."""

    def __init__(self, out: TextIO, clock: IReactorTime, tty: bool) -> None:
        self._out = out
        self._tty = tty
        self._downloads: list[BlobDownload] = []
        self._loaded = 0
        self._failed = 0
        self._started = time.monotonic()
        self._loop = LoopingCall(self._draw)
        self._loop.clock = clock
        if tty:
            self._loop.start(0.25)

    def downloading(self, download: BlobDownload) -> None:
        """Count this download's bytes."""
        self._downloads.append(download)

    def report(self, name: str, result: Loaded | Exception) -> None:
        """One image loaded, or failed."""
        self._clear()
        if isinstance(result, Exception):
            self._failed += 1
            print(f"failed {name}: {getattr(result, 'message', result)}", file=sys.stderr)
        else:
            self._loaded += 1
            print(f"loaded {name} {result.digest} ({result.manifests} manifests, {result.blobs} blobs)",
                  file=self._out)
        self._draw()

    def finish(self) -> None:
        """Stop redrawing and print the totals."""
        if self._loop.running:
            self._loop.stop()
        self._clear()
        print(f"{self._loaded} loaded, {self._failed} failed, {human_size(self._bytes())} downloaded "
              f"in {time.monotonic() - self._started:.1f}s", file=self._out)

    def _bytes(self) -> int:
        return sum(download.available() for download in self._downloads)

    def _draw(self) -> None:
        if self._tty:
            running = sum(1 for d in self._downloads if not d.finished.fired)
            self._out.write(f"\r{self._loaded} loaded, {self._failed} failed, {human_size(self._bytes())} "
                            f"downloaded, {running} downloads running")
            self._out.flush()

    def _clear(self) -> None:
        if self._tty:
            self._out.write("\r\x1b[K")


def cmd_load(args: argparse.Namespace) -> int:
    """Fill the cache from image lists and tarballs."""
    config = _cache_config(args, **{"default-ns": args.default_ns, "pull-timeout": args.pull_timeout})
    for path in args.files:
        if not os.path.isfile(path):
            raise CommandError(f"{path}: no such file")
    platform = None if args.all_platforms else host_platform(args.os, args.arch, args.variant)

    async def work(reactor: Any) -> None:
        cache, index = _opened(config, "load", reactor)
        progress = Progress(sys.stdout, reactor, sys.stdout.isatty())
        loader = Loader(cache, index, cache.store, platform, config.default_ns, progress.downloading,
                        in_threads(reactor))
        try:
            failures = await load_files(loader, args.files, args.concurrency, progress.report, args.name)
        finally:
            progress.finish()
            await _closed(cache, config)
        if failures:
            raise SystemExit(1)

    _react(work)
    return 0


def cmd_import_go_cache(args: argparse.Namespace) -> int:
    """Import the Go server's image store."""
    if not os.path.isdir(args.source):
        raise CommandError(f"--from {args.source}: no such directory")
    config = _cache_config(args)

    async def work(reactor: Any) -> None:
        cache, index = _opened(config, "import-go-cache", reactor)
        try:
            loaded, problems = await Importer(index, cache.store, in_threads(reactor)).import_go_cache(args.source)
        except LoadError as e:
            print(f"ociregistry import-go-cache: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        finally:
            await _closed(cache, config)
        for item in loaded:
            print(f"imported {item.name} {item.digest} ({item.blobs} blobs)")
        for problem in problems:
            print(f"problem: {problem}", file=sys.stderr)
        print(f"{len(loaded)} manifests imported, {len(problems)} problems")
        if problems:
            raise SystemExit(1)

    _react(work)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Copy a single-node cache into the shared index and bucket of a configuration."""
    source = os.path.abspath(args.source)
    path = os.path.join(source, "index.db")
    if not os.path.isfile(path):
        raise CommandError(f"--from {args.source}: not an ociregistry cache (no index.db)")
    settings = _settings(args)
    if settings.index_url is None or settings.storage is None:
        raise CommandError(f"--config-file {args.config_file}: migrate copies into a shared cache, and the "
                           "file names no " + ("index.postgresql" if settings.index_url is None else "storage.s3"))
    storage = settings.storage

    async def work(reactor: Any) -> None:
        try:
            old = SqliteEngine(path, reactor, read_only=True).connect()
            problem = old.readable()
        except (CacheUnusable, sqlite3.Error) as e:
            problem = str(e)
        if problem is not None:
            print(f"ociregistry migrate: --from {args.source}: not an ociregistry cache ({problem})",
                  file=sys.stderr)
            raise SystemExit(1)
        s3 = S3Store(storage.s3, reactor=reactor)
        try:
            await s3.check_bucket()
            # What an earlier run killed midway (or a crashed replica) left uploading.
            await s3.sweep_uploads(storage.abandon_uploads_after)
            index = Index(index_engine(settings.index_url, path, reactor))
        except (StorageUnavailable, CacheUnusable) as e:
            await s3.close()
            print(f"ociregistry migrate: {e.message if isinstance(e, OCIError) else e}", file=sys.stderr)
            raise SystemExit(1) from None
        progress = MigrationProgress(sys.stdout, sys.stderr, reactor, sys.stdout.isatty(), args.every)
        try:
            totals = await Migration(old, source, index, s3, reactor, progress, args.concurrency).run()
        except OCIError as e:
            progress.finish()
            print(f"ociregistry migrate: {e.message}; run it again to carry on", file=sys.stderr)
            raise SystemExit(1) from None
        finally:
            old.close()
            await index.close()
            await s3.close()
        progress.finish()
        if totals.skipped:
            raise SystemExit(1)

    _react(work)
    return 0


def _type(image: CachedImage) -> str:
    return _TYPES.get(image.media_type, image.media_type)


def cmd_list(args: argparse.Namespace) -> int:
    """Show the cached images."""
    try:
        patterns = parse_patterns(args.pattern) if args.pattern else ()
    except ValueError as e:
        raise CommandError(f"--pattern: {e}") from None
    index = _index(args, writable=False)
    try:
        images = index.cached_images()
    finally:
        index.close()
    if patterns:
        images = [i for i in images if any(p.search(i.reference) for p in patterns)]
    if args.format == "json":
        json.dump([{"image": f"{i.registry}/{i.repository}", "tag": i.tag, "digest": i.digest,
                    "mediaType": i.media_type, "type": _type(i), "created": i.created,
                    "pulled": i.pulled, "size": i.size} for i in images], sys.stdout, indent=2)
        print()
        return 0
    rows = [("IMAGE", "TAG", "DIGEST", "TYPE", "CREATED", "PULLED", "SIZE")]
    for i in images:
        digest = i.digest.partition(":")[2][:12] if args.short_digest else i.digest
        rows.append((f"{i.registry}/{i.repository}", i.tag or "<none>", digest, _type(i),
                     local_time(i.created), local_time(i.pulled), human_size(i.size)))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """Remove images, then the blobs no image uses."""
    now = time.time()
    try:
        criteria = Criteria(
            patterns=parse_patterns(args.pattern) if args.pattern else (),
            created_before=parse_cutoff(args.created_before, now) if args.created_before else None,
            accessed_before=parse_cutoff(args.accessed_before, now) if args.accessed_before else None,
            max_size=parse_size(args.max_size) if args.max_size else None,
            count=args.count,
        )
        grace = parse_duration(args.grace) if args.grace is not None else None
    except ValueError as e:
        raise CommandError(str(e)) from None
    if criteria.is_empty():
        raise CommandError("say what to prune: --pattern, --created-before, --accessed-before or --max-size")
    storage = _settings(args).storage if args.config_file else None
    index = _index(args, writable=not args.dry_run)
    try:
        removal = prune(index, removal_store(_image_path(args)), criteria, args.dry_run, grace)
    except BaseException:
        index.close()
        raise
    print("\n".join(describe_removal(removal, args.dry_run)), flush=True)
    if storage is None or args.dry_run:
        index.close()
        return 0

    async def delete(reactor: Any) -> None:
        # The rows' transactions have committed: a crash now leaves objects that check --repair deletes.
        s3 = S3Store(storage.s3, reactor=reactor)
        try:
            deleted = await remove_objects(s3, pruned_digests(removal),
                                           lambda digests: succeed(still_used(index, digests)))
        except StorageUnavailable as e:
            print(f"ociregistry prune: the rows are gone, but deleting their objects failed: {e.message}; "
                  "'ociregistry check --repair' deletes them later", file=sys.stderr)
            raise SystemExit(1) from None
        finally:
            index.close()
            await s3.close()
        print(f"deleted {deleted} objects from the bucket")

    _react(delete)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Verify every file against its digest; with --repair, remove what is corrupt."""
    try:
        settle = parse_duration(args.grace) if args.grace is not None else SETTLE_SECONDS
    except ValueError as e:
        raise CommandError(f"--grace: {e}") from None
    storage = _settings(args).storage if args.config_file else None
    index = _index(args, writable=args.repair)
    if storage is not None:
        _react(lambda reactor: _check_bucket(index, S3Store(storage.s3, reactor=reactor), args.repair, settle))
        return 0
    try:
        problems = check(index, removal_store(_image_path(args)), args.repair, settle=settle)
        checked = len(index.stored_objects())
    finally:
        index.close()
    _print_problems(problems, checked, args.repair)
    return 1 if problems and not args.repair else 0


async def _check_bucket(index: IndexConnection, s3: S3Store, repair: bool, settle: float) -> None:
    """``check`` on a shared cache: the index against the bucket's listing."""
    try:
        problems = await check_bucket(index, s3, repair, settle)
        checked = len(index.stored_objects())
    except StorageUnavailable as e:
        print(f"ociregistry check: {e.message}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        index.close()
        await s3.close()
    _print_problems(problems, checked, repair)
    if problems and not repair:
        raise SystemExit(1)


def _print_problems(problems: list[Problem], checked: int, repair: bool) -> None:
    for problem in problems:
        action = " (removed)" if repair else ""
        print(f"{problem.kind} {problem.digest}: {problem.what}{action}")
    print(f"{checked} objects checked, {len(problems)} problems"
          + (", repaired" if repair and problems else ""))


def cmd_version(args: argparse.Namespace) -> int:
    """Print the version."""
    print(f"ociregistry {__version__}")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    """The command line of every subcommand."""
    top = argparse.ArgumentParser(prog="ociregistry", description="Load, list, prune and check the cache of the "
                                  "ociregistry server; import the Go server's image store.")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cache = argparse.ArgumentParser(add_help=False)
    cache.add_argument("--image-path", help=f"where the cache lives [default: {DEFAULT_IMAGE_PATH}]")
    cache.add_argument("--config-file", help="the server's YAML configuration (imagePath, registries, ...)")
    cache.add_argument("--index-url", help="the PostgreSQL index the replicas share [index.postgresql]")

    load = commands.add_parser("load", parents=[cache], help="fill the cache from image lists and tarballs",
                               description="Fill the cache from image lists (one reference a line, # for "
                               "comments), docker save tarballs and OCI-layout tarballs (plain or gzip).")
    load.add_argument("files", nargs="+", metavar="FILE")
    load.add_argument("--os", help="the platform's operating system [default: linux]")
    load.add_argument("--arch", help="the platform's architecture [default: this machine's]")
    load.add_argument("--variant", help="the platform's variant, e.g. v7 or v6 for arm")
    load.add_argument("--all-platforms", action="store_true", help="cache every platform of an index")
    load.add_argument("--concurrency", type=_positive, default=3, help="images loaded at once [default: 3]")
    load.add_argument("--default-ns", help="the registry of names without one [default: docker.io]")
    load.add_argument("--pull-timeout", help="seconds to wait for an upstream [default: 60]")
    load.add_argument("--name", help="REGISTRY/REPOSITORY[:TAG] for tarball images that carry no full name")
    load.set_defaults(run=cmd_load)

    listing = commands.add_parser("list", parents=[cache], help="show the cached images",
                                  description="Show the cached images (works on a read-only image path).")
    listing.add_argument("--pattern", help="only images matching one of these comma-separated regexes")
    listing.add_argument("--short-digest", action="store_true", help="show 12 hex digits of each digest")
    listing.add_argument("--format", choices=("table", "json"), default="table")
    listing.set_defaults(run=cmd_list)

    pruning = commands.add_parser(
        "prune", parents=[cache], help="remove images and the blobs nothing uses",
        description="Remove the images matching every condition given, least recently pulled first, "
        "then the manifests and blobs no remaining image uses. Dates are local YYYY-MM-DDTHH:MM:SS, "
        "ISO 8601 with a zone, or durations ago such as 30d. Safe while the server runs.")
    pruning.add_argument("--pattern", help="comma-separated regexes matched in REGISTRY/REPOSITORY:TAG")
    pruning.add_argument("--created-before", metavar="DATE", help="cached before this date (or 30d ago)")
    pruning.add_argument("--accessed-before", metavar="DATE", help="not pulled since this date (or 30d ago)")
    pruning.add_argument("--max-size", metavar="SIZE", help="evict least recently pulled images until the "
                         "cache fits, e.g. 50GiB")
    pruning.add_argument("--count", type=_positive, help="remove at most this many images")
    pruning.add_argument("--dry-run", action="store_true", help="print what would go and change nothing")
    pruning.add_argument("--grace", metavar="DURATION",
                         help="keep what was pulled or fetched this recently, which another replica may be "
                         "serving (default 10m on a shared index, 0 on an embedded one)")
    pruning.set_defaults(run=cmd_prune)

    checking = commands.add_parser("check", parents=[cache], help="verify every file against its digest",
                                   description="Verify every manifest and blob file against its digest and "
                                   "the index against the files (with storage.s3: every row against the "
                                   "bucket's objects, and objects no row names); exits 1 if anything is wrong.")
    checking.add_argument("--repair", action="store_true",
                          help="remove what is corrupt or missing, so that it is fetched again")
    checking.add_argument("--grace", metavar="DURATION",
                          help="leave files or objects no row names alone this long after they were written, "
                          "for the download about to record them [default: 10m]")
    checking.set_defaults(run=cmd_check)

    importing = commands.add_parser("import-go-cache", parents=[cache],
                                    help="import the Go ociregistry server's image store",
                                    description="Import an image store written by the Go ociregistry "
                                    "server (lts/, img/, fat/ and blobs/), verifying every digest.")
    importing.add_argument("--from", dest="source", required=True, metavar="DIR")
    importing.set_defaults(run=cmd_import_go_cache)

    migrating = commands.add_parser(
        "migrate", help="copy a single-node cache into the shared index and bucket",
        description="Copy the cache under DIR (index.db and blobs/) into the PostgreSQL index and S3 bucket "
        "the configuration file names: every object verified against its digest while it is uploaded, "
        "then its rows. Run it again to carry on after an interruption: what is there already is skipped.")
    migrating.add_argument("--from", dest="source", required=True, metavar="DIR", help="the cache to copy")
    migrating.add_argument("--config-file", required=True, help="the replicas' YAML configuration")
    migrating.add_argument("--concurrency", type=_positive, default=4, help="objects uploaded at once [default: 4]")
    migrating.add_argument("--every", type=_positive, default=100,
                           help="print a progress line every this many objects (off a terminal) [default: 100]")
    migrating.set_defaults(run=cmd_migrate)

    version = commands.add_parser("version", help="print the version")
    version.set_defaults(run=cmd_version)
    return top


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit status."""
    args = parser().parse_args(argv)
    try:
        return int(args.run(args))
    except CommandError as e:
        print(f"ociregistry {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
