"""Upstream faults and trust with real parts: twistd, CNCF distribution, a token issuer over TLS."""

from __future__ import annotations

import json

import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.web.server import Site

from tests.realparts import (
    MANIFEST_ACCEPT,
    OCI_MANIFEST,
    Server,
    TokenIssuer,
    WebClient,
    WorkspaceTestCase,
    build_oci_index,
    free_port,
    make_ca,
    push,
    start_registry,
    start_server,
)

# Loopback addresses of these tests' own.
SILENT_HOST = "127.0.11.1"
REGISTRY_HOST = "127.0.11.3"
REALM_HOST = "127.0.11.4"


class _Silent(Factory):
    """Accepts connections and never answers."""

    protocol = Protocol


async def timed_get(server: Server, path: str, limit: float, **headers: str) -> tuple[float, int | None, bytes]:
    """GET through the server: (seconds taken, status or None if no answer within ``limit``, body)."""
    web = WebClient()
    started = time.monotonic()
    try:
        request = web.client.get(server.url + path, headers=headers)
        request.addTimeout(limit, reactor)
        response = await request
        body = await response.content()
        return time.monotonic() - started, response.code, body
    except Exception as e:
        return time.monotonic() - started, None, repr(e).encode()
    finally:
        await web.close()


class SilentUpstreamTests(WorkspaceTestCase):
    """An upstream that accepts connections and never answers, behind a real twistd server."""

    async def test_silent_upstream_504_and_stale_tag(self) -> None:
        """With --pull-timeout 2: an uncached tag is a 504 and a cached tag is served stale, in seconds."""
        image = build_oci_index(self.path("image"), platforms=[("linux", "amd64")], layer_sizes=(512,))
        port = free_port(SILENT_HOST)
        registry = await start_registry(self.path("registry"), test=self, address=SILENT_HOST, port=port)
        await push(image, registry, "app", "v1")
        server = await start_server(self.path("cache"), test=self, args=(
            "--config-file", self.config([{"name": registry.host, "scheme": "http"}]),
            "--pull-timeout", "2", "--tag-ttl", "0"))
        took, status, body = await timed_get(server, f"/v2/{registry.host}/app/manifests/v1", 30,
                                             Accept=MANIFEST_ACCEPT)
        self.assertEqual(status, 200, body)
        await registry.stop()
        listening = await serverFromString(reactor, f"tcp:{port}:interface={SILENT_HOST}").listen(_Silent())
        self.addCleanup(listening.stopListening)
        stale = Deferred.fromCoroutine(timed_get(server, f"/v2/{registry.host}/app/manifests/v1", 30,
                                                 Accept=MANIFEST_ACCEPT))
        missing = Deferred.fromCoroutine(timed_get(server, f"/v2/{registry.host}/app/manifests/v2", 30))
        took_stale, status, body = await stale
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["mediaType"], "application/vnd.oci.image.index.v1+json")
        took_missing, status, body = await missing
        self.assertEqual(status, 504, body)
        self.assertEqual(json.loads(body)["errors"][0]["code"], "UNAVAILABLE")
        self.assertIn("did not answer in 2 s", json.loads(body)["errors"][0]["message"])
        # Three attempts of 2 s and 1.5 s of backoff: 7.5 s, and some slack for a busy machine.
        for took in (took_stale, took_missing):
            self.assertGreater(took, 7.0)
            self.assertLess(took, 11.0)
        print(f"silent upstream: stale tag in {took_stale:.1f} s, uncached tag 504 in {took_missing:.1f} s")
        self.assertIn("Serving cached", server.log_text())


class TokenRealmTrustTests(WorkspaceTestCase):
    """A token realm on a host:port of its own is trusted as the registry that names it."""

    async def start_realm(self, ca_name: str) -> tuple[TokenIssuer, str]:
        """A token issuer over TLS on its own address and port, its certificate from CA ``ca_name``."""
        if ca_name not in self.cas:
            self.cas[ca_name] = make_ca(self.path(f"ca-{ca_name}"), ca_name)
        ca = self.cas[ca_name]
        cert, key = ca.issue_server(REALM_HOST)
        issuer = TokenIssuer(self.path("issuer"), users={"bob": "hunter2"})
        port = await serverFromString(
            reactor, f"ssl:0:interface={REALM_HOST}:privateKey={key}:certKey={cert}").listen(Site(issuer))
        self.addCleanup(port.stopListening)
        issuer.realm = f"https://{REALM_HOST}:{port.getHost().port}/token"
        return issuer, ca.cert_path

    async def start(self, realm_ca: str) -> tuple[Any, Server, TokenIssuer]:
        self.cas: dict[str, Any] = {}
        registry_ca = make_ca(self.path("ca-registry"), "registry")
        self.cas["registry"] = registry_ca
        issuer, _ = await self.start_realm(realm_ca)
        registry = await start_registry(self.path("registry"), test=self, address=REGISTRY_HOST,
                                        port=free_port(REGISTRY_HOST), tls=registry_ca.issue_server(REGISTRY_HOST),
                                        token=issuer)
        server = await start_server(self.path("cache"), test=self, args=("--config-file", self.config([{
            "name": registry.host, "auth": {"user": "bob", "password": "hunter2"},
            "tls": {"ca": registry_ca.cert_path}}]),))
        return registry, server, issuer

    async def test_realm_trusted_with_registry_ca(self) -> None:
        """A realm signed by the registry's private CA works with only the registry's tls.ca configured."""
        registry, server, issuer = await self.start("registry")
        image = build_oci_index(self.path("image"), platforms=[("linux", "amd64")], layer_sizes=(512,))
        await push(image, registry, "team/app", "v1", creds=("bob", "hunter2"),
                   cert_dir=self.cas["registry"].cert_dir(self.path("certs")))
        before = len(issuer.requests)
        _, status, body = await timed_get(server, f"/v2/{registry.host}/team/app/manifests/v1", 30,
                                          Accept=MANIFEST_ACCEPT)
        self.assertEqual(status, 200, body)
        manifest = json.loads(body)["manifests"][0]
        _, status, body = await timed_get(server, f"/v2/{registry.host}/team/app/manifests/{manifest['digest']}",
                                          30, Accept=OCI_MANIFEST)
        self.assertEqual(status, 200, body)
        for layer in json.loads(body)["layers"]:
            _, status, content = await timed_get(server, f"/v2/{registry.host}/team/app/blobs/{layer['digest']}", 30)
            self.assertEqual((status, len(content)), (200, layer["size"]))
        ours = issuer.requests[before:]
        self.assertTrue(ours)
        self.assertEqual({(scope, user) for _, scope, user in ours}, {("repository:team/app:pull", "bob")})
        self.assertNotIn("hunter2", server.log_text())

    async def test_realm_with_unknown_ca_says_so(self) -> None:
        """A realm whose certificate the registry's CA does not vouch for is an error naming the realm and TLS."""
        registry, server, issuer = await self.start("elsewhere")
        took, status, body = await timed_get(server, f"/v2/{registry.host}/team/app/manifests/v1", 30,
                                             Accept=MANIFEST_ACCEPT)
        self.assertEqual(status, 502, body)
        message = json.loads(body)["errors"][0]["message"]
        self.assertEqual(message, f"TLS to the token realm {issuer.realm} of {registry.host} failed: "
                                  "certificate verify failed")
        self.assertEqual(issuer.requests, [])
        self.assertLess(took, 5.0)



