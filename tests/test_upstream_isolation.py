"""With real parts: a client of one upstream gets a digest at that upstream's speed, whatever another does."""

from __future__ import annotations

import hashlib
import os
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from tests.fakes import Behaviour, FakeRegistry, listen
from tests.realparts import MIB, WebClient, WorkspaceTestCase, sleep, start_registry, start_server, upload_blob

log = Logger()

# The window in which the client of the real registry must get the whole blob.
WINDOW = 10.0


class TricklingUpstreamTests(WorkspaceTestCase):
    """A real docker-registry (A) and a fake upstream (B) that trickles the same blob."""

    async def test_real_upstream_at_full_speed_while_other_trickles(self) -> None:
        """While B trickles a digest to one client, a client of A gets the whole blob from A at once."""
        registry = await start_registry(self.path("registry"), test=self)
        content = os.urandom(8 * MIB)
        digest = await upload_blob(registry, "team/app", content)
        trickler = FakeRegistry()
        trickler.blobs[digest] = content
        # 64 KiB/s: slow, but steady.
        trickler.behaviour[digest] = Behaviour(chunk=16 * 1024, delay=0.25)
        port, listening = await listen(trickler)
        self.addCleanup(listening.stopListening)
        slow = f"127.0.0.1:{port}"
        server = await start_server(self.path("cache"), test=self, args=(
            "--config-file", self.config([{"name": registry.host, "scheme": "http"},
                                          {"name": slow, "scheme": "http"}]),
            "--shutdown-grace", "2"))
        web = WebClient()
        self.addCleanup(web.close)
        url = f"{server.url}/v2/team/app/blobs/{digest}"
        received = {"A": 0, "B": 0}
        hashes = {"A": hashlib.sha256(), "B": hashlib.sha256()}

        async def pull(name: str, ns: str) -> None:
            response = await web.client.get(url, params={"ns": ns}, unbuffered=True)
            self.assertEqual(response.code, 200)

            def collect(data: bytes) -> None:
                received[name] += len(data)
                hashes[name].update(data)

            await response.collect(collect)

        from_b = Deferred.fromCoroutine(pull("B", slow))
        from_b.addErrback(lambda _: None)
        deadline = time.monotonic() + WINDOW
        while received["B"] == 0 and time.monotonic() < deadline:
            await sleep(0.05)
        self.assertGreater(received["B"], 0, "B's download has begun")
        started = time.monotonic()
        from_a = Deferred.fromCoroutine(pull("A", registry.host))
        from_a.addTimeout(WINDOW, reactor)
        try:
            await from_a
        except Exception:
            pass
        elapsed = time.monotonic() - started
        log.info("Client of A: {a} of {size} bytes in {elapsed:.2f} s; client of B: {b} bytes",
                 a=received["A"], size=len(content), elapsed=elapsed, b=received["B"])
        self.assertEqual(received["A"], len(content),
                         f"client of A got {received['A']} of {len(content)} bytes in {elapsed:.1f} s")
        self.assertEqual("sha256:" + hashes["A"].hexdigest(), digest)
        self.assertLess(received["B"], len(content) // 2, "B is still trickling")
        self.assertEqual(trickler.count("GET", digest), 1)
        await registry.settled()
        self.assertEqual(registry.count_requests("GET", f"/blobs/{digest}", 200), 1)
        # A's verified copy is on disk: a second client of A is served from the cache.
        await pull("A", registry.host)
        await registry.settled()
        self.assertEqual(registry.count_requests("GET", f"/blobs/{digest}", 200), 1)
        await server.stop()
        await from_b
        await listening.stopListening()
        self.assertEqual(os.listdir(os.path.join(server.image_path, "tmp")), [])
