"""The pull API end to end in one process: our site in front of a fake upstream."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.trial.unittest import TestCase

from ociregistry.config import RegistrySettings
from ociregistry.tap import ServerConfig, make_site, open_cache
from tests.fakes import OCI_INDEX, Behaviour, FakeRegistry, digest_of, listen, make_image, make_index, wait


class PullTests(TestCase):
    """A real reactor, our site on a loopback port, a fake upstream on another."""

    async def start(self, **config: Any) -> None:
        self.upstream = FakeRegistry()
        upstream_port, listening = await listen(self.upstream)
        self.addCleanup(listening.stopListening)
        self.registry = f"127.0.0.1:{upstream_port}"
        self.image_path = self.mktemp()
        settings = dict(
            image_path=self.image_path,
            listen=(),
            default_ns=self.registry,
            registries=(RegistrySettings(name=self.registry, scheme="http"),),
            pull_timeout=5.0,
            max_manifest_size=8 * 1024 * 1024,
        )
        settings.update(config)
        self.config = ServerConfig(**settings)
        self.cache, self.index, _ = open_cache(self.config, reactor)
        self.addCleanup(lambda: Deferred.fromCoroutine(self.cache.close()))
        port, ours = await listen(make_site(self.cache, self.config).resource)
        self.addCleanup(ours.stopListening)
        self.base = f"http://127.0.0.1:{port}"
        pool = HTTPConnectionPool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        self.client = HTTPClient(Agent(reactor, pool=pool))

    async def get(self, path: str, method: str = "GET", **kwargs: Any) -> tuple[Any, bytes]:
        response = await self.client.request(method, self.base + path, **kwargs)
        return response, await response.content()

    def test_base(self) -> Deferred[None]:
        """GET /v2/ answers 200 with the API version header."""
        async def run() -> None:
            await self.start()
            response, body = await self.get("/v2/")
            self.assertEqual(response.code, 200)
            self.assertEqual(response.headers.getRawHeaders("docker-distribution-api-version"), ["registry/2.0"])
        return Deferred.fromCoroutine(run())

    def test_manifest_and_blobs_cached(self) -> Deferred[None]:
        """A manifest by tag and its blobs are fetched once, then served from cache byte-for-byte."""
        async def run() -> None:
            await self.start()
            image = make_image(b"layer one" * 1000, b"layer two")
            self.upstream.add_image("team/app", "v1.0-RC", image)
            for _ in range(2):
                response, body = await self.get("/v2/team/app/manifests/v1.0-RC")
                self.assertEqual(response.code, 200)
                self.assertEqual(body, image.manifest)
                self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/vnd.oci.image.manifest.v1+json"])
                self.assertEqual(response.headers.getRawHeaders("docker-content-digest"), [image.digest])
            self.assertEqual(self.upstream.count("GET", "/manifests/v1.0-RC"), 1)
            for digest, content in image.blobs.items():
                response, body = await self.get(f"/v2/team/app/blobs/{digest}")
                self.assertEqual((response.code, body), (200, content))
                self.assertEqual(response.headers.getRawHeaders("accept-ranges"), ["bytes"])
            await wait(0.2)
            for digest in image.blobs:
                self.assertEqual(self.upstream.count("GET", f"/blobs/{digest}"), 1)
        return Deferred.fromCoroutine(run())

    def test_head_manifest_has_length(self) -> Deferred[None]:
        """HEAD of a manifest has the true Content-Length and digest, and no body."""
        async def run() -> None:
            await self.start()
            image = make_image(b"x")
            self.upstream.add_image("app", "latest", image)
            response, body = await self.get("/v2/app/manifests/latest", method="HEAD")
            self.assertEqual(response.code, 200)
            self.assertEqual(body, b"")
            self.assertEqual(response.headers.getRawHeaders("content-length"), [str(len(image.manifest))])
            self.assertEqual(response.headers.getRawHeaders("docker-content-digest"), [image.digest])
        return Deferred.fromCoroutine(run())

    def test_index_served_as_is(self) -> Deferred[None]:
        """An index is cached and served with its own media type."""
        async def run() -> None:
            await self.start()
            amd, arm = make_image(b"a"), make_image(b"b")
            index = make_index(amd, arm)
            self.upstream.add_manifest("multi", "1", OCI_INDEX, index)
            response, body = await self.get("/v2/multi/manifests/1")
            self.assertEqual((response.code, body), (200, index))
            self.assertEqual(response.headers.getRawHeaders("content-type"), [OCI_INDEX])
            refs = self.index.references(digest_of(index))
            self.assertEqual(sorted(r.platform for r in refs), ["linux/amd64", "linux/arm64"])
        return Deferred.fromCoroutine(run())

    def test_not_found(self) -> Deferred[None]:
        """Upstream 404s become OCI 404 errors with the right codes."""
        async def run() -> None:
            await self.start()
            response, body = await self.get("/v2/nothing/manifests/latest")
            self.assertEqual(response.code, 404)
            self.assertEqual(json.loads(body)["errors"][0]["code"], "MANIFEST_UNKNOWN")
            response, body = await self.get("/v2/nothing/blobs/sha256:" + "a" * 64)
            self.assertEqual(response.code, 404)
            self.assertEqual(json.loads(body)["errors"][0]["code"], "BLOB_UNKNOWN")
            response, body = await self.get("/v2/nothing/tags/list")
            self.assertEqual(response.code, 404)
            self.assertEqual(json.loads(body)["errors"][0]["code"], "NAME_UNKNOWN")
        return Deferred.fromCoroutine(run())

    def test_coalesced_streaming(self) -> Deferred[None]:
        """Concurrent GETs of one uncached blob cause one upstream GET and all get bytes early."""
        async def run() -> None:
            await self.start()
            content = os.urandom(2 * 1024 * 1024)
            digest = digest_of(content)
            self.upstream.blobs[digest] = content
            self.upstream.behaviour[digest] = Behaviour(chunk=64 * 1024, delay=0.02)
            first_bytes: list[int] = []

            async def pull() -> bytes:
                response = await self.client.get(f"{self.base}/v2/app/blobs/{digest}", unbuffered=True)
                chunks: list[bytes] = []

                def collect(data: bytes) -> None:
                    if not chunks:
                        first_bytes.append(self.cache._downloads.running(digest) is not None)
                    chunks.append(data)

                await treq.collect(response, collect)
                return b"".join(chunks)

            results = await DeferredList([Deferred.fromCoroutine(pull()) for _ in range(10)])
            for ok, body in results:
                self.assertTrue(ok)
                self.assertEqual(hashlib.sha256(body).hexdigest(), digest.split(":")[1])
            self.assertEqual(self.upstream.count("GET", digest), 1)
            self.assertEqual(first_bytes, [True] * 10)
        return Deferred.fromCoroutine(run())

    def test_wrong_bytes_not_cached(self) -> Deferred[None]:
        """Bytes that do not match the digest abort the response, are not cached, and are retried."""
        async def run() -> None:
            await self.start()
            content = os.urandom(300 * 1024)
            digest = digest_of(content)
            self.upstream.blobs[digest] = content
            self.upstream.behaviour[digest] = Behaviour(wrong_bytes=True)
            with self.assertRaises(Exception):
                response = await self.client.get(f"{self.base}/v2/app/blobs/{digest}")
                await response.content()
            self.assertIsNone(self.index.blob_size(digest))
            self.assertEqual(os.listdir(os.path.join(self.image_path, "tmp")), [])
            del self.upstream.behaviour[digest]
            response, body = await self.get(f"/v2/app/blobs/{digest}")
            self.assertEqual((response.code, body), (200, content))
            self.assertEqual(self.upstream.count("GET", digest), 2)
        return Deferred.fromCoroutine(run())

    def test_ranges(self) -> Deferred[None]:
        """The RFC 9110 range table from the spec, on a cached blob."""
        async def run() -> None:
            await self.start()
            content = os.urandom(2048)
            digest = digest_of(content)
            self.upstream.blobs[digest] = content
            await self.get(f"/v2/app/blobs/{digest}")
            cases = [
                ("bytes=500-1499", 206, "bytes 500-1499/2048", content[500:1500]),
                ("bytes=500-", 206, "bytes 500-2047/2048", content[500:]),
                ("bytes=-500", 206, "bytes 1548-2047/2048", content[-500:]),
                ("bytes=2000-5000", 206, "bytes 2000-2047/2048", content[2000:]),
                ("bytes=500-0", 416, "bytes */2048", None),
                ("bytes=5000-", 416, "bytes */2048", None),
                ("bytes=0-0", 206, "bytes 0-0/2048", content[:1]),
            ]
            for header, status, content_range, expected in cases:
                response, body = await self.get(f"/v2/app/blobs/{digest}", headers={"Range": header})
                self.assertEqual(response.code, status, header)
                self.assertEqual(response.headers.getRawHeaders("content-range"), [content_range], header)
                if expected is not None:
                    self.assertEqual(body, expected, header)
        return Deferred.fromCoroutine(run())
