"""A prune that runs while a pull waits on upstream never turns the pull into an error."""

from __future__ import annotations

import re

from twisted.internet.defer import Deferred

from ociregistry.cache import Manifest
from ociregistry.grammar import Upstream as Where
from ociregistry.prune import Criteria, prune
from tests.fakes import make_image
from tests.test_downloads import A, CacheOverStubs


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
