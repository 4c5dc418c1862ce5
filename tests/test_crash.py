"""Crash safety: kill -9 during concurrent cold pulls, restart, and find a sound cache.

Set OCIREGISTRY_LONG=1 for many repetitions, OCIREGISTRY_SEED=N to repeat a run.
"""

from __future__ import annotations

import json
import os
import random
import time

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from tests.realparts import (
    LONG_RUN,
    MIB,
    build_oci_index,
    cache_problems,
    push,
    sleep,
    start_registry,
    start_relay,
    start_server,
)
from tests.test_integration import Puller

log = Logger()

REPETITIONS = 25 if LONG_RUN else 3
CLIENTS = 16
# The upstream's bandwidth: a cold pull of the image below takes about 1.5 s.
RATE = 16 * MIB


class CrashTests(TestCase):
    """The server killed with SIGKILL at random moments of 16 concurrent cold pulls."""

    timeout = 1200 if LONG_RUN else 120

    async def test_kill_during_cold_pulls(self) -> None:
        """After each kill and restart the cache checks clean, tmp/ is empty, and the pulls verify."""
        base = os.path.abspath(self.mktemp())
        image = build_oci_index(os.path.join(base, "image"), layer_sizes=(3 * MIB, MIB, 4096),
                                large_layer=6 * MIB)
        registry = await start_registry(os.path.join(base, "registry"), test=self)
        await push(image, registry, "crash/app", "v1")
        relay = await start_relay(registry, test=self, rate=RATE)
        config = os.path.join(base, "config.json")
        with open(config, "w") as f:
            json.dump({"registries": [{"name": relay.host, "scheme": "http"}]}, f)
        seed = int(os.environ.get("OCIREGISTRY_SEED") or time.time_ns() % 1_000_000)
        rng = random.Random(seed)
        expected = (image.digest, image.manifests, image.blobs)
        for repetition in range(REPETITIONS):
            server = await start_server(os.path.join(base, f"cache-{repetition}"), test=self,
                                        args=("--config-file", config))

            def pulls() -> list[Deferred[tuple[str, dict[str, str], dict[str, int]]]]:
                return [Deferred.fromCoroutine(Puller(self, server).pull(relay.host, "crash/app", "v1"))
                        for _ in range(CLIENTS)]

            # Kill once a random share of the image has come from upstream: anywhere from the
            # first request to the last byte, and so also while blobs are verified and committed.
            share = rng.uniform(0.0, 1.0)
            target = relay.bytes_down + share * sum(image.blobs.values())
            began = time.monotonic()
            interrupted = pulls()
            while relay.bytes_down < target and time.monotonic() - began < 30:
                await sleep(0.005)
            await server.kill()
            where = (f"seed {seed}, repetition {repetition}, killed at {share:.0%} of the image's bytes, "
                     f"after {time.monotonic() - began:.3f} s")
            outcomes = await DeferredList(interrupted, consumeErrors=True)
            await server.start()
            self.assertEqual(cache_problems(server.image_path), [], where)
            for ok, result in await DeferredList(pulls(), consumeErrors=True):
                self.assertTrue(ok, f"{where}: {result}")
                self.assertEqual(result, expected, where)
            self.assertEqual(cache_problems(server.image_path), [], where)
            await server.stop()
            log.info("{where}: {finished} of {clients} pulls had finished before the kill",
                     where=where, finished=sum(ok for ok, _ in outcomes), clients=CLIENTS)
