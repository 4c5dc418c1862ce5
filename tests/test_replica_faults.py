"""A replica's bucket or database failing for a while during cold pulls, and coming back.

The bucket is reached through a relay that answers 500 or 503, resets connections (also
midway through a part's body) or passes bytes on late; the database through a relay that is
stopped (connections refused, open ones cut) and started again.  Clients get a JSON 503 or an
aborted connection, never a wrong byte or a 500; nothing half-written becomes visible; and the
replica recovers by itself.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import psycopg
import treq
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.web.client import HTTPConnectionPool

from ociregistry.s3 import key_for
from tests.fakes import FakeRegistry, listen, make_image
from tests.postgres_service import cluster
from tests.realparts import (
    MIB,
    FaultyRelay,
    Server,
    ThrottledRelay,
    digest_of,
    free_port,
    log_settled,
    sleep,
    start_registry,
    start_relay,
    upload_blob,
)
from tests.services import ReplicaTestCase, shared_cache_problems, until

BLOB = 40 * MIB
# The upstream's bandwidth: the cold pull takes over a second, so a fault lands midway.
RATE = 32 * MIB


async def attempt(url: str) -> tuple[int, bytes] | None:
    """One GET on a connection of its own: the status and whole body, or None when the connection was aborted."""
    try:
        response = await treq.get(url, pool=HTTPConnectionPool(reactor, persistent=False))
        return response.code, await treq.content(response)
    except CancelledError:
        raise
    except Exception:
        return None


def _json_error(test: ReplicaTestCase, answer: tuple[int, bytes] | None, digest: str) -> None:
    """An answer during a fault: an aborted connection, a JSON 503, or (when it came whole) the right bytes."""
    if answer is None:
        return
    code, body = answer
    if code == 200:
        test.assertEqual(digest_of(body), digest)
        return
    test.assertEqual(code, 503, body[:500])
    test.assertEqual(json.loads(body)["errors"][0]["code"], "UNAVAILABLE")


class BucketFaultTests(ReplicaTestCase):
    """A replica whose S3 store fails midway through the upload of a cold 40 MiB blob, then recovers."""

    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]
        await super().setUp()
        self.registry = await start_registry(self.path("registry"), test=self, address="127.0.28.11",
                                             port=free_port("127.0.28.11"))
        self.upstream = await start_relay(self.registry, test=self, rate=RATE, address="127.0.28.12")
        self.relay = FaultyRelay(("127.0.0.1", int(self.rgw.endpoint.rpartition(":")[2])))
        self.addCleanup(self.relay.stop)
        await self.relay.start("127.0.28.13", free_port("127.0.28.13"))
        self.replica_a = await self.replica("a", [{"name": self.upstream.host, "scheme": "http"}],
                                            endpoint=f"http://{self.relay.host}", abandonUploadsAfter="1s")

    async def _health(self, server: Server) -> tuple[int, Any]:
        answer = await attempt(f"{server.url}/health")
        assert answer is not None
        return answer[0], json.loads(answer[1])

    async def _fault_midway(self, fault: str) -> None:
        """A cold pull with the fault set once 10 MiB went to the store, a second pull while it lasts, and
        a third once /health says the bucket fails; then the store recovers and the next pull verifies.
        The seconds the recovered pull took, and the answers during the fault."""
        a = self.replica_a
        blob = os.urandom(BLOB)
        digest = await upload_blob(self.registry, "fault/app", blob)
        url = f"{a.url}/v2/fault/app/blobs/{digest}?ns={self.upstream.host}"
        began = self.relay.bytes_up
        first = Deferred.fromCoroutine(attempt(url))
        deadline = time.monotonic() + 20
        while self.relay.bytes_up < began + 10 * MIB and time.monotonic() < deadline:
            await sleep(0.01)
        self.relay.fault = fault
        answers = [await first]
        answers.append(await attempt(url))
        for answer in answers:
            _json_error(self, answer, digest)
        # Nothing half-written is visible while the store fails (asked of the store itself, past the relay).
        self.assertIsNone(await self.s3.stat(key_for(digest)))
        with psycopg.connect(self.database) as db:
            self.assertEqual(db.execute("SELECT count(*) FROM blobs WHERE digest = %s", (digest,)).fetchone(), (0,))
        # Once /health has found the bucket failing, a cold pull is refused before its first byte.
        code, health = await until(lambda: self._health(a), lambda found: found[0] == 503, limit=15)
        self.assertEqual(code, 503)
        self.assertIn(f"bucket {self.bucket} at http://{self.relay.host}: unreachable", health["problem"])
        refused = await attempt(url)
        self.assertIsNotNone(refused)
        assert refused is not None
        self.assertEqual(refused[0], 503, refused[1][:500])
        _json_error(self, refused, digest)
        answers.append(refused)
        self.relay.fault = None
        self.assertEqual(await until(lambda: self._health(a), lambda found: found[0] == 200), (200, {"status": "ok"}))
        recovered = time.monotonic()
        answer = await attempt(url)
        took = time.monotonic() - recovered
        self.assertIsNotNone(answer)
        assert answer is not None
        self.assertEqual((answer[0], digest_of(answer[1])), (200, digest))
        self.assertEqual(await until(lambda: self.s3.stat(key_for(digest))), BLOB)
        self.assertEqual(await shared_cache_problems(self.s3, self.database), [])
        # An upload whose abort the failing store refused is the sweep's, at the next start.
        await log_settled(a.log_path)
        left = len(await self.s3.uploads())
        await a.stop()
        await a.start()
        self.assertEqual(await until(self.s3.uploads, lambda found: found == [], limit=10), [])
        self._no_500(a)
        print(f"\nstore fault {fault}: answers during it {[a if a is None else a[0] for a in answers]} "
              f"(None: aborted); {left} uploads left until the next start; the pull after it {took:.1f} s")

    def _no_500(self, server: Server) -> None:
        text = server.log_text()
        self.assertNotIn("Traceback", text)
        self.assertEqual([line for line in text.splitlines() if '" 500 ' in line], [])

    async def test_503_midway(self) -> None:
        """A store answering 503 for a while: aborted or JSON 503 answers, nothing visible, then a verified pull."""
        await self._fault_midway("503")
        self.assertIn("503 SlowDown", self.replica_a.log_text())

    async def test_500_midway(self) -> None:
        """A store answering 500 for a while: aborted or JSON 503 answers, nothing visible, then a verified pull."""
        await self._fault_midway("500")
        self.assertIn("500 InternalError", self.replica_a.log_text())

    async def test_reset_midway(self) -> None:
        """A store resetting connections (a part's body cut midway): the same as a failing store."""
        await self._fault_midway("reset")

    async def test_slow_store(self) -> None:
        """A store answering every request a second late: the pull is slower and verifies; nothing fails."""
        a = self.replica_a
        blob = os.urandom(BLOB)
        digest = await upload_blob(self.registry, "fault/app", blob)
        url = f"{a.url}/v2/fault/app/blobs/{digest}?ns={self.upstream.host}"
        self.relay.fault = "slow"
        began = time.monotonic()
        answer = await attempt(url)
        took = time.monotonic() - began
        self.relay.fault = None
        self.assertIsNotNone(answer)
        assert answer is not None
        self.assertEqual((answer[0], digest_of(answer[1])), (200, digest))
        self.assertEqual(await until(lambda: self.s3.stat(key_for(digest))), BLOB)
        self.assertEqual(await shared_cache_problems(self.s3, self.database), [])
        self.assertEqual(await self.s3.uploads(), [])
        self._no_500(a)
        print(f"\nstore 1 s late on every request: the cold {BLOB // MIB} MiB pull took {took:.1f} s")


class DatabaseFaultTests(ReplicaTestCase):
    """A replica whose PostgreSQL refuses connections while it runs, then comes back."""

    timeout = 120

    async def test_database_refusing_connections(self) -> None:
        """Uncached manifests are a JSON 503 and /health names the index; both recover by themselves."""
        fake = FakeRegistry()
        images = [make_image(os.urandom(3000)) for _ in range(2)]
        fake.add_image("app", "v1", images[0])
        fake.add_image("app", "v2", images[1])
        port, listening = await listen(fake)
        self.addCleanup(listening.stopListening)
        relay = ThrottledRelay(("127.0.0.1", cluster().port), None)
        self.addCleanup(relay.stop)
        relay_port = free_port("127.0.28.21")
        await relay.start("127.0.28.21", relay_port)
        database = self.database.replace(f"127.0.0.1:{cluster().port}", f"127.0.28.21:{relay_port}")
        a = await self.replica("a", [{"name": f"127.0.0.1:{port}", "scheme": "http"}], database=database)
        base = f"{a.url}/v2/app/manifests"
        ns = f"?ns=127.0.0.1:{port}"
        self.assertEqual(await attempt(f"{base}/v1{ns}"), (200, images[0].manifest))

        async def health() -> tuple[int, Any]:
            answer = await attempt(f"{a.url}/health")
            assert answer is not None
            return answer[0], json.loads(answer[1])

        await relay.stop()
        answer = await attempt(f"{base}/v2{ns}")
        self.assertIsNotNone(answer)
        assert answer is not None
        self.assertEqual(answer[0], 503, answer[1][:500])
        self.assertEqual(json.loads(answer[1])["errors"][0]["code"], "UNAVAILABLE")
        code, problem = await until(health, lambda found: found[0] == 503)
        self.assertEqual(code, 503)
        self.assertIn("index is not reachable", problem["problem"])

        await relay.start("127.0.28.21", relay_port)
        self.assertEqual(await until(health, lambda found: found[0] == 200), (200, {"status": "ok"}))
        self.assertEqual(await attempt(f"{base}/v2{ns}"), (200, images[1].manifest))
        text = a.log_text()
        self.assertNotIn("Traceback", text)
        self.assertEqual([line for line in text.splitlines() if '" 500 ' in line], [])


class StartFaultTests(ReplicaTestCase):
    """A replica whose bucket is missing at start."""

    async def test_missing_bucket_exits_with_one_line(self) -> None:
        """A replica configured with a bucket that does not exist says so in one line and exits non-zero."""
        self.bucket = "r-missing-" + os.urandom(4).hex()
        line = await self.refused_at_start("missing")
        self.assertIn(f"bucket {self.bucket} at {self.rgw.endpoint}: missing", line)
