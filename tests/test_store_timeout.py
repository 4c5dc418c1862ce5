"""A bucket that takes connections but never answers: clients get their JSON 503 after about the timeout.

``storage.s3.timeout`` (10 s unless set) bounds each request to the store, its retries included,
so that a silent store costs a client the timeout, not a timeout per try; /health names the bucket.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from typing import Any

import yaml
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ociregistry.bucket import BucketStore
from ociregistry.config import ConfigError, S3Config, load_config_file
from ociregistry.errors import answer_for
from ociregistry.s3 import S3Store, StoreFailing, key_for
from ociregistry.store import BlobStore
from ociregistry.tap import Options
from tests.fakes import FakeRegistry, listen, make_image
from tests.realparts import FaultyRelay, free_port
from tests.services import ReplicaTestCase, until
from tests.test_replica_faults import attempt
from tests.test_s3 import FakeS3

CONFIG = """\
index:
  postgresql: "postgresql://ociregistry@db.internal:5432/ociregistry"
storage:
  s3:
    endpoint: http://rgw.internal:7480/
    bucket: ociregistry
    accessKey: OCIREG
    secretKey: s3cret
{timeout}advertiseUrl: http://10.0.0.11:8080
"""


class SilentStoreTests(SynchronousTestCase):
    """The driver and the bucket store against a fake store that never answers, on a fake clock."""

    def setUp(self) -> None:
        self.fake = FakeS3()
        self.clock = Clock()
        self.agent = RequestTraversalAgent(self.fake)
        # As the server makes it: the configuration's timeout, the default retries.
        self.s3 = S3Store(S3Config("http://s3.test", "bucket", "AK", "SK"), reactor=self.clock, agent=self.agent)

    def start(self, work: Any) -> Deferred[Any]:
        started = Deferred.fromCoroutine(work)
        self.agent.flush()
        return started

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.agent.flush()

    def test_silent_store_is_a_503_after_the_default_timeout(self) -> None:
        """A read from a store that never answers fails after 10 s, not before, as a JSON 503."""
        self.fake.always["head"] = "silent"
        reading = self.start(self.s3.stat(key_for("sha256:" + "a" * 64)))
        self.advance(9.9)
        self.assertNoResult(reading)
        self.advance(0.1)
        error = self.failureResultOf(reading, StoreFailing).value
        self.assertIn("no answer in 10 s", error.message)
        answer = answer_for(error)
        self.assertEqual((answer.status, answer.code), (503, "UNAVAILABLE"))

    def test_retries_end_with_the_timeout(self) -> None:
        """A store that fails fast and then goes silent is not tried again once the timeout is used up."""
        self.fake.faults["head"] = ["503", "503"]
        self.fake.always["head"] = "silent"
        reading = self.start(self.s3.stat(key_for("sha256:" + "a" * 64)))
        self.advance(0.2)
        self.advance(0.4)
        self.assertEqual(sum(1 for seen, _ in self.fake.seen if seen == "head"), 3)
        self.advance(9.4 - 0.01)
        self.assertNoResult(reading)
        self.advance(0.01)
        error = self.failureResultOf(reading, StoreFailing).value
        self.assertIn("failed 3 times", error.message)
        self.assertEqual(sum(1 for seen, _ in self.fake.seen if seen == "head"), 3)

    def test_configured_timeout(self) -> None:
        """storage.s3.timeout sets the bound."""
        s3 = S3Store(S3Config("http://s3.test", "bucket", "AK", "SK", timeout=2.0), reactor=self.clock,
                     agent=self.agent)
        self.fake.always["head"] = "silent"
        reading = self.start(s3.stat(key_for("sha256:" + "a" * 64)))
        self.advance(2)
        self.failureResultOf(reading, StoreFailing)

    def test_health_names_the_silent_bucket(self) -> None:
        """The bucket check of /health finds a silent bucket failing after the timeout, and names it."""
        self.fake.always["get"] = "silent"
        root = self.mktemp()
        store = BucketStore(self.s3, BlobStore(root, lambda f, *args: maybeDeferred(f, *args)))
        store.prepare()
        checking = self.start(store.check())
        self.advance(10)
        self.successResultOf(checking)
        self.assertEqual(store.writable(), "bucket bucket at http://s3.test: unreachable (no answer in 10 s, 1 try)")


class TimeoutSettingTests(SynchronousTestCase):
    """storage.s3.timeout in the configuration file, and in --print-config."""

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_default_and_set(self) -> None:
        """Without the key the timeout is 10 s; a duration sets it."""
        default = load_config_file(self.write(CONFIG.format(timeout="")), {})
        assert default.storage is not None
        self.assertEqual(default.storage.s3.timeout, 10.0)
        shorter = load_config_file(self.write(CONFIG.format(timeout="    timeout: 2500ms\n")), {})
        assert shorter.storage is not None
        self.assertEqual(shorter.storage.s3.timeout, 2.5)

    def test_bad_timeouts_refused(self) -> None:
        """A timeout of zero or one that is not a duration is refused, naming the key."""
        for value in ("0s", "soon"):
            with self.assertRaises(ConfigError) as caught:
                load_config_file(self.write(CONFIG.format(timeout=f"    timeout: {value}\n")), {})
            self.assertIn("timeout", str(caught.exception))

    def test_print_config_shows_it(self) -> None:
        """--print-config shows the store's timeout."""
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        with self.assertRaises(SystemExit):
            Options().parseOptions(["--config-file", self.write(CONFIG.format(timeout="    timeout: 4s\n")),
                                    "--print-config"])
        self.assertEqual(yaml.safe_load(out.getvalue())["storage"]["s3"]["timeout"], 4.0)


