"""Putting images in the cache without a client: image lists, tarballs, the Go server's image store.

An image list names references, one a line; each is pulled through the same
cache, coalescing and verified downloads as a client's pull, and the tag stays
on the index or list, with the chosen platforms' manifests and blobs cached
beside it.  Tarballs (``docker save``, or an OCI image layout, plain or gzip)
and the Go server's store are read locally (in a thread, a chunk at a time),
every file checked against its digest as it is written: into files under the
image path or, with ``storage.s3``, the bucket, through the same ContentStore
as a download, so an object is completed only once verified and then recorded.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import io
import json
import os
import platform as host
import re
import tarfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from typing import IO, Any, cast

from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError, Deferred, DeferredList, DeferredSemaphore
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from ociregistry.bucket import BucketStore
from ociregistry.cache import Cache
from ociregistry.content import BlobSource, ContentStore
from ociregistry.downloads import BlobDownload
from ociregistry.errors import OCIError
from ociregistry.grammar import DOCKER_HUB, Upstream, check_digest, check_tag, is_digest, resolve_upstream
from ociregistry.index import Index, IndexConnection, ToThread, utc
from ociregistry.manifests import DOCKER_MANIFEST, IMAGE_TYPES, INDEX_TYPES, KNOWN_TYPES, describe
from ociregistry.prune import inline, still_used
from ociregistry.s3 import key_for
from ociregistry.store import BlobStore, DigestMismatch

log = Logger()

IMAGE_NAME = "io.containerd.image.name"
REF_NAME = "org.opencontainers.image.ref.name"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
_DOCUMENTS = ("oci-layout", "index.json", "manifest.json")
_BLOB_MEMBER = re.compile(r"blobs/(sha256|sha512)/([0-9a-f]+)\Z")
_CHUNK = 1024 * 1024
_MACHINES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
             "armv7l": "arm", "armv6l": "arm", "ppc64le": "ppc64le", "s390x": "s390x",
             "riscv64": "riscv64", "i686": "386", "i386": "386"}
# The variant a platform entry without one stands for, as containerd normalizes it.
_DEFAULT_VARIANTS = {"arm64": "v8", "arm": "v7"}


class LoadError(Exception):
    """Something could not be loaded; the message says what and why."""


@dataclass(frozen=True)
class Platform:
    """The platform whose image to take from an index: os, architecture and optional variant."""

    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def matches(self, platform: str | None) -> bool:
        """Whether an index entry's ``os/architecture[/variant]`` is this platform."""
        parts = (platform or "").split("/")
        if parts[:2] != [self.os, self.architecture]:
            return False
        variant = parts[2] if len(parts) > 2 else _DEFAULT_VARIANTS.get(self.architecture)
        return self.variant is None or variant == self.variant


def host_platform(os_name: str | None = None, architecture: str | None = None,
                  variant: str | None = None) -> Platform:
    """A platform, defaulting to linux on this machine's architecture."""
    machine = host.machine().lower()
    return Platform(os_name or "linux", architecture or _MACHINES.get(machine, machine), variant)


@dataclass(frozen=True)
class Loaded:
    """An image now in the cache."""

    name: str
    digest: str
    manifests: int
    blobs: int


Report = Callable[[str, "Loaded | Exception"], None]


def parse_reference(text: str, default_ns: str) -> tuple[Upstream, str]:
    """Where an image reference points and the tag or digest to fetch (a digest wins over a tag)."""
    name, _, digest = text.strip().partition("@")
    tag = "latest"
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    try:
        where = resolve_upstream(name, None, default_ns)
        return where, check_digest(digest) if digest else check_tag(tag)
    except OCIError as e:
        raise LoadError(f"invalid image reference {text.strip()!r}: {e.message}") from None


def read_image_list(path: str) -> list[str]:
    """The references in an image list file: one a line, ``#`` starts a comment."""
    with open(path, encoding="utf-8") as f:
        lines = [line.split("#", 1)[0].strip() for line in f]
    return [line for line in lines if line]


def threaded_store(image_path: str, reactor: Any) -> BlobStore:
    """The store of an image path, syncing files in the reactor's thread pool."""
    return BlobStore(image_path, in_threads(reactor))


def in_threads(reactor: Any) -> ToThread:
    """Runs blocking work (reading a tarball, hashing) in the reactor's thread pool."""
    return partial(deferToThreadPool, reactor, reactor.getThreadPool())


def _go_time(text: Any, default: str) -> str:
    """A time from the Go server's manifest files (local ``YYYY-MM-DDTHH:MM:SS``) as the index stores it."""
    try:
        return utc(datetime.datetime.fromisoformat(str(text)).timestamp())
    except ValueError:
        return default


