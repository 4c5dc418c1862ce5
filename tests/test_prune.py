"""Listing, pruning and checking the cache on the sqlite index and the content files."""

from __future__ import annotations

import os
import re
import sqlite3
import time


from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from ociregistry.config import PruneSettings, RegistrySettings
from ociregistry.index import Index, utc
from ociregistry.sqlite import SqliteEngine
from ociregistry.manifests import describe
from ociregistry.prune import Criteria, check, criteria_for, make_prune_service, parse_cutoff, prune
from ociregistry.store import BlobStore
from ociregistry.metrics import Metrics
from ociregistry.tap import ServerConfig, make_site, open_cache
from tests.fakes import OCI_INDEX, OCI_MANIFEST, Behaviour, FakeRegistry, Image, connection_of, digest_of, listen, make_image
from tests.test_load import platform_index, run_cli
from tests.test_store import inline

DAY = 86400.0


class CacheContent:
    """A cache on disk filled directly: manifests, tags and blobs with real files."""

    def __init__(self, root: str, clock: Clock) -> None:
        self.root = root
        self.clock = clock
        self.store = BlobStore(root, inline)
        self.store.prepare()
        # The server's index, and its connection answering at once.
        self.server = Index(SqliteEngine(os.path.join(root, "index.db"), clock))
        self.index = connection_of(self.server)

    def put(self, content: bytes) -> str:
        """Store a file and return its digest."""
        writer = self.store.begin(digest_of(content))
        writer.write(content)
        Deferred.fromCoroutine(writer.commit())
        return digest_of(content)

    def manifest(self, content: bytes, media_type: str, repository: str, tag: str | None = None) -> str:
        """Store and record a manifest."""
        digest = self.put(content)
        _, references = describe(content, media_type, "test")
        self.index.record_manifest(digest, media_type, len(content), "quay.io", repository, references, tag=tag)
        return digest

    def image(self, image: Image, repository: str, tag: str | None = None) -> str:
        """Store and record a single-platform image with its blobs."""
        for content in image.blobs.values():
            self.index.record_blob(self.put(content), len(content))
        return self.manifest(image.manifest, OCI_MANIFEST, repository, tag)

    def multi(self, images: list[Image], repository: str, tag: str) -> str:
        """Store and record an index of images (each with its blobs)."""
        for image in images:
            self.image(image, repository)
        index = platform_index([(image, {"os": "linux", "architecture": arch})
                                for image, arch in zip(images, ["amd64", "arm64"])])
        return self.manifest(index, OCI_INDEX, repository, tag)

    def files(self) -> set[str]:
        """The digests of every file under blobs/."""
        found: set[str] = set()
        for directory, _, names in os.walk(os.path.join(self.root, "blobs")):
            found.update(f"{os.path.basename(os.path.dirname(directory))}:{name}" for name in names)
        return found

    def dump(self) -> list[str]:
        """The whole database as SQL, to compare before and after."""
        return list(sqlite3.connect(os.path.join(self.root, "index.db")).iterdump())