class SilentBucketTests(ReplicaTestCase):
    """A replica whose bucket goes silent while it runs: cached blobs are a JSON 503 after the timeout."""

    timeout = 90

    async def test_silent_bucket_fails_fast(self) -> None:
        """With timeout 2s, a cached blob from a silent bucket is a JSON 503 in about 2 s; /health names the
        bucket; both recover when it answers again."""
        fake = FakeRegistry()
        image = make_image(os.urandom(100_000))
        fake.add_image("app", "v1", image)
        port, listening = await listen(fake)
        self.addCleanup(listening.stopListening)
        relay = FaultyRelay(("127.0.0.1", int(self.rgw.endpoint.rpartition(":")[2])))
        self.addCleanup(relay.stop)
        await relay.start("127.0.31.21", free_port("127.0.31.21"))
        a = await self.replica("a", [{"name": f"127.0.0.1:{port}", "scheme": "http"}],
                               endpoint=f"http://{relay.host}", timeout="2s")
        layer = image.layers[0]
        digest = next(d for d, b in image.blobs.items() if b == layer)
        url = f"{a.url}/v2/app/blobs/{digest}?ns=127.0.0.1:{port}"
        self.assertEqual(await attempt(url), (200, layer))
        self.assertEqual(await until(lambda: self.s3.stat(key_for(digest))), len(layer))

        relay.fault = "silent"
        began = time.monotonic()
        answer = await attempt(url)
        took = time.monotonic() - began
        assert answer is not None
        self.assertEqual(answer[0], 503, answer[1][:500])
        error = json.loads(answer[1])["errors"][0]
        self.assertEqual(error["code"], "UNAVAILABLE")
        self.assertIn(f"at http://{relay.host}", error["message"])
        self.assertLess(took, 3.5)
        self.assertGreaterEqual(took, 1.9)

        async def health() -> tuple[int, Any]:
            found = await attempt(f"{a.url}/health")
            assert found is not None
            return found[0], json.loads(found[1])

        code, problem = await until(health, lambda found: found[0] == 503, limit=15)
        self.assertEqual(code, 503)
        self.assertIn(f"bucket {self.bucket} at http://{relay.host}: unreachable (no answer in 2 s",
                      problem["problem"])
        relay.fault = None
        self.assertEqual(await until(health, lambda found: found[0] == 200, limit=15), (200, {"status": "ok"}))
        self.assertEqual(await attempt(url), (200, layer))
        self.assertNotIn("Traceback", a.log_text())
        print(f"\nsilent bucket: a cached blob GET was a JSON 503 after {took:.1f} s (timeout 2 s)")