@dataclass
class _TarContents:
    """What reading a tarball found: its documents, the digests now stored, and other members' hashes."""

    documents: dict[str, bytes] = field(default_factory=dict)
    present: dict[str, int] = field(default_factory=dict)
    written: list[str] = field(default_factory=list)
    files: dict[str, tuple[str, int, bytes]] = field(default_factory=dict)


class Importer:
    """Puts local content in the cache: tarballs and the Go server's image store."""

    def __init__(self, index: Index, store: ContentStore, to_thread: ToThread = inline) -> None:
        self._index = index
        self._store = store
        # Where the reads of local files go, so that the reactor keeps uploading and serving meanwhile.
        self._to_thread = to_thread

    async def load_tarball(self, path: str, name: str | None = None) -> list[Loaded]:
        """Load a ``docker save`` or OCI-layout tarball (plain or gzip); ``name`` names untagged content."""
        contents = _TarContents()
        try:
            await self._read_tar(path, contents, None)
            if "oci-layout" in contents.documents and "index.json" in contents.documents:
                loaded = await self._record_layout(path, contents, name)
            elif "manifest.json" in contents.documents:
                loaded = await self._record_docker_save(path, contents, name)
            else:
                raise LoadError(f"{path}: neither an OCI image layout (oci-layout, index.json) "
                                "nor a docker save archive (manifest.json)")
        except (tarfile.TarError, EOFError, OSError) as e:
            raise LoadError(f"{path}: cannot read the tarball: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise LoadError(f"{path}: malformed {', '.join(contents.documents)}: {e!r}") from None
        finally:
            await self._remove_unrecorded(contents.written)
        return loaded

    async def _remove_unrecorded(self, digests: list[str]) -> None:
        """Remove what a failed load stored and no row names, unless a replica is downloading it meanwhile."""
        store = self._store
        for digest in digests:
            if isinstance(store, BucketStore):
                if not await self._index.run(still_used, [digest]):
                    await store.s3.delete(key_for(digest))
            elif isinstance(store, BlobStore) and not await self._index.run(IndexConnection.names, digest):
                store.remove(digest)

    async def _read_tar(self, path: str, contents: _TarContents, wanted: dict[str, str] | None) -> None:
        """Stream a tarball once: store blobs named by digest, keep the documents, hash the rest.

        With ``wanted`` (member name to digest), store those members instead.
        """
        with tarfile.open(path, "r|*") as tar:
            while (member := await self._to_thread(tar.next)) is not None:
                name = os.path.normpath(member.name)
                reader = tar.extractfile(member) if member.isfile() else None
                if reader is None:
                    continue
                match = _BLOB_MEMBER.match(name)
                if wanted is not None:
                    if name in wanted:
                        await self._store_stream(reader, wanted[name], contents)
                elif match:
                    await self._store_stream(reader, check_digest(f"{match[1]}:{match[2]}"), contents)
                elif name in _DOCUMENTS:
                    contents.documents[name] = await self._to_thread(reader.read)
                else:
                    contents.files[name] = await self._to_thread(_hash_stream, reader)

    async def _stored_size(self, digest: str) -> int | None:
        """The size of content the index records and the store holds, or None."""
        size = await self._index.blob_size(digest)
        if size is None:
            record = await self._index.manifest(digest)
            size = None if record is None else record.size
        if size is None:
            return None
        stored = await self._store.open_blob(digest, size)
        if isinstance(stored, BlobSource):
            stored.close()
        return None if stored is None else size

    async def _store_stream(self, reader: IO[bytes], digest: str, contents: _TarContents) -> None:
        """Write content that must hash to ``digest`` into the store, unless it is cached already.

        Read a chunk at a time in a thread, each written before the next is read
        (a bucket's upload paces the reading), so a blob is never whole in memory.
        """
        size = await self._stored_size(digest)
        if size is not None:
            contents.present[digest] = size
            return
        writer = self._store.begin(digest)
        try:
            while chunk := await self._to_thread(reader.read, _CHUNK):
                room = writer.write(chunk)
                if room is not None:
                    await room
            await writer.commit()
        except DigestMismatch as e:
            raise LoadError(f"content named {digest} hashes to {e.actual}") from None
        except BaseException:
            writer.abort()
            raise
        finally:
            # Nobody reads content while it is loaded: what readers would use can go.
            writer.release()
        contents.present[digest] = writer.size
        contents.written.append(digest)

    async def _record_layout(self, path: str, contents: _TarContents, name: str | None) -> list[Loaded]:
        loaded = []
        for descriptor in json.loads(contents.documents["index.json"])["manifests"]:
            annotations = descriptor.get("annotations") or {}
            where, tag = _tarball_name(path, annotations.get(IMAGE_NAME) or annotations.get(REF_NAME), name)
            digest = check_digest(descriptor["digest"])
            counts = await self._record_tree(path, where, digest, descriptor.get("mediaType"), tag, contents)
            loaded.append(Loaded(_shown(where, tag, digest), digest, *counts))
        return loaded

    async def _record_tree(self, path: str, where: Upstream, digest: str, media_type: str | None,
                     tag: str | None, contents: _TarContents) -> tuple[int, int]:
        """Record a manifest found in a tarball and what of it the tarball holds: (manifests, blobs)."""
        content = await self._store.read_manifest(digest) if digest in contents.present else None
        if content is None:
            raise LoadError(f"{path}: manifest {digest} is not in the tarball")
        media_type, references = describe(content, media_type, f"tarball {path}")
        manifests, blobs = 1, 0
        for reference in references:
            if reference.child not in contents.present:
                continue
            if reference.kind == "manifest":
                counts = await self._record_tree(path, where, reference.child, reference.media_type, None, contents)
                manifests, blobs = manifests + counts[0], blobs + counts[1]
            else:
                await self._index.record_blob(reference.child, contents.present[reference.child])
                blobs += 1
        await self._index.record_manifest(digest, media_type, len(content), where.registry, where.repository,
                                          references, tag=tag)
        return manifests, blobs

    async def _record_docker_save(self, path: str, contents: _TarContents, name: str | None) -> list[Loaded]:
        """A legacy ``docker save`` archive: build a Docker schema 2 manifest for each image in it."""
        entries = json.loads(contents.documents["manifest.json"])
        wanted: dict[str, str] = {}
        for entry in entries:
            for member in [entry["Config"], *entry["Layers"]]:
                member = os.path.normpath(member)
                if member not in contents.files:
                    raise LoadError(f"{path}: {member} is named in manifest.json but not in the tarball")
                wanted[member] = contents.files[member][0]
        await self._read_tar(path, contents, wanted)
        loaded = []
        for entry in entries:
            config = contents.files[os.path.normpath(entry["Config"])]
            layers = [contents.files[os.path.normpath(layer)] for layer in entry["Layers"]]
            manifest = json.dumps({
                "schemaVersion": 2,
                "mediaType": DOCKER_MANIFEST,
                "config": {"mediaType": DOCKER_CONFIG, "size": config[1], "digest": config[0]},
                "layers": [{"mediaType": DOCKER_LAYER_GZIP if magic == b"\x1f\x8b" else DOCKER_LAYER_TAR,
                            "size": size, "digest": digest} for digest, size, magic in layers],
            }, indent=3).encode("utf-8")
            digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
            await self._store_stream(io.BytesIO(manifest), digest, contents)
            media_type, references = describe(manifest, DOCKER_MANIFEST, f"tarball {path}")
            for reference in references:
                await self._index.record_blob(reference.child, reference.size)
            for where, tag in [_tarball_name(path, ref, name) for ref in entry.get("RepoTags") or [None]]:
                await self._index.record_manifest(digest, media_type, len(manifest), where.registry,
                                                  where.repository, references, tag=tag)
                loaded.append(Loaded(_shown(where, tag, digest), digest, 1, len(references)))
        return loaded

    async def import_go_cache(self, directory: str) -> tuple[list[Loaded], list[str]]:
        """Import the Go server's image store (``lts/``, ``img/``, older ``fat/``, and ``blobs/``).

        Every manifest is checked against its digest and every blob as it is
        copied; returns what was imported and the problems found.
        """
        problems: list[str] = []
        found = []
        for folder in ("lts", "img", "fat"):
            top = os.path.join(directory, folder)
            for name in sorted(os.listdir(top)) if os.path.isdir(top) else []:
                try:
                    found.append(_read_go_manifest(os.path.join(top, name)))
                except (LoadError, OCIError, OSError, ValueError, KeyError, TypeError) as e:
                    problems.append(f"{os.path.join(folder, name)}: {getattr(e, 'message', e)}")
        if not found and not problems:
            raise LoadError(f"{directory}: no lts/, img/ or fat/ folder with manifests in it")
        found.sort(key=lambda item: item[2] not in INDEX_TYPES)
        tagged: set[tuple[str, str, str]] = set()
        loaded = []
        for holder, content, media_type, references, where, reference in found:
            digest = "sha256:" + hashlib.sha256(content).hexdigest()
            tag = None if is_digest(reference) else reference
            if tag is not None and (where.registry, where.repository, tag) in tagged:
                tag = None
            elif tag is not None:
                tagged.add((where.registry, where.repository, tag))
            contents = _TarContents()
            await self._store_stream(io.BytesIO(content), digest, contents)
            blobs = 0
            for child in references if media_type in IMAGE_TYPES else []:
                source = os.path.join(directory, "blobs", child.child.partition(":")[2])
                try:
                    with await self._to_thread(open, source, "rb") as f:
                        await self._store_stream(f, child.child, contents)
                    await self._index.record_blob(child.child, contents.present[child.child])
                    blobs += 1
                except FileNotFoundError:
                    problems.append(f"blobs/{child.child.partition(':')[2]}: missing (fetched again on a pull)")
                except LoadError as e:
                    problems.append(f"blobs/{child.child.partition(':')[2]}: {e}")
            await self._index.record_manifest(digest, media_type, len(content), where.registry, where.repository,
                                              references, tag=tag)
            now = utc(time.time())
            created = _go_time(holder.get("created"), now)
            await self._index.set_times(digest, created, _go_time(holder.get("pulled"), created))
            loaded.append(Loaded(str(holder["imageUrl"]), digest, 1, blobs))
        return loaded, problems

class Loader(Importer):
    """Fills one cache from image references (through the pull path) as well as from local content."""

    def __init__(self, cache: Cache, index: Index, store: ContentStore, platform: Platform | None,
                 default_ns: str = DOCKER_HUB,
                 downloading: Callable[[BlobDownload], None] = lambda download: None,
                 to_thread: ToThread = inline) -> None:
        super().__init__(index, store, to_thread)
        self._cache = cache
        self._platform = platform
        self._default_ns = default_ns
        self._downloading = downloading

    async def load_reference(self, text: str) -> Loaded:
        """Pull one image: its index or list, the chosen platforms' manifests, and all their blobs."""
        where, reference = parse_reference(text, self._default_ns)
        record = (await self._cache.manifest(where, reference))[0]
        manifests = [record]
        if record.media_type in INDEX_TYPES:
            entries = [r for r in await self._index.references(record.digest) if r.kind == "manifest"]
            chosen = entries if self._platform is None else [
                e for e in entries if self._platform.matches(e.platform)][:1]
            if not chosen:
                offered = ", ".join(sorted({e.platform or "unknown" for e in entries}))
                raise LoadError(f"{text}: no {self._platform} image (it has {offered})")
            for entry in chosen:
                manifests.append((await self._cache.manifest(where, entry.child))[0])
        blobs = [r.child for m in manifests if m.media_type in IMAGE_TYPES
                 for r in await self._index.references(m.digest)]
        for digest in blobs:
            download = await self._cache.store_blob(where, digest)
            if download is not None:
                self._downloading(download)
                await download.finished.observe()
        return Loaded(text, record.digest, len(manifests), len(set(blobs)))


def _read_go_manifest(path: str) -> tuple[dict[str, Any], bytes, str, list[Any], Upstream, str]:
    """One of the Go server's manifest holder files, verified: (holder, bytes, type, references, where, ref)."""
    with open(path, encoding="utf-8") as f:
        holder = json.load(f)
    if not holder.get("bytes"):
        raise LoadError("no original manifest bytes in the file (written by a Go server before 1.0); "
                        "its digest cannot be verified, so it is fetched again on a pull")
    content = base64.b64decode(holder["bytes"])
    expected = str(holder.get("digest", ""))
    expected = expected if ":" in expected else f"sha256:{expected}"
    actual = "sha256:" + hashlib.sha256(content).hexdigest()
    if actual != expected:
        raise LoadError(f"manifest bytes hash to {actual}, not {expected}")
    declared = holder.get("mediaType")
    media_type, references = describe(content, declared if declared in KNOWN_TYPES else None, path)
    where, reference = parse_reference(str(holder["imageUrl"]), DOCKER_HUB)
    return holder, content, media_type, references, where, reference


def _hash_stream(reader: IO[bytes]) -> tuple[str, int, bytes]:
    """A tarball member's sha256 digest, size and first two bytes (gzip or not)."""
    hasher = hashlib.sha256()
    size = 0
    first = b""
    while chunk := reader.read(_CHUNK):
        first = first or chunk[:2]
        hasher.update(chunk)
        size += len(chunk)
    return "sha256:" + hasher.hexdigest(), size, first


def _tarball_name(path: str, ref: str | None, name: str | None) -> tuple[Upstream, str | None]:
    """The repository and tag of an image in a tarball, from its own name or else ``--name``."""
    if ref and ("/" in ref or ":" in ref):
        where, reference = parse_reference(ref, DOCKER_HUB)
    elif name is not None:
        where, reference = parse_reference(name, DOCKER_HUB)
        reference = check_tag(ref) if ref else reference
    else:
        raise LoadError(f"{path}: the image is named only {ref!r}; give --name REGISTRY/REPOSITORY")
    return where, None if is_digest(reference) else reference


def _shown(where: Upstream, tag: str | None, digest: str) -> str:
    return f"{where}:{tag}" if tag else f"{where}@{digest}"


async def load_files(loader: Loader, paths: list[str], concurrency: int, report: Report,
                     name: str | None = None) -> int:
    """Load image lists and tarballs, ``concurrency`` references at a time; returns how many failed."""
    failures = 0
    semaphore = DeferredSemaphore(concurrency)

    async def one(label: str, work: Callable[[], Coroutine[Any, Any, Loaded | list[Loaded]]]) -> None:
        nonlocal failures
        try:
            result = await work()
        except CancelledError:
            raise
        except (LoadError, OCIError, OSError) as e:
            failures += 1
            report(label, e)
            return
        for item in result if isinstance(result, list) else [result]:
            report(item.name, item)

    for path in paths:
        if tarfile.is_tarfile(path):
            await one(path, partial(loader.load_tarball, path, name))
            continue
        jobs = [semaphore.run(one, text, partial(loader.load_reference, text)) for text in read_image_list(path)]
        # Only cancellation gets out of one(); cancelling the list cancels every job.
        for ok, result in await DeferredList(jobs, consumeErrors=True):
            if not ok:
                result.raiseException()
    return failures


class PreloadService(MultiService):
    """Runs its children (the listeners) from the start, but lets them accept only once the preload is done.

    The ports are bound at the privileged start, as twistd may drop privileges
    right after; a client connecting meanwhile waits in the listen queue, and is
    answered once the preload files are in the cache.
    """

    def __init__(self, loader: Loader, paths: list[str], concurrency: int = 3) -> None:
        super().__init__()
        self._loader = loader
        self._paths = paths
        self._concurrency = concurrency
        self._loading: Deferred[None] | None = None
        self._held: list[Any] | None = []

    def hold(self, endpoint: IStreamServerEndpoint) -> IStreamServerEndpoint:
        """An endpoint whose listening port accepts no connection until the preload is done."""
        return _HeldEndpoint(endpoint, self._listening)

    def _listening(self, port: Any) -> Any:
        if self._held is not None:
            port.stopReading()
            self._held.append(port)
        return port

    def startService(self) -> None:
        super().startService()
        self._loading = Deferred.fromCoroutine(self._preload())

    async def _preload(self) -> None:
        started = time.monotonic()
        try:
            failures = await load_files(self._loader, self._paths, self._concurrency, _log_report)
            log.info("Preloaded {paths} in {seconds:.1f}s ({failures} failed)", paths=", ".join(self._paths),
                     seconds=time.monotonic() - started, failures=failures)
        except CancelledError:
            return
        except Exception:
            log.failure("Preloading failed; serving what is cached")
        held, self._held = self._held or [], None
        for port in held:
            port.startReading()

    def stopService(self) -> Deferred[None]:
        if self._loading is not None and not self._loading.called:
            self._loading.cancel()
        return cast("Deferred[None]", super().stopService())


@implementer(IStreamServerEndpoint)
class _HeldEndpoint:
    """Listens through another endpoint, and hands the port on to be held."""

    def __init__(self, endpoint: IStreamServerEndpoint, listening: Callable[[Any], Any]) -> None:
        self._endpoint = endpoint
        self._listening = listening

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        """Listen, not accepting yet if the preload is still running."""
        return self._endpoint.listen(protocolFactory).addCallback(self._listening)


def _log_report(name: str, result: Loaded | Exception) -> None:
    if isinstance(result, Exception):
        log.error("Could not preload {name}: {why}", name=name, why=str(result))
    else:
        log.info("Preloaded {name} ({digest}: {manifests} manifests, {blobs} blobs)", name=name,
                 digest=result.digest, manifests=result.manifests, blobs=result.blobs)


def make_preload_service(cache: Cache, index: Index, paths: list[str], platform: Platform | None,
                         default_ns: str, reactor: Any) -> PreloadService:
    """A service that loads image lists and tarballs into the cache's store; add the listeners through ``hold``."""
    loader = Loader(cache, index, cache.store, platform, default_ns, to_thread=in_threads(reactor))
    return PreloadService(loader, paths)
