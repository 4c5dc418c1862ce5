"""Pruning and checking beside a server that keeps fetching and recording: what each must leave alone."""

from __future__ import annotations

import json
import os
import re
import time

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ociregistry.admin import admin_site
from ociregistry.index import IndexConnection
from ociregistry.sqlite import SqliteEngine
from ociregistry.prune import Criteria, check, prune
from ociregistry.store import BlobStore
from tests.fakes import listen, make_image
from tests.realparts import http_request
from tests.test_prune import CacheContent
from tests.test_store import digest_of, inline


def backdate(cache: CacheContent) -> None:
    """Date every file an hour back, as in a cache that has been running a while."""
    hour_ago = time.time() - 3600
    for digest in cache.files():
        os.utime(cache.store.path_for(digest), (hour_ago, hour_ago))


class CheckBesideServerTests(SynchronousTestCase):
    """check run while another connection prunes or records: nothing it explains is a problem."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.cache = CacheContent(self.mktemp(), self.clock)
        self.addCleanup(self.cache.index.close)
        self.images = [make_image(f"layer {n}".encode(), config=f'{{"n":{n}}}'.encode()) for n in range(5)]
        for number, image in enumerate(self.images):
            self.cache.image(image, f"app{number}", "v1")
        backdate(self.cache)
        self.server = SqliteEngine(os.path.join(self.cache.root, "index.db"), self.clock).connect()
        self.addCleanup(self.server.close)

    def during_check(self, action: Callable[[], Any]) -> list[str]:
        """Run check with ``action`` done by the other connection once check has listed the index."""
        done: list[bool] = []

        def progress(line: str) -> None:
            if not done:
                done.append(True)
                action()

        return [f"{p.kind} {p.digest}: {p.what}" for p in check(self.cache.index, self.cache.store, progress=progress)]

    def test_concurrent_prune(self) -> None:
        """Images pruned after check listed them are not reported missing."""
        self.assertEqual(self.during_check(
            lambda: prune(self.server, self.cache.store, Criteria(patterns=(re.compile("app[0-3]"),)))), [])
        self.assertEqual(len(self.cache.index.cached_images()), 1)

    def test_concurrent_download(self) -> None:
        """A blob recorded after check listed the index is not reported as a file no row names."""
        content = b"fetched while checking"

        def fetched() -> None:
            digest = self.cache.put(content)
            self.server.record_blob(digest, len(content))
            hour_ago = time.time() - 3600
            os.utime(self.cache.store.path_for(digest), (hour_ago, hour_ago))

        self.assertEqual(self.during_check(fetched), [])

    def test_real_problems_still_found(self) -> None:
        """A file that went missing with its row still there is reported."""
        os.unlink(self.cache.store.path_for(self.images[0].digest))
        self.assertEqual(self.during_check(lambda: None), [f"manifest {self.images[0].digest}: missing"])


class RaceStore(BlobStore):
    """A store in which, as the prune starts removing files, the server fetches one of them anew."""

    def __init__(self, root: str, server: IndexConnection, content: bytes) -> None:
        super().__init__(root, inline)
        self.server = server
        self.content = content
        self.raced = False

    def remove(self, digest: str, identity: tuple[int, int] | None = None) -> None:
        if not self.raced:
            self.raced = True
            fresh = self.path_for(digest_of(self.content))
            os.unlink(fresh)
            with open(fresh + ".new", "wb") as f:
                f.write(self.content)
            os.replace(fresh + ".new", fresh)
            self.server.record_blob(digest_of(self.content), len(self.content))
        super().remove(digest, identity)


class PruneRaceTests(SynchronousTestCase):
    """Files are removed after the commit: one fetched and recorded anew in between stays."""

    def test_fetched_anew_between_commit_and_unlink(self) -> None:
        """The re-fetched layer keeps its file and row; everything else pruned is gone; no row lacks its file."""
        clock = Clock()
        cache = CacheContent(self.mktemp(), clock)
        self.addCleanup(cache.index.close)
        image = make_image(b"a layer", config=b'{"a":1}')
        cache.image(image, "app", "v1")
        server = SqliteEngine(os.path.join(cache.root, "index.db"), clock).connect()
        self.addCleanup(server.close)
        store = RaceStore(cache.root, server, b"a layer")
        removal = prune(cache.index, store, Criteria(patterns=(re.compile("app"),)))
        self.assertEqual(len(removal.images), 1)
        self.assertTrue(store.raced)
        self.assertEqual(cache.files(), {digest_of(b"a layer")})
        self.assertEqual(cache.index.blob_size(digest_of(b"a layer")), len(b"a layer"))
        self.assertEqual(cache.index.cached_images(), [])


class PruneOnThreadTests(TestCase):
    """The admin API prunes and lists on a thread, with a connection of its own."""

    async def test_admin_prune_on_thread(self) -> None:
        """A prune on a thread removes what it says, and the reactor's index sees it at once."""
        clock = Clock()
        cache = CacheContent(self.mktemp(), clock)
        self.addCleanup(cache.index.close)
        keep = make_image(b"kept layer", config=b'{"keep":1}')
        cache.image(keep, "keep/app", "v1")
        doomed = [make_image(f"layer {n}".encode(), config=f'{{"n":{n}}}'.encode()) for n in range(50)]
        for number, image in enumerate(doomed):
            cache.image(image, f"gone/app{number}", "v1")
        cache.server.record_pull(keep.digest)
        threads: list[int] = []

        def to_thread(function: Callable[..., Any], *args: Any) -> Deferred[Any]:
            def counted() -> object:
                threads.append(1)
                return function(*args)
            return deferToThread(counted)

        site = admin_site(cache.server, cache.root, clock, lambda: None, to_thread=to_thread)
        port, listening = await listen(site.resource)
        self.addCleanup(listening.stopListening)
        base = f"http://127.0.0.1:{port}"
        response, body = await http_request(
            "DELETE", f"{base}/cmd/prune?type=pattern&expr=gone/&dryRun=false&count=-1&format=json")
        document = json.loads(body)
        self.assertEqual(response.code, 200, document)
        self.assertEqual(len(document["images"]), 50)
        self.assertEqual(len(document["blobs"]), 100)
        self.assertEqual(threads, [1])
        self.assertEqual([i.reference for i in cache.index.cached_images()], ["quay.io/keep/app:v1"])
        self.assertEqual(cache.files(), {keep.digest, *keep.blobs})
        self.assertEqual(check(cache.index, cache.store, settle=0.0), [])
        response, body = await http_request("GET", f"{base}/cmd/image/list?format=json")
        self.assertEqual([i["url"] for i in json.loads(body)], ["quay.io/keep/app:v1"])
        self.assertEqual(threads, [1, 1])
