"""The log observer: levels, human lines with short digests, JSON with whole ones."""

from __future__ import annotations

import json

from twisted.logger import Logger, LogLevel
from twisted.trial.unittest import SynchronousTestCase

from ociregistry.logs import observer

DIGEST = "sha256:" + "ab" * 32


class ObserverTests(SynchronousTestCase):
    """What reaches the log file."""

    def emit(self, json_format: bool, level: str = "info") -> str:
        path = self.mktemp()
        log = Logger(namespace="test", observer=observer(level, path, json_format))
        log.debug("Serving manifest {digest} from cache", digest=DIGEST)
        log.info("Fetched blob {digest}", digest=DIGEST)
        with open(path) as f:
            return f.read()

    def test_text_shortens_digests(self) -> None:
        """Human lines show the first 12 hex digits of a digest; debug events stay out at info."""
        text = self.emit(False)
        self.assertIn("Fetched blob sha256:abababababab...", text)
        self.assertNotIn(DIGEST, text)
        self.assertNotIn("Serving manifest", text)

    def test_json_keeps_digests(self) -> None:
        """JSON events carry the whole digest as a field; debug shows at level debug."""
        lines = [json.loads(line.strip("\x1e")) for line in self.emit(True, "debug").splitlines() if line.strip()]
        self.assertEqual([event["digest"] for event in lines], [DIGEST, DIGEST])
        self.assertEqual([event["log_level"]["name"] for event in lines], [LogLevel.debug.name, LogLevel.info.name])
