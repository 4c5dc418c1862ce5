"""The in-memory cache of manifest contents."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from ociregistry import cache
from ociregistry.cache import Cache, ContentCache, Marks
from ociregistry.grammar import Upstream as Where
from tests.fakes import make_image
from tests.test_downloads import A, CacheOverStubs


class ContentCacheTests(SynchronousTestCase):
    """Least recently used contents go first once the byte budget is exceeded."""

    def test_budget(self) -> None:
        """Adding past the budget drops the least recently used; a read makes an entry recent."""
        cache = ContentCache(10)
        cache.put("a", b"1234")
        cache.put("b", b"1234")
        self.assertEqual(cache.get("a"), b"1234")
        cache.put("c", b"1234")
        self.assertIsNone(cache.get("b"))
        self.assertEqual((cache.get("a"), cache.get("c")), (b"1234", b"1234"))

    def test_too_large(self) -> None:
        """A content larger than the whole budget is not held."""
        cache = ContentCache(3)
        cache.put("a", b"1234")
        self.assertIsNone(cache.get("a"))


class MarksTests(SynchronousTestCase):
    """Marks keyed by client input stay bounded: the least recently marked go first."""

    def test_bounded(self) -> None:
        """Past the limit the oldest mark is forgotten; marking again makes a key recent."""
        marks: Marks[str] = Marks(2)
        marks.add("a")
        marks.add("b")
        marks.add("a")
        marks.add("c")
        self.assertEqual(("a" in marks, "b" in marks, "c" in marks, len(marks)), (True, False, True, 2))
        marks.discard("a")
        marks.discard("never")
        self.assertEqual(("a" in marks, len(marks)), (False, 1))


class StaleMarksTests(CacheOverStubs):
    """The tags a cache marks as served stale are bounded."""

    def test_stale_marks_bounded(self) -> None:
        """Many tags served stale keep at most the limit of marks."""
        self.patch(cache, "_STALE_MARKS", 2)
        self.cache = Cache(self.server_index, self.store, self.upstream, self.downloads, self.clock)  # type: ignore[arg-type]
        tags = [f"v{n}" for n in range(5)]
        for tag in tags:
            self.a.add_image("app", tag, make_image(tag.encode()))
            self.successResultOf(Deferred.fromCoroutine(self.cache.manifest(Where(A, "app"), tag)))
        self.clock.advance(301)
        self.a.manifest_status = 500
        for tag in tags:
            found = self.successResultOf(Deferred.fromCoroutine(self.cache.manifest(Where(A, "app"), tag)))
            self.assertEqual(found.source, "stale")
        self.assertEqual(len(self.cache._stale), 2)
