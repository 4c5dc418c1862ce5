"""Crash safety in shared storage: the replica downloading a blob is killed with SIGKILL at random moments.

Each kill is followed by a restart and a look at the real bucket and database: every object
hashes to its key, every index row names its object, no multipart upload is left, and the
client's next try succeeds.  OCIREGISTRY_KILLS=N sets the number of kills (scripts/soak
replicas runs many); OCIREGISTRY_SEED=N repeats a run.
"""

from __future__ import annotations

import os
import random
import time

import psycopg
import treq
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool

from ociregistry.s3 import key_for
from tests.realparts import LONG_RUN, MIB, digest_of, free_port, sleep, start_registry, start_relay, upload_blob
from tests.services import ReplicaTestCase, shared_cache_problems, until

log = Logger()

KILLS = int(os.environ.get("OCIREGISTRY_KILLS") or (25 if LONG_RUN else 4))
BLOB = 48 * MIB
# The upstream's bandwidth: a cold pull of the blob takes about 1.5 s.
RATE = 32 * MIB
# Kills are spread over the download and, past its last byte, over this many seconds of verifying and completing.
AFTER = 0.6


async def fetch(url: str) -> tuple[int, bytes]:
    """One GET on a connection of its own: the status and the whole body (an aborted body raises)."""
    response = await treq.get(url, pool=HTTPConnectionPool(reactor, persistent=False))
    return response.code, await treq.content(response)


class ReplicaCrashTests(ReplicaTestCase):
    """kill -9 of the replica that downloads a 48 MiB layer, on a real bucket and database."""

    timeout = 90 + 25 * KILLS

    async def test_kill_the_downloading_replica(self) -> None:
        """After each kill and restart the shared cache checks clean and the client's next try verifies."""
        registry = await start_registry(self.path("registry"), test=self, address="127.0.28.1",
                                        port=free_port("127.0.28.1"))
        relay = await start_relay(registry, test=self, rate=RATE, address="127.0.28.2")
        registries = [{"name": relay.host, "scheme": "http"}]
        a = await self.replica("a", registries, abandonUploadsAfter="1s")
        b = await self.replica("b", registries, abandonUploadsAfter="1s")
        seed = int(os.environ.get("OCIREGISTRY_SEED") or time.time_ns() % 1_000_000)
        rng = random.Random(seed)
        print(f"\nseed {seed}, {KILLS} kills of the replica downloading a {BLOB // MIB} MiB blob")
        cycles: list[float] = []
        left_behind = completed = 0
        for kill in range(KILLS):
            began = time.monotonic()
            blob = rng.randbytes(BLOB)
            digest = await upload_blob(registry, "crash/app", blob)
            path = f"/v2/crash/app/blobs/{digest}?ns={relay.host}"
            moment = rng.uniform(0.0, 1.0 + AFTER)
            start = relay.bytes_down
            pulling = Deferred.fromCoroutine(fetch(a.url + path))
            deadline = time.monotonic() + 30
            while relay.bytes_down < start + min(moment, 1.0) * BLOB and time.monotonic() < deadline:
                await sleep(0.005)
            if moment > 1.0:
                await sleep(moment - 1.0)
            await a.kill()
            killed = time.monotonic()
            where = (f"seed {seed}, kill {kill}: at {min(moment, 1.0):.0%} of the blob's bytes"
                     + (f" and {moment - 1.0:.2f} s after the last" if moment > 1.0 else ""))
            whole = False
            try:
                code, body = await pulling
            except CancelledError:
                raise
            except Exception:
                pass
            else:
                # A body that arrived whole is the right one.
                self.assertEqual((code, digest_of(body)), (200, digest), where)
                completed += 1
                whole = True
            left_behind += len(await self.s3.uploads())
            await sleep(max(0.0, killed + 1.1 - time.monotonic()))   # past abandonUploadsAfter
            await a.start()
            self.assertEqual(await until(self.s3.uploads, lambda found: found == [], limit=10), [], where)
            self.assertEqual(await shared_cache_problems(self.s3, self.database), [], where)

            retry = rng.choice([a, b])
            code, body = await fetch(retry.url + path)
            self.assertEqual((code, digest_of(body)), (200, digest), f"{where}: the next try")
            self.assertEqual(await until(lambda: self.s3.stat(key_for(digest))), BLOB, where)
            self.assertEqual(await shared_cache_problems(self.s3, self.database), [], where)
            self.assertEqual(await self.s3.uploads(), [], where)
            # Make room in Ceph's memory store for the next blob.
            await self.s3.delete(key_for(digest))
            with psycopg.connect(self.database) as db:
                db.execute("DELETE FROM blobs WHERE digest = %s", (digest,))
            cycles.append(time.monotonic() - began)
            log.info("{where}: the client's body was {whole}; the next try through {retry} verified",
                     where=where, whole="whole" if whole else "cut off", retry=retry.url)
        for server in (a, b):
            self.assertNotIn("Traceback", server.log_text())
        print(f"{KILLS} kills: {completed} pulls had finished before the kill, {left_behind} multipart "
              f"uploads were left and swept at the next start, no problem found; "
              f"{sum(cycles) / len(cycles):.1f} s per kill cycle (max {max(cycles):.1f} s)")
