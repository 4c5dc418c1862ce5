"""A prune that runs while a pull waits on upstream never turns the pull into an error."""

from __future__ import annotations

import hashlib
import re
import time
from collections import Counter

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from ociregistry.cache import Manifest
from ociregistry.grammar import Upstream as Where
from ociregistry.prune import Criteria, prune
from tests.fakes import OCI_MANIFEST, make_image
from tests.realparts import WebClient, WorkspaceTestCase, start_registry, start_server, upload_blob, upload_manifest
from tests.test_downloads import A, CacheOverStubs
from tests.test_load import run_cli

log = Logger()


class PruneWhilePullingTests(CacheOverStubs):
    """The upstream's answer is held back while a prune removes what the pull had found cached."""

    def pull_tag(self) -> Deferred[Manifest]:
        return Deferred.fromCoroutine(self.cache.manifest(Where(A, "app"), "v1"))

    def prune_app(self) -> None:
        removal = prune(self.index, self.store, Criteria(patterns=(re.compile("/app:"),)))
        self.assertEqual([image.reference for image in removal.images], [f"{A}/app:v1"])

    def test_prune_while_tag_is_confirmed(self) -> None:
        """The manifest goes while upstream confirms the tag: it is fetched again, served, and the tag cached."""
        image = make_image(b"layer")
        self.a.add_image("app", "v1", image)
        self.successResultOf(self.pull_tag())
        self.clock.advance(301)
        self.a.holding = True
        pulling = self.pull_tag()
        self.prune_app()
        self.assertIsNone(self.index.manifest(image.digest))
        self.a.release()
        self.settle()
        found = self.successResultOf(pulling)
        self.assertEqual((found.record.digest, found.content, found.source), (image.digest, image.manifest, "miss"))
        record = self.index.manifest_for_tag(A, "app", "v1")
        self.assertEqual(record.digest if record else None, image.digest)
        self.assertEqual(self.store.read(image.digest), image.manifest)
        self.assertEqual((self.a.count("HEAD", "/manifests/v1"), self.a.count("GET", "/manifests/")), (2, 2))

    def test_prune_while_moved_tag_is_fetched(self) -> None:
        """A tag moved upstream, pruned while the new manifest is fetched: the new manifest is served and cached."""
        old, new = make_image(b"old"), make_image(b"new")
        self.a.add_image("app", "v1", old)
        self.successResultOf(self.pull_tag())
        self.clock.advance(301)
        self.a.add_image("app", "v1", new)
        self.a.holding = True
        pulling = self.pull_tag()
        self.a.release()
        self.a.holding = True
        self.settle()
        self.prune_app()
        self.a.release()
        self.settle()
        found = self.successResultOf(pulling)
        self.assertEqual((found.record.digest, found.content), (new.digest, new.manifest))
        record = self.index.manifest_for_tag(A, "app", "v1")
        self.assertEqual(record.digest if record else None, new.digest)


class PruneBesideServerTests(WorkspaceTestCase):
    """The prune command runs again and again while clients pull an image of a real registry."""

    async def test_no_server_errors(self) -> None:
        """Clients pulling a tag (rechecked upstream on every pull) and its blobs while prunes run never get a 5xx."""
        registry = await start_registry(self.path("registry"), test=self)
        image = make_image(b"layer " * 1000, b"another layer")
        for blob in image.blobs.values():
            await upload_blob(registry, "team/app", blob)
        await upload_manifest(registry, "team/app", "v1", OCI_MANIFEST, image.manifest)
        server = await start_server(self.path("cache"), test=self, args=(
            "--config-file", self.config([{"name": registry.host, "scheme": "http"}]), "--tag-ttl", "0"))
        web = WebClient()
        self.addCleanup(web.close)
        statuses: Counter[int] = Counter()
        wrong: list[str] = []
        deadline = time.monotonic() + 45.0
        prunes = 0

        async def get(path: str) -> bytes:
            response = await web.client.get(f"{server.url}/v2/team/app/{path}", params={"ns": registry.host})
            body: bytes = await response.content()
            statuses[response.code] += 1
            return body

        async def pull() -> None:
            while prunes < 12 and time.monotonic() < deadline:
                if hashlib.sha256(await get("manifests/v1")).hexdigest() != image.digest[7:]:
                    wrong.append("manifest")
                for digest, content in image.blobs.items():
                    if await get(f"blobs/{digest}") != content:
                        wrong.append(digest)

        async def prune_again_and_again() -> None:
            nonlocal prunes
            while prunes < 12 and time.monotonic() < deadline:
                result = await run_cli("prune", "--image-path", server.image_path, "--pattern", "team/app")
                self.assertEqual(result.returncode, 0, result.stderr)
                prunes += 1

        await gatherResults([Deferred.fromCoroutine(pull()) for _ in range(4)]
                            + [Deferred.fromCoroutine(prune_again_and_again())], consumeErrors=True)
        log.info("{prunes} prunes beside {pulls} pulls: statuses {statuses}", prunes=prunes,
                 pulls=sum(statuses.values()), statuses=dict(statuses))
        self.assertEqual(prunes, 12)
        self.assertEqual(({code: n for code, n in statuses.items() if code >= 500}, wrong), ({}, []))
        self.assertGreater(statuses[200], 100)
