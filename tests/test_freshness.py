"""Tag freshness, offline and air-gapped behaviour, upstream faults and the allow-list."""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHostnameResolver, IHostResolution
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from ociregistry.allowlist import Allowlist
from ociregistry.config import RegistrySettings
from ociregistry.errors import OCIError
from ociregistry.upstream import Upstream

from tests.fakes import OCI_INDEX, Behaviour, digest_of, make_image, make_index, wait
from tests.test_pull import ServerTestCase

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


class _Counting(Factory):
    """Counts connection attempts to a port that must never be contacted."""

    def __init__(self) -> None:
        self.connections = 0

    def buildProtocol(self, addr: Any) -> Protocol:
        self.connections += 1
        return Protocol()


class FreshnessTests(ServerTestCase):
    """Cached tags are rechecked with one HEAD per interval and served stale when the upstream fails."""

    def capture_log(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    async def digest_of_tag(self, path: str, method: str = "GET", **headers: str) -> str:
        response, _ = await self.get(path, method=method, headers=headers)
        self.assertEqual(response.code, 200, path)
        return response.headers.getRawHeaders("docker-content-digest")[0]

    async def test_tag_moves_after_interval(self) -> None:
        """A moved tag is served old before the interval and new after it, with one HEAD per check."""
        await self.start(tag_ttl=2)
        old, new = make_image(b"old"), make_image(b"new")
        self.upstream.add_image("app", "v1", old)
        self.assertEqual(await self.digest_of_tag("/v2/app/manifests/v1"), old.digest)
        self.upstream.add_image("app", "v1", new)
        self.assertEqual(await self.digest_of_tag("/v2/app/manifests/v1"), old.digest)
        self.assertEqual(self.upstream.count("HEAD", "/manifests/v1"), 1)
        # The index keeps whole seconds.
        await wait(2.2)
        self.assertEqual(await self.digest_of_tag("/v2/app/manifests/v1", "HEAD"), new.digest)
        self.assertEqual(self.upstream.count("HEAD", "/manifests/v1"), 2)
        self.assertEqual(self.upstream.count("GET", "/manifests/v1"), 0)
        self.assertIsNotNone(self.index.manifest(old.digest))

    async def test_head_costs_one_upstream_head(self) -> None:
        """Rechecking an unchanged tag by HEAD costs exactly one upstream HEAD and no GET."""
        await self.start(tag_ttl=0)
        image = make_image(b"same")
        self.upstream.add_image("app", "v1", image)
        await self.get("/v2/app/manifests/v1")
        before = list(self.upstream.requests)
        self.assertEqual(await self.digest_of_tag("/v2/app/manifests/v1", "HEAD"), image.digest)
        manifests = [r for r in self.upstream.requests[len(before):] if "/manifests/" in r[1]]
        self.assertEqual(manifests, [("HEAD", "/v2/app/manifests/v1")])

    async def test_stale_served_and_logged_once(self) -> None:
        """With the upstream failing, the cached tag is served and the fact logged once per tag."""
        await self.start(tag_ttl=0)
        image = make_image(b"cached")
        self.upstream.add_image("app", "v1", image)
        await self.get("/v2/app/manifests/v1")
        events = self.capture_log()
        for status in (503, 429, 500):
            self.upstream.next_statuses = [status] * 3
            self.assertEqual(await self.digest_of_tag("/v2/app/manifests/v1"), image.digest)
        stale = [e for e in events if "Serving cached" in e.get("log_format", "")]
        self.assertEqual(len(stale), 1)
        self.assertEqual(await self.digest_of_tag(f"/v2/app/manifests/{image.digest}"), image.digest)

    async def test_always_pull_latest(self) -> None:
        """With always_pull_latest, 'latest' is rechecked on every request; other tags keep their interval."""
        await self.start(always_pull_latest=True)
        self.upstream.add_image("app", "latest", make_image(b"l"))
        self.upstream.add_image("app", "v1", make_image(b"v"))
        for _ in range(3):
            await self.get("/v2/app/manifests/latest")
            await self.get("/v2/app/manifests/v1")
        self.assertEqual(self.upstream.count("HEAD", "/manifests/latest"), 3)
        self.assertEqual(self.upstream.count("HEAD", "/manifests/v1"), 1)

    async def test_docker_accept_keeps_index(self) -> None:
        """A client accepting only a Docker manifest does not replace the cached index of a tag."""
        await self.start(tag_ttl=0)
        index = make_index(make_image(b"a"), make_image(b"b"))
        self.upstream.add_manifest("app", "v1", OCI_INDEX, index)
        await self.get("/v2/app/manifests/v1")
        digest = await self.digest_of_tag("/v2/app/manifests/v1", Accept=DOCKER_MANIFEST)
        self.assertEqual(digest, digest_of(index))
        record = self.index.manifest_for_tag(self.registry, "app", "v1")
        assert record is not None
        self.assertEqual(record.media_type, OCI_INDEX)

    async def test_air_gapped(self) -> None:
        """Air-gapped: cached images serve, nothing else does, and the upstream is never contacted."""
        await self.start(air_gapped=True)
        self.upstream.add_image("app", "v1", make_image(b"x"))
        for path in ["/v2/app/manifests/v1", "/v2/app/blobs/sha256:" + "a" * 64, "/v2/app/tags/list"]:
            response, body = await self.get(path)
            self.assertEqual(response.code, 404, path)
            self.assertIn("air-gapped", json.loads(body)["errors"][0]["message"])
        self.assertEqual(self.upstream.requests, [])


class FaultTests(ServerTestCase):
    """A misbehaving upstream leads to clean errors or clean retries, never to wrong bytes cached."""

    def assert_nothing_partial(self) -> None:
        self.assertEqual(os.listdir(os.path.join(self.image_path, "tmp")), [])

    async def test_stall_mid_body(self) -> None:
        """A body that stalls past the idle timeout is abandoned; the next request starts afresh."""
        await self.start(idle_timeout=0.3)
        content = os.urandom(256 * 1024)
        digest = digest_of(content)
        self.upstream.blobs[digest] = content
        self.upstream.behaviour[digest] = Behaviour(chunk=64 * 1024, delay=30)
        with self.assertRaises(Exception):
            await self.get(f"/v2/app/blobs/{digest}")
        self.assertIsNone(self.index.blob_size(digest))
        self.assert_nothing_partial()
        del self.upstream.behaviour[digest]
        response, body = await self.get(f"/v2/app/blobs/{digest}")
        self.assertEqual((response.code, body), (200, content))

    async def test_reset_mid_body(self) -> None:
        """A connection reset mid-body aborts the client and caches nothing."""
        await self.start()
        content = os.urandom(256 * 1024)
        digest = digest_of(content)
        self.upstream.blobs[digest] = content
        self.upstream.behaviour[digest] = Behaviour(chunk=16 * 1024, drop_after=100 * 1024)
        with self.assertRaises(Exception):
            await self.get(f"/v2/app/blobs/{digest}")
        self.assertIsNone(self.index.blob_size(digest))
        self.assert_nothing_partial()

    async def test_server_error_then_success(self) -> None:
        """A 500 followed by success is retried transparently."""
        await self.start()
        image = make_image(b"retry")
        self.upstream.add_image("app", "v1", image)
        self.upstream.next_statuses = [500]
        response, body = await self.get("/v2/app/manifests/v1")
        self.assertEqual((response.code, body), (200, image.manifest))

    async def test_rate_limited(self) -> None:
        """A 429 with nothing cached reaches the client as TOOMANYREQUESTS with Retry-After."""
        await self.start()
        self.upstream.next_statuses = [429]
        response, body = await self.get("/v2/app/manifests/v1")
        self.assertEqual(response.code, 429)
        self.assertEqual(json.loads(body)["errors"][0]["code"], "TOOMANYREQUESTS")
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["7"])

    async def test_html_instead_of_manifest(self) -> None:
        """An HTML page where a manifest should be is MANIFEST_INVALID and nothing is cached."""
        await self.start()
        self.upstream.add_manifest("app", "v1", "text/html", b"<html>login here</html>")
        response, body = await self.get("/v2/app/manifests/v1")
        self.assertEqual(response.code, 502)
        self.assertEqual(json.loads(body)["errors"][0]["code"], "MANIFEST_INVALID")
        self.assertIsNone(self.index.manifest_for_tag(self.registry, "app", "v1"))

    async def test_client_authorization_not_forwarded(self) -> None:
        """The client's own Authorization header never reaches the upstream."""
        await self.start()
        self.upstream.add_image("app", "v1", make_image(b"a"))
        await self.get("/v2/app/manifests/v1", headers={"Authorization": "Basic c2VjcmV0OnNlY3JldA=="})
        self.assertEqual(set(self.upstream.authorizations), {None})