class PruneTests(SynchronousTestCase):
    """Three images: a multi-arch index and two single images sharing a layer."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.cache = CacheContent(self.mktemp(), self.clock)
        self.addCleanup(self.cache.index.close)
        self.shared = b"shared base layer" * 100
        self.web = make_image(self.shared, b"web app", config=b'{"os":"linux","app":"web"}')
        self.worker = make_image(self.shared, b"worker app", config=b'{"os":"linux","app":"worker"}')
        self.amd = make_image(b"amd only", config=b'{"os":"linux","architecture":"amd64"}')
        self.arm = make_image(b"arm only", config=b'{"os":"linux","architecture":"arm64"}')
        self.multi = self.cache.multi([self.amd, self.arm], "tools/multi", "v1")
        self.clock.advance(DAY)
        self.cache.image(self.web, "team/web", "1.0")
        self.clock.advance(DAY)
        self.cache.image(self.worker, "team/worker", "2.0")
        self.clock.advance(3600)
        self.cache.server.record_pull(self.web.digest)
        self.successResultOf(self.cache.server.flush_pulls())

    def references(self) -> list[str]:
        return [image.reference for image in self.cache.index.cached_images()]

    def test_cached_images(self) -> None:
        """One row per tag with the time of the last pull of any of its manifests and its size on disk."""
        images = {image.reference: image for image in self.cache.index.cached_images()}
        self.assertEqual(sorted(images), ["quay.io/team/web:1.0", "quay.io/team/worker:2.0", "quay.io/tools/multi:v1"])
        web = images["quay.io/team/web:1.0"]
        self.assertEqual(web.size, len(self.web.manifest) + sum(map(len, self.web.blobs.values())))
        self.assertEqual(web.pulled, utc(1_700_000_000 + 2 * DAY + 3600))
        self.assertEqual(web.created, utc(1_700_000_000 + DAY))
        every = self.cache.index.cached_images(every_manifest=True)
        self.assertEqual(len(every), 5)
        self.assertIn(f"quay.io/tools/multi@{self.amd.digest}", [i.reference for i in every])

    def test_prune_pattern_keeps_shared_layer(self) -> None:
        """Pruning one image removes its manifest and own blobs; a layer another image uses stays."""
        removal = prune(self.cache.index, self.cache.store, Criteria(patterns=(re.compile("web"),)))
        self.assertEqual([i.reference for i in removal.images], ["quay.io/team/web:1.0"])
        self.assertEqual({d for d, _ in removal.blobs}, {digest_of(b"web app"), digest_of(self.web.config)})
        self.assertIn(digest_of(self.shared), self.cache.files())
        self.assertNotIn(digest_of(b"web app"), self.cache.files())
        self.assertNotIn(self.web.digest, self.cache.files())
        removal = prune(self.cache.index, self.cache.store, Criteria(patterns=(re.compile("worker"),)))
        self.assertIn(digest_of(self.shared), {d for d, _ in removal.blobs})
        self.assertNotIn(digest_of(self.shared), self.cache.files())

    def test_prune_index_takes_platforms(self) -> None:
        """Removing a tagged index removes its platform manifests and their blobs."""
        removal = prune(self.cache.index, self.cache.store, Criteria(patterns=(re.compile(r"multi:v1$"),)))
        self.assertEqual({d for d, _ in removal.manifests}, {self.multi, self.amd.digest, self.arm.digest})
        self.assertEqual(self.references(), ["quay.io/team/web:1.0", "quay.io/team/worker:2.0"])
        self.assertEqual(self.cache.files() & (set(self.amd.blobs) | set(self.arm.blobs)), set())

    def test_second_tag_keeps_manifest(self) -> None:
        """Untagging one of two tags of a manifest keeps the manifest and its blobs."""
        self.cache.index.record_manifest(self.web.digest, OCI_MANIFEST, len(self.web.manifest), "quay.io",
                                         "team/web", [], tag="latest")
        removal = prune(self.cache.index, self.cache.store, Criteria(patterns=(re.compile(":1.0$"),)))
        self.assertEqual((len(removal.images), removal.manifests, removal.blobs), (1, (), ()))
        self.assertIn(self.web.digest, self.cache.files())

    def test_prune_by_age(self) -> None:
        """created-before and accessed-before compare with the stored UTC times."""
        now = self.clock.seconds()
        created = Criteria(created_before=parse_cutoff("13h", now))
        self.assertEqual([i.reference for i in prune(self.cache.index, self.cache.store, created, True).images],
                         ["quay.io/tools/multi:v1", "quay.io/team/web:1.0"])
        accessed = Criteria(accessed_before=parse_cutoff("30m", now))
        self.assertEqual([i.reference for i in prune(self.cache.index, self.cache.store, accessed).images],
                         ["quay.io/tools/multi:v1", "quay.io/team/worker:2.0"])
        self.assertEqual(self.references(), ["quay.io/team/web:1.0"])

    def test_max_size_evicts_least_recently_pulled(self) -> None:
        """--max-size removes the least recently pulled images until the cache fits."""
        web = next(i for i in self.cache.index.cached_images() if "web" in i.reference)
        limit = web.size + 10
        removal = prune(self.cache.index, self.cache.store, Criteria(max_size=limit))
        self.assertEqual([i.reference for i in removal.images], ["quay.io/tools/multi:v1", "quay.io/team/worker:2.0"])
        self.assertLessEqual(self.cache.index.cache_size(), limit)
        self.assertEqual(self.references(), ["quay.io/team/web:1.0"])
        self.assertEqual(prune(self.cache.index, self.cache.store, Criteria(max_size=limit)).images, ())

    def test_dry_run_changes_nothing_and_says_exactly_what(self) -> None:
        """A dry run leaves database and files as they were and reports what the real run then removes."""
        before, files = self.cache.dump(), self.cache.files()
        criteria = Criteria(max_size=1)
        dry = prune(self.cache.index, self.cache.store, criteria, dry_run=True)
        self.assertEqual((self.cache.dump(), self.cache.files()), (before, files))
        self.assertEqual(len(dry.images), 3)
        self.assertEqual(prune(self.cache.index, self.cache.store, criteria), dry)
        self.assertEqual(self.cache.files(), set())

    def test_batches_remove_the_same(self) -> None:
        """Committing image by image removes exactly what one transaction would."""
        chosen = Criteria(max_size=1).select(self.cache.index.cached_images())
        with self.cache.index.trial() as trial:
            whole = trial.remove_images(chosen, fit=1)
        with self.cache.index.trial() as trial:
            self.assertEqual(trial.remove_images(chosen, fit=1, batch=1), whole)
        self.assertEqual(len(whole.images), 3)

    def test_count_limits(self) -> None:
        """count removes at most that many images, least recently pulled first."""
        removal = prune(self.cache.index, self.cache.store, Criteria(max_size=0, count=1))
        self.assertEqual([i.reference for i in removal.images], ["quay.io/tools/multi:v1"])

    def test_criteria_for_settings(self) -> None:
        """pruneConfig types become criteria; a missing duration or expression is an error."""
        now = self.clock.seconds()
        self.assertEqual(criteria_for(PruneSettings(type="accessed", duration=DAY), now),
                         Criteria(accessed_before=utc(now - DAY)))
        self.assertEqual(criteria_for(PruneSettings(type="size", max_size=5, count=2), now),
                         Criteria(max_size=5, count=2))
        self.assertEqual(criteria_for(PruneSettings(type="pattern", expr="a,b"), now).patterns,
                         (re.compile("a"), re.compile("b")))
        for settings in (PruneSettings(type="created"), PruneSettings(type="pattern"), PruneSettings(type="size")):
            self.assertRaises(ValueError, criteria_for, settings, now)

    def test_parse_cutoff(self) -> None:
        """Dates are local time unless they carry a zone; durations count back from now."""
        self.assertEqual(parse_cutoff("2024-03-01T10:00:00Z", 0), "2024-03-01T10:00:00Z")
        self.assertEqual(parse_cutoff("2024-03-01T12:00:00+02:00", 0), "2024-03-01T10:00:00Z")
        self.assertEqual(parse_cutoff("30d", 40 * DAY), utc(10 * DAY))
        self.assertRaises(ValueError, parse_cutoff, "last tuesday", 0)

    def test_background_pruning(self) -> None:
        """The timer prunes each pass, logs what went, and survives a failing pass."""
        settings = PruneSettings(enabled=True, type="accessed", duration=DAY, frequency=3600, dry_run=False)
        service = make_prune_service(settings, self.cache.server, self.cache.root, self.clock)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(self.references(), ["quay.io/team/web:1.0", "quay.io/team/worker:2.0"])
        self.cache.index._db.execute("DROP VIEW blobs_unreferenced")
        self.clock.advance(3600)
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)
        self.cache.index._db.execute("CREATE VIEW blobs_unreferenced AS SELECT digest, size FROM blob_refcounts"
                                     " WHERE refcount = 0")
        self.clock.advance(DAY)
        self.assertEqual(self.references(), [])

    def test_read_only_index(self) -> None:
        """A read-only index answers questions and refuses to write."""
        reader = SqliteEngine(os.path.join(self.cache.root, "index.db"), self.clock, read_only=True).connect()
        self.addCleanup(reader.close)
        self.assertEqual(len(reader.cached_images()), 3)
        self.assertRaises(sqlite3.OperationalError, reader.record_blob, "sha256:" + "0" * 64, 1)


class CheckTests(SynchronousTestCase):
    """check compares every file with its digest and the index with the files."""

    def test_corrupt_missing_and_stray(self) -> None:
        """A corrupt blob, a missing manifest file and an unindexed file are found, then repaired."""
        clock = Clock()
        cache = CacheContent(self.mktemp(), clock)
        self.addCleanup(cache.index.close)
        image = make_image(b"layer one" * 100, b"layer two")
        cache.image(image, "app", "v1")
        self.assertEqual(check(cache.index, cache.store), [])
        layer = digest_of(b"layer two")
        with open(cache.store.path_for(layer), "r+b") as f:
            f.write(b"LAYER")
        os.unlink(cache.store.path_for(image.digest))
        stray = cache.put(b"nobody's blob")
        self.assertEqual(check(cache.index, cache.store)[2:], [], "a fresh file may be a download being recorded")
        hour_ago = time.time() - 3600
        os.utime(cache.store.path_for(stray), (hour_ago, hour_ago))
        problems = {(p.digest, p.kind): p.what for p in check(cache.index, cache.store)}
        self.assertEqual(set(problems), {(layer, "blob"), (image.digest, "manifest"), (stray, "file")})
        self.assertIn("hashes to", problems[(layer, "blob")])
        self.assertEqual(problems[(image.digest, "manifest")], "missing")
        self.assertEqual(len(check(cache.index, cache.store, repair=True)), 3)
        self.assertEqual(check(cache.index, cache.store), [])
        self.assertIsNone(cache.index.blob_size(layer))
        self.assertIsNone(cache.index.manifest(image.digest))
        self.assertEqual(cache.files(), {digest_of(b"layer one" * 100), digest_of(image.config)})
        self.assertIsNotNone(cache.index.blob_size(digest_of(image.config)))


class ServingTests(TestCase):
    """The command prunes and repairs the cache of a server that is serving (in this process)."""

    async def start(self) -> None:
        self.upstream = FakeRegistry()
        port, listening = await listen(self.upstream)
        self.addCleanup(listening.stopListening)
        registry = f"127.0.0.1:{port}"
        self.image_path = os.path.abspath(self.mktemp())
        config = ServerConfig(image_path=self.image_path, listen=(), default_ns=registry,
                              registries=(RegistrySettings(name=registry, scheme="http"),),
                              pull_timeout=10.0, max_manifest_size=8 << 20)
        metrics = Metrics()
        self.cache, self.index, _ = open_cache(config, reactor, metrics)
        self.addCleanup(lambda: Deferred.fromCoroutine(self.cache.close()))
        port, ours = await listen(make_site(self.cache, config, metrics)[0])
        self.addCleanup(ours.stopListening)
        self.base = f"http://127.0.0.1:{port}"
        pool = HTTPConnectionPool(reactor)
        pool.maxPersistentPerHost = 20
        self.addCleanup(pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=pool))

    async def pull(self, repository: str, image: Image) -> int:
        """Pull an image by tag and check every byte; returns the bytes received."""
        response = await self.http.get(f"{self.base}/v2/{repository}/manifests/latest")
        body = await response.content()
        self.assertEqual((response.code, digest_of(body)), (200, image.digest))
        received = 0
        for digest, content in image.blobs.items():
            response = await self.http.get(f"{self.base}/v2/{repository}/blobs/{digest}")
            body = await response.content()
            self.assertEqual((response.code, len(body), digest_of(body)), (200, len(content), digest))
            received += len(body)
        return received

    async def test_prune_while_ten_clients_pull(self) -> None:
        """Pruning an image again and again while 10 clients pull it and others: every byte is right."""
        await self.start()
        images = {name: make_image(os.urandom(2 << 20), os.urandom(1 << 20), config=name.encode())
                  for name in ("victim", "keep/one", "keep/two")}
        for name, image in images.items():
            self.upstream.add_image(name, "latest", image)
        for digest in images["victim"].blobs:
            self.upstream.behaviour[digest] = Behaviour(chunk=256 * 1024, delay=0.002)
        for name, image in images.items():
            await self.pull(name, image)
        prunes: list[str] = []

        async def pruner() -> None:
            for _ in range(4):
                result = await run_cli("prune", "--image-path", self.image_path, "--pattern", "victim")
                self.assertEqual(result.returncode, 0, result.stderr)
                prunes.append(result.stdout)

        async def client(number: int) -> int:
            received = rounds = 0
            while len(prunes) < 4 or rounds < 2:
                for name in ("victim", ["keep/one", "keep/two"][number % 2]):
                    received += await self.pull(name, images[name])
                rounds += 1
            return received

        pruning = Deferred.fromCoroutine(pruner())
        received = await gatherResults([Deferred.fromCoroutine(client(n)) for n in range(10)])
        await pruning
        self.assertGreater(sum(received), 100 << 20)
        self.assertGreaterEqual(sum("removed image" in output for output in prunes), 2)
        self.assertGreaterEqual(self.upstream.count("GET", "/victim/manifests/"), 2)
        for name in ("keep/one", "keep/two"):
            for digest in images[name].blobs:
                self.assertEqual(self.upstream.count("GET", f"/blobs/{digest}"), 1)
        self.assertEqual(os.listdir(os.path.join(self.image_path, "tmp")), [])

    async def test_repaired_blob_is_fetched_again(self) -> None:
        """check finds a corrupted blob file, --repair removes it, and the next pull fetches it again."""
        await self.start()
        image = make_image(os.urandom(100_000), b"small layer")
        self.upstream.add_image("app", "latest", image)
        await self.pull("app", image)
        digest = digest_of(image.layers[0])
        path = BlobStore(self.image_path, inline).path_for(digest)
        with open(path, "r+b") as f:
            f.write(b"rot")
        found = await run_cli("check", "--image-path", self.image_path)
        self.assertEqual(found.returncode, 1)
        self.assertIn(f"blob {digest}: content hashes to", found.stdout)
        repaired = await run_cli("check", "--image-path", self.image_path, "--repair")
        self.assertEqual(repaired.returncode, 0, repaired.stderr)
        self.assertFalse(os.path.exists(path))
        await self.pull("app", image)
        self.assertEqual(self.upstream.count("GET", f"/blobs/{digest}"), 2)
