"""Range headers as the blob endpoint reads them."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from ociregistry.errors import RangeNotSatisfiable
from ociregistry.web import parse_range


class RangeTests(SynchronousTestCase):
    """parse_range: (first, end exclusive), None for the whole blob, RangeNotSatisfiable for a 416."""

    def test_ordinary_ranges(self) -> None:
        """Closed, open and suffix ranges within a 100-byte blob."""
        self.assertEqual(parse_range("bytes=0-9", 100), (0, 10))
        self.assertEqual(parse_range("bytes=90-", 100), (90, 100))
        self.assertEqual(parse_range("bytes=-10", 100), (90, 100))
        self.assertEqual(parse_range("bytes=50-200", 100), (50, 100))
        self.assertIsNone(parse_range("bytes=0-1,5-6", 100))
        self.assertIsInstance(parse_range("bytes=100-", 100), RangeNotSatisfiable)
        self.assertIsInstance(parse_range("bytes=5-4", 100), RangeNotSatisfiable)

    def test_numbers_too_long_to_be_sizes(self) -> None:
        """Positions of thousands of digits are past the end: to the end, the whole suffix, or a 416."""
        huge = "9" * 5000
        self.assertEqual(parse_range(f"bytes=0-{huge}", 100), (0, 100))
        self.assertEqual(parse_range(f"bytes=-{huge}", 100), (0, 100))
        self.assertIsInstance(parse_range(f"bytes={huge}-", 100), RangeNotSatisfiable)
        self.assertIsInstance(parse_range(f"bytes={huge}-{huge}", 100), RangeNotSatisfiable)
        # Leading zeros do not make a number large.
        self.assertEqual(parse_range(f"bytes={'0' * 5000}5-{'0' * 5000}9", 100), (5, 10))
        self.assertEqual(parse_range(f"bytes=0-{'9' * 19}", 100), (0, 100))