class AllowlistTests(ServerTestCase):
    """Clients cannot make the server connect to private, loopback or link-local addresses."""

    async def counting_port(self) -> tuple[_Counting, int]:
        factory = _Counting()
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        return factory, port.getHost().port

    async def test_private_hosts_refused(self) -> None:
        """ns=, in-path hosts and X-Registry naming internal addresses get DENIED without a connection."""
        await self.start()
        counter, port = await self.counting_port()
        attempts = [
            (f"/v2/app/manifests/v1?ns=127.0.0.1:{port}", {}),
            (f"/v2/app/manifests/v1?ns=localhost:{port}", {}),
            ("/v2/app/manifests/v1?ns=169.254.169.254", {}),
            ("/v2/app/manifests/v1?ns=127.0.0.1:22", {}),
            ("/v2/10.1.2.3/app/manifests/v1", {}),
            ("/v2/192.168.1.1/app/blobs/sha256:" + "a" * 64, {}),
            ("/v2/app/manifests/v1", {"X-Registry": f"127.0.0.1:{port}"}),
            ("/v2/app/tags/list", {"X-Registry": "[::1]:" + str(port)}),
        ]
        for path, headers in attempts:
            response, body = await self.get(path, headers=headers)
            self.assertEqual(response.code, 403, path)
            self.assertEqual(json.loads(body)["errors"][0]["code"], "DENIED", path)
        self.assertEqual(counter.connections, 0)



