"""Load: 200 concurrent connections mixing warm manifests, warm blobs and cold blobs.

Set OCIREGISTRY_LONG=1 to run for 60 s instead of 10 s.
"""

from __future__ import annotations

import collections
import json
import os
import random
import time
from dataclasses import dataclass

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from tests.realparts import (
    LONG_RUN,
    MANIFEST_ACCEPT,
    MIB,
    ImageSet,
    WebClient,
    build_oci_index,
    cache_problems,
    digest_of,
    peak_rss_bytes,
    push,
    start_registry,
    start_server,
    upload_blob,
)
from tests.test_integration import Puller

log = Logger()

DURATION = 60.0 if LONG_RUN else 10.0
CONNECTIONS = 200
COLD_BLOBS = 4000 if LONG_RUN else 600
# How many clients ask for each cold blob at about the same time.
COLD_CLIENTS_EACH = 4
RSS_LIMIT = 160 * MIB


@dataclass(frozen=True)
class Expected:
    """A request and what must come back: status, body, Content-Length and digest header."""

    method: str
    path: str
    status: int
    body: bytes
    length: int
    digest: str
    range: str | None = None


class LoadTests(TestCase):
    """A mixed load against the twistd process in front of a real upstream."""

    timeout = 900 if LONG_RUN else 180

    async def test_mixed_load(self) -> None:
        """200 connections for 10 s (60 s long): no wrong body, no 5xx, no failed request, bounded RSS."""
        base = os.path.abspath(self.mktemp())
        image = build_oci_index(os.path.join(base, "image"), layer_sizes=(MIB, 64 * 1024),
                                large_layer=8 * MIB)
        registry = await start_registry(os.path.join(base, "registry"), test=self)
        await push(image, registry, "load/app", "v1")
        web = WebClient()
        self.addCleanup(web.close)
        cold: list[bytes] = [os.urandom(random.randint(16 * 1024, 64 * 1024)) for _ in range(COLD_BLOBS)]
        for start in range(0, COLD_BLOBS, 25):
            await DeferredList([Deferred.fromCoroutine(upload_blob(registry, "load/cold", content, web))
                                for content in cold[start:start + 25]], fireOnOneErrback=True)
        config = os.path.join(base, "config.json")
        with open(config, "w") as f:
            json.dump({"registries": [{"name": registry.host, "scheme": "http"}]}, f)
        server = await start_server(os.path.join(base, "cache"), test=self, args=("--config-file", config))
        await Puller(self, server).pull(registry.host, "load/app", "v1")
        warm = warm_requests(image)

        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = CONNECTIONS
        self.addCleanup(pool.closeCachedConnections)
        client = HTTPClient(Agent(reactor, pool=pool))
        outcomes: collections.Counter[str] = collections.Counter()
        failures: list[str] = []
        handed_out = [0]
        deadline = time.monotonic() + DURATION

        def next_cold() -> Expected:
            content = cold[(handed_out[0] // COLD_CLIENTS_EACH) % COLD_BLOBS]
            handed_out[0] += 1
            digest = digest_of(content)
            return Expected("GET", f"/v2/load/cold/blobs/{digest}", 200, content, len(content), digest)

        async def one(expected: Expected) -> str:
            headers: dict[str | bytes, str | bytes] = {"Accept": MANIFEST_ACCEPT}
            if expected.range:
                headers["Range"] = expected.range
            response = await client.request(expected.method, server.url + expected.path,
                                            params={"ns": registry.host}, headers=headers)
            body = await response.content()
            if response.code >= 500:
                return "5xx"
            # Twisted's client takes Content-Length out of a GET's headers into `length`.
            length = (response.length if expected.method == "GET"
                      else int(response.headers.getRawHeaders("content-length", ["-1"])[0]))
            got = (response.code, body, length, response.headers.getRawHeaders("docker-content-digest"))
            return "ok" if got == (expected.status, expected.body, expected.length, [expected.digest]) else "wrong"

        async def connection(number: int) -> None:
            rng = random.Random(number)
            while time.monotonic() < deadline:
                expected = next_cold() if rng.random() < 0.35 else rng.choice(warm)
                why = ""
                try:
                    outcome = await one(expected)
                except Exception as e:
                    outcome, why = "failed", repr(e)
                outcomes[outcome] += 1
                if outcome != "ok" and len(failures) < 10:
                    failures.append(f"{outcome}: {expected.method} {expected.path} {expected.range} {why}")

        await DeferredList([Deferred.fromCoroutine(connection(n)) for n in range(CONNECTIONS)])
        peak = peak_rss_bytes(server.pid or 0)
        total = sum(outcomes.values())
        log.info("Load: {total} requests in {seconds} s ({rate:.0f}/s) over {connections} connections, "
                 "{cold} distinct cold blobs, outcomes {outcomes}, peak RSS {rss:.1f} MiB",
                 total=total, seconds=DURATION, rate=total / DURATION, connections=CONNECTIONS,
                 cold=min(COLD_BLOBS, handed_out[0] // COLD_CLIENTS_EACH), outcomes=dict(outcomes),
                 rss=peak / MIB)
        self.assertEqual(dict(outcomes), {"ok": total}, failures)
        self.assertLess(peak, RSS_LIMIT, f"peak RSS {peak / MIB:.1f} MiB")
        self.assertEqual(cache_problems(server.image_path), [])


def warm_requests(image: ImageSet) -> list[Expected]:
    """Manifests by tag (GET and HEAD) and by digest, whole blobs and ranges of blobs."""
    index = image.manifest_bytes(image.digest)
    tag = "/v2/load/app/manifests/v1"
    requests = [Expected("GET", tag, 200, index, len(index), image.digest),
                Expected("HEAD", tag, 200, b"", len(index), image.digest)]
    for digest in [image.digest, *image.manifests.values()]:
        content = image.manifest_bytes(digest)
        requests.append(Expected("GET", f"/v2/load/app/manifests/{digest}", 200, content, len(content), digest))
    rng = random.Random(0)
    for digest in image.blobs:
        with open(image.blob_path(digest), "rb") as f:
            content = f.read()
        path = f"/v2/load/app/blobs/{digest}"
        requests.append(Expected("GET", path, 200, content, len(content), digest))
        first = rng.randrange(len(content))
        last = rng.randrange(first, len(content))
        part = content[first:last + 1]
        requests.append(Expected("GET", path, 206, part, len(part), digest, f"bytes={first}-{last}"))
    return requests
