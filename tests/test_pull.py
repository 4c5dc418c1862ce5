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
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase

from ociregistry.config import RegistrySettings
from ociregistry.metrics import Metrics
from ociregistry.tap import ServerConfig, make_site, open_cache
from tests.fakes import OCI_INDEX, Behaviour, FakeRegistry, TokenRealm, connection_of, digest_of, listen, make_image, make_index, wait


class ServerTestCase(TestCase):
    """A real reactor, our site on a loopback port, a fake upstream on another."""

    async def start(self, registry: dict[str, Any] | None = None, **config: Any) -> None:
        self.upstream = FakeRegistry()
        upstream_port, listening = await listen(self.upstream)
        self.addCleanup(listening.stopListening)
        self.registry = f"127.0.0.1:{upstream_port}"
        self.image_path = self.mktemp()
        settings = dict(
            image_path=self.image_path,
            listen=(),
            default_ns=self.registry,
            pull_timeout=5.0,
            max_manifest_size=8 * 1024 * 1024,
        )
        settings.update(config)
        settings["registries"] = (
            RegistrySettings(name=self.registry, scheme="http", **(registry or {})),
            *settings.get("registries", ()),
        )
        self.config = ServerConfig(**settings)
        self.metrics = Metrics()
        self.cache, self.server_index, _ = open_cache(self.config, reactor, self.metrics)
        self.index = connection_of(self.server_index)
        self.addCleanup(lambda: Deferred.fromCoroutine(self.close_cache()))
        site, self.api = make_site(self.cache, self.config, self.metrics)
        port, ours = await listen(site)
        self.addCleanup(ours.stopListening)
        self.base = f"http://127.0.0.1:{port}"
        pool = HTTPConnectionPool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        self.client = HTTPClient(Agent(reactor, pool=pool))

    async def close_cache(self) -> None:
        await self.cache.close()
        # Aborted upstream connections close on the next turn of the reactor.
        await wait(0.01)

    async def get(self, path: str, method: str = "GET", **kwargs: Any) -> tuple[Any, bytes]:
        response = await self.client.request(method, self.base + path, **kwargs)
        return response, await response.content()



class PullTests(ServerTestCase):
    """Pulls of manifests and blobs, cached and coalesced."""

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
            self.assertEqual(self.upstream.count("HEAD", "/manifests/v1.0-RC"), 1)
            self.assertEqual(self.upstream.count("GET", f"/manifests/{image.digest}"), 1)
            self.assertEqual(self.upstream.count("GET", "/manifests/v1.0-RC"), 0)
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
                        first_bytes.append(self.cache._downloads.running(self.registry, digest) is not None)
                    chunks.append(data)

                await treq.collect(response, collect)
                return b"".join(chunks)

            results = await DeferredList([Deferred.fromCoroutine(pull()) for _ in range(20)])
            for ok, body in results:
                self.assertTrue(ok)
                self.assertEqual(hashlib.sha256(body).hexdigest(), digest.split(":")[1])
            self.assertEqual(self.upstream.count("GET", digest), 1)
            self.assertEqual(first_bytes, [True] * 20)
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