class AllowlistUnitTests(SynchronousTestCase):
    """The allow-list's decisions, with a fake resolver."""

    def check(self, netloc: str, via: str | None = None, **options: Any) -> OCIError | None:
        addresses = {"internal.example": ["10.0.0.7"], "mixed.example": ["93.184.216.34", "127.0.0.1"],
                     "public.example": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]}
        allowlist = Allowlist(Clock(), lambda host: succeed(addresses[host]), ["127.0.0.1:5000"], **options)
        result = Deferred.fromCoroutine(allowlist.check(netloc, via))
        if result.called and isinstance(getattr(result, "result", None), Failure):
            return self.failureResultOf(result, OCIError).value
        self.successResultOf(result)
        return None

    def test_default(self) -> None:
        """Public names pass; private, loopback, link-local and names resolving to them do not."""
        self.assertIsNone(self.check("public.example"))
        self.assertIsNone(self.check("127.0.0.1:5000"))
        self.assertIsNone(self.check("anything.example", via="127.0.0.1:5000"))
        for netloc in ["internal.example", "mixed.example", "127.0.0.1:22", "169.254.169.254",
                       "[::1]:80", "[fe80::1]", "[::ffff:127.0.0.1]", "0.0.0.0", "100.64.0.1"]:
            error = self.check(netloc)
            assert error is not None, netloc
            self.assertEqual((error.status, error.code), (403, "DENIED"), netloc)

    def test_patterns(self) -> None:
        """With allowUpstreams, only matching hosts (and configured registries) pass, private or not."""
        self.assertIsNone(self.check("internal.example", patterns=["*.example"]))
        self.assertIsNone(self.check("127.0.0.1:5000", patterns=["*.example"]))
        error = self.check("quay.io", patterns=["*.example"])
        assert error is not None
        self.assertIn("not in the allowed upstreams", error.message)

    def test_allow_any(self) -> None:
        """allow_any lets every host through."""
        self.assertIsNone(self.check("127.0.0.1:22", allow_any=True))


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class _EverythingIsLoopback:
    """A name service that answers 127.0.0.1 for every name: DNS rebinding at its simplest."""

    def resolveHostName(self, receiver: Any, hostName: str, portNumber: int = 0, addressTypes: Any = None,
                        transportSemantics: str = "TCP") -> Any:
        resolution = _Resolution(hostName)
        receiver.resolutionBegan(resolution)
        receiver.addressResolved(IPv4Address("TCP", "127.0.0.1", portNumber))
        receiver.resolutionComplete()
        return resolution


class RebindingTests(TestCase):
    """A name that passes the check as public but resolves to loopback at connect time gets no connection."""

    async def test_rebinding_refused_at_connect(self) -> None:
        """Only trusted hosts may connect to the private addresses their names resolve to."""
        counter = _Counting()
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(counter)
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        trusted = f"trusted.test:{number}"
        allowlist = Allowlist(reactor, lambda host: succeed(["93.184.216.34"]), [trusted])
        settings = [RegistrySettings(name=name, scheme="http") for name in (trusted, f"rebind.test:{number}")]
        upstream = Upstream(reactor, settings[:1], allowlist, retries=0, connect_timeout=2, response_timeout=2,
                            name_resolver=_EverythingIsLoopback())
        self.addCleanup(lambda: Deferred.fromCoroutine(upstream.close()))
        with self.assertRaises(OCIError) as caught:
            await upstream.request("GET", settings[1].name, "app", "/v2/")
        self.assertEqual(caught.exception.status, 502)
        self.assertEqual(counter.connections, 0)
        with self.assertRaises(Exception):
            # Trusted: the connection is made (the listener speaks no HTTP, so the request then fails).
            await upstream.request("GET", trusted, "app", "/v2/")
        self.assertEqual(counter.connections, 1)
