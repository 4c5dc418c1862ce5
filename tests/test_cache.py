"""The in-memory cache of manifest contents."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from ociregistry.cache import ContentCache


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