class MoreTests(ServerTestCase):
    """Errors, headers, in-flight ranges, upstream selection and authentication."""

    async def test_unsupported_methods(self) -> None:
        """Push, delete and unknown endpoints are JSON errors; HEAD errors have no body."""
        await self.start()
        for method, path in [("PUT", "/v2/app/manifests/v1"), ("DELETE", "/v2/app/blobs/sha256:" + "a" * 64),
                             ("POST", "/v2/app/blobs/uploads/"), ("PATCH", "/v2/app/blobs/uploads/x")]:
            response, body = await self.get(path, method=method)
            self.assertIn(response.code, (404, 405), path)
            self.assertEqual(json.loads(body)["errors"][0]["code"], "UNSUPPORTED")
        response, body = await self.get("/v2/_catalog")
        self.assertEqual(response.code, 404)
        self.assertEqual(json.loads(body)["errors"][0]["code"], "UNSUPPORTED")
        response, body = await self.get("/v2/nothing/manifests/latest", method="HEAD")
        self.assertEqual((response.code, body), (404, b""))
        response, body = await self.get("/elsewhere")
        self.assertEqual(response.code, 404)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])

    async def test_invalid_input_stays_inside(self) -> None:
        """Traversal attempts and malformed names or digests are 4xx and touch nothing outside the cache."""
        await self.start()
        outside = os.path.dirname(os.path.abspath(self.image_path))
        before = sorted(os.listdir(outside))
        paths = [
            "/v2/../../etc/passwd/manifests/latest",
            "/v2/app/blobs/sha256:..%2F..%2F..%2Fetc%2Fpasswd",
            "/v2/a%2F..%2F..%2Fb/manifests/latest",
            "/v2/app/manifests/..%2F..%2Findex.db",
            "/v2/app/blobs/sha256:baddigest",
            "/v2/app/blobs/md5:" + "a" * 32,
            "/v2/UPPER/manifests/latest",
            "/v2/app/manifests/.INVALID_MANIFEST_NAME",
            "/v2/app/manifests/latest?ns=..%2F..",
            "/v2/app/manifests/latest?ns=a%2Fb",
        ]
        for path in paths:
            response, body = await self.get(path)
            self.assertIn(response.code, (400, 404), path)
            self.assertIn(json.loads(body)["errors"][0]["code"],
                          ("NAME_INVALID", "DIGEST_INVALID", "MANIFEST_UNKNOWN", "UNSUPPORTED"), path)
        self.assertEqual(sorted(os.listdir(outside)), before)
        self.assertEqual(self.upstream.requests, [])

    async def test_upstream_unreachable(self) -> None:
        """An upstream that refuses connections is a 502 JSON error, not an empty 500."""
        await self.start(registries=(RegistrySettings(name="127.0.0.1:1", scheme="http"),))
        response, body = await self.get("/v2/app/manifests/latest?ns=127.0.0.1:1")
        self.assertEqual(response.code, 502)
        self.assertEqual(json.loads(body)["errors"][0]["code"], "UNAVAILABLE")
        self.assertIn("127.0.0.1:1", json.loads(body)["errors"][0]["message"])

    async def test_namespace_sources(self) -> None:
        """The ns query, the X-Registry header and the default namespace all reach the upstream."""
        await self.start(default_ns="docker.io")
        image = make_image(b"ns")
        self.upstream.add_image("team/app", "1", image)
        response, _ = await self.get(f"/v2/team/app/manifests/1?ns={self.registry}")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("oci-namespace"), [self.registry])
        response, _ = await self.get("/v2/team/app/manifests/1", headers={"X-Registry": self.registry})
        self.assertEqual(response.code, 200)
        response, body = await self.get(f"/v2/team/app/manifests/{image.digest}")
        self.assertEqual((response.code, body), (200, image.manifest))

    async def test_noncanonical_hosts_refused(self) -> None:
        """Octal and hex spellings of an address are 400 NAME_INVALID in ns=, X-Registry and the path, even with any upstream allowed."""
        await self.start(allow_any_upstream=True)
        for path, headers in [("/v2/app/manifests/1?ns=0127.0.0.1", None),
                              ("/v2/app/manifests/1?ns=0x7f.0.0.1%3A5000", None),
                              ("/v2/app/manifests/1", {"X-Registry": "0177.0.000.1"}),
                              ("/v2/0x7f.1/app/manifests/1", None)]:
            response, body = await self.get(path, headers=headers)
            error = json.loads(body)["errors"][0]
            self.assertEqual((response.code, error["code"]), (400, "NAME_INVALID"), path)
            self.assertIn("not a canonical IPv4 address", error["message"])
        self.assertEqual(self.upstream.requests, [])

    async def test_head_uncached_blob_does_not_download(self) -> None:
        """HEAD of an uncached blob is answered from an upstream HEAD, without a GET."""
        await self.start()
        content = os.urandom(5000)
        digest = digest_of(content)
        self.upstream.blobs[digest] = content
        response, body = await self.get(f"/v2/app/blobs/{digest}", method="HEAD")
        self.assertEqual((response.code, body), (200, b""))
        self.assertEqual(response.headers.getRawHeaders("content-length"), ["5000"])
        self.assertEqual(response.headers.getRawHeaders("docker-content-digest"), [digest])
        self.assertEqual((self.upstream.count("HEAD", digest), self.upstream.count("GET", digest)), (1, 0))

    async def test_range_while_downloading(self) -> None:
        """A range of a blob in flight is answered as soon as those bytes exist."""
        await self.start()
        content = os.urandom(4 * 1024 * 1024)
        digest = digest_of(content)
        self.upstream.blobs[digest] = content
        self.upstream.behaviour[digest] = Behaviour(chunk=64 * 1024, delay=0.03)
        whole = Deferred.fromCoroutine(self.get(f"/v2/app/blobs/{digest}"))
        await wait(0.1)
        response, body = await self.get(f"/v2/app/blobs/{digest}", headers={"Range": "bytes=100-199"})
        self.assertIsNotNone(self.cache._downloads.running(self.registry, digest))
        self.assertEqual((response.code, body), (206, content[100:200]))
        response, body = await whole
        self.assertEqual(body, content)

    async def test_disconnect_does_not_cancel(self) -> None:
        """A client that goes away mid-download does not stop the download for the cache."""
        await self.start()
        content = os.urandom(1024 * 1024)
        digest = digest_of(content)
        self.upstream.blobs[digest] = content
        self.upstream.behaviour[digest] = Behaviour(chunk=32 * 1024, delay=0.01)
        request = self.client.get(f"{self.base}/v2/app/blobs/{digest}", unbuffered=True)
        response = await request
        response.original.deliverBody(_Hangup())
        for _ in range(100):
            if self.index.blob_size(digest) is not None:
                break
            await wait(0.05)
        self.assertEqual(self.index.blob_size(digest), len(content))
        self.assertEqual(self.upstream.count("GET", digest), 1)

    async def test_tags(self) -> None:
        """Tags come from upstream when it answers, and from the index when it does not."""
        await self.start()
        for tag in ("b", "a", "C"):
            self.upstream.add_image("app", tag, make_image(tag.encode()))
        response, body = await self.get("/v2/app/tags/list")
        self.assertEqual(json.loads(body), {"name": "app", "tags": ["C", "a", "b"]})
        await self.get("/v2/app/manifests/a")
        await self.get("/v2/app/manifests/C")
        self.upstream.manifest_status = 500
        self.upstream.manifests.clear()
        self.upstream.blobs.clear()
        self.upstream.behaviour.clear()
        self.upstream.render = lambda request: (request.setResponseCode(503), b"")[1]  # type: ignore[method-assign]
        response, body = await self.get("/v2/app/tags/list?n=1")
        self.assertEqual(json.loads(body), {"name": "app", "tags": ["C"]})
        self.assertEqual(response.headers.getRawHeaders("link"), ['</v2/app/tags/list?n=1&last=C>; rel="next"'])
        response, body = await self.get("/v2/app/tags/list?n=1&last=C")
        self.assertEqual(json.loads(body)["tags"], ["a"])

    async def test_large_manifest(self) -> None:
        """Manifests up to the limit (over 4 MiB) are cached; larger ones are a clean error."""
        await self.start()
        big = make_index(*[make_image(str(i).encode()) for i in range(2)])
        document = json.loads(big)
        document["annotations"] = {"padding": "x" * (5 * 1024 * 1024)}
        big = json.dumps(document).encode()
        self.upstream.add_manifest("app", "big", OCI_INDEX, big)
        response, body = await self.get("/v2/app/manifests/big")
        self.assertEqual((response.code, len(body)), (200, len(big)))
        document["annotations"]["padding"] = "x" * (9 * 1024 * 1024)
        self.upstream.add_manifest("app", "huge", OCI_INDEX, json.dumps(document).encode())
        response, body = await self.get("/v2/app/manifests/huge")
        self.assertEqual(response.code, 502)
        self.assertEqual(json.loads(body)["errors"][0]["code"], "MANIFEST_INVALID")

    async def test_manifest_digest_mismatch(self) -> None:
        """An upstream Docker-Content-Digest that does not match the bytes caches nothing."""
        await self.start()
        image = make_image(b"m")
        self.upstream.add_image("app", "v1", image)
        wrong = "sha256:" + "0" * 64
        self.upstream.manifest_digest_header = wrong
        self.upstream.manifests[("app", wrong)] = self.upstream.manifests[("app", "v1")]
        response, body = await self.get("/v2/app/manifests/v1")
        self.assertEqual(response.code, 502)
        self.assertEqual(json.loads(body)["errors"][0]["code"], "DIGEST_INVALID")
        self.assertIsNone(self.index.manifest(image.digest))
        self.assertIsNone(self.index.manifest(wrong))
        self.upstream.manifest_digest_header = None
        response, body = await self.get("/v2/app/manifests/v1")
        self.assertEqual((response.code, body), (200, image.manifest))

    async def test_basic_auth_and_redirect(self) -> None:
        """Basic credentials go to the upstream after its challenge, never to the host it redirects to."""
        await self.start(registry={"user": "u", "password": "p"})
        storage = FakeRegistry()
        storage_port, listening = await listen(storage)
        self.addCleanup(listening.stopListening)
        self.upstream.auth = ("basic", "u", "p")
        self.upstream.redirect_blobs = f"http://localhost:{storage_port}"
        content = os.urandom(1000)
        digest = digest_of(content)
        self.upstream.blobs[digest] = content
        storage.blobs[digest] = content
        response, body = await self.get(f"/v2/app/blobs/{digest}")
        self.assertEqual((response.code, body), (200, content))
        self.assertTrue(self.upstream.authorizations[-1].startswith("Basic "))
        self.assertEqual(storage.authorizations, [None])

    async def test_bearer_tokens_cached_and_refreshed(self) -> None:
        """A bearer challenge fetches a token per scope with credentials, reuses it, and renews it after expiry."""
        await self.start(registry={"user": "u", "password": "p"})
        realm = TokenRealm(self.upstream, expires_in=1)
        realm_port, listening = await listen(realm)
        self.addCleanup(listening.stopListening)
        self.upstream.auth = ("bearer", f"http://127.0.0.1:{realm_port}/token")
        for tag in ("1", "2"):
            self.upstream.add_image("team/app", tag, make_image(tag.encode()))
        await self.get("/v2/team/app/manifests/1")
        await self.get("/v2/team/app/manifests/2")
        self.assertEqual([scope for scope, _ in realm.requests], ["repository:team/app:pull"])
        self.assertTrue(realm.requests[0][1].startswith("Basic "))
        await wait(1.1)
        self.upstream.valid_tokens.clear()
        response, _ = await self.get("/v2/team/app/tags/list")
        self.assertEqual(response.code, 200)
        self.assertEqual(len(realm.requests), 2)
        self.assertNotIn(None, self.upstream.authorizations[-1:])


class _Hangup(Protocol):
    """Reads the first bytes of a body, then closes the connection."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.stopProducing()
