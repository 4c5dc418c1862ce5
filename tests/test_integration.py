"""End to end with real parts: twistd, CNCF distribution upstreams, skopeo."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import yaml
from twisted.internet.defer import Deferred, DeferredList
from twisted.trial.unittest import TestCase

from tests.realparts import (
    WorkspaceTestCase,
    MANIFEST_ACCEPT,
    Registry,
    Server,
    WebClient,
    build_docker_list,
    build_oci_index,
    make_ca,
    push,
    registry_manifest_digest,
    skopeo_copy_all,
    start_registry,
    start_server,
    start_token_issuer,
)

INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")


def sha256(content: bytes) -> str:
    return "sha256:" + hashlib.sha256(content).hexdigest()


class Puller:
    """A containerd-like client using the ns= form: HEAD the tag, then GET by digest, verifying all."""

    def __init__(self, test: TestCase, server: Server) -> None:
        self._web = WebClient()
        test.addCleanup(self._web.close)
        self._base = server.url

    async def get(self, path: str, ns: str, method: str = "GET", **headers: str) -> tuple[Any, bytes]:
        response = await self._web.client.request(
            method, f"{self._base}{path}", params={"ns": ns}, headers=headers)
        return response, await response.content()

    async def pull(self, ns: str, repository: str, tag: str) -> tuple[str, dict[str, str], dict[str, int]]:
        """Pull every platform: (top digest, {platform: manifest digest}, {blob digest: size})."""
        response, body = await self.get(f"/v2/{repository}/manifests/{tag}", ns, "HEAD", Accept=MANIFEST_ACCEPT)
        assert response.code == 200, response.code
        top = response.headers.getRawHeaders("docker-content-digest")[0]
        response, body = await self.get(f"/v2/{repository}/manifests/{top}", ns, Accept=MANIFEST_ACCEPT)
        assert response.code == 200 and sha256(body) == top, (response.code, top)
        assert response.headers.getRawHeaders("content-type")[0] in INDEX_TYPES
        platforms: dict[str, str] = {}
        blobs: dict[str, int] = {}
        for entry in json.loads(body)["manifests"]:
            platform = "/".join(filter(None, [entry["platform"]["os"], entry["platform"]["architecture"],
                                              entry["platform"].get("variant")]))
            platforms[platform] = entry["digest"]
            response, body = await self.get(f"/v2/{repository}/manifests/{entry['digest']}", ns)
            assert response.code == 200 and sha256(body) == entry["digest"]
            manifest = json.loads(body)
            for descriptor in [manifest["config"], *manifest["layers"]]:
                response, content = await self.get(f"/v2/{repository}/blobs/{descriptor['digest']}", ns)
                assert response.code == 200 and sha256(content) == descriptor["digest"], descriptor
                blobs[descriptor["digest"]] = len(content)
        return top, platforms, blobs


class PullThroughTests(WorkspaceTestCase):
    """Images pushed to a real upstream pull through the server with skopeo and a scripted client."""

    def setUp(self) -> None:
        super().setUp()
        self.oci = build_oci_index(self.path("oci"))
        self.docker = build_docker_list(self.path("docker"))

    async def serve(self, registries: list[dict[str, Any]], *args: str) -> Server:
        return await start_server(self.path("cache"), test=self,
                                  args=("--config-file", self.config(registries), *args))

    async def check_upstream(self, registry: Registry, creds: Any = None, cert_dir: Any = None) -> None:
        """The upstream serves both images with the digests they were built with."""
        for image, repository, tag in [(self.oci, "team/app", "v1.0-RC"), (self.docker, "tools", "Latest")]:
            upstream_digest = await registry_manifest_digest(registry, repository, tag, creds=creds, cert_dir=cert_dir)
            self.assertEqual(upstream_digest, image.digest)

    async def check_pulls(self, server: Server, registry: Registry) -> None:
        """Both images pull through both forms with the upstream's digests."""
        puller = Puller(self, server)
        for image, repository, tag in [(self.oci, "team/app", "v1.0-RC"), (self.docker, "tools", "Latest")]:
            pulled = await skopeo_copy_all(f"{server.host}/{registry.host}/{repository}:{tag}",
                                           self.path(f"pulled-{repository.replace('/', '-')}-{os.urandom(4).hex()}"))
            self.assertEqual((pulled.digest, pulled.media_type, pulled.manifests, pulled.blobs),
                             (image.digest, image.media_type, image.manifests, image.blobs))
            top, platforms, blobs = await puller.pull(registry.host, repository, tag)
            self.assertEqual((top, platforms, blobs), (image.digest, image.manifests, image.blobs))

    async def push_both(self, registry: Registry, creds: Any = None, cert_dir: Any = None) -> None:
        await push(self.oci, registry, "team/app", "v1.0-RC", creds=creds, cert_dir=cert_dir)
        await push(self.docker, registry, "tools", "Latest", creds=creds, cert_dir=cert_dir)
        await self.check_upstream(registry, creds, cert_dir)

    async def test_plain_http_then_offline(self) -> None:
        """Plain HTTP, anonymous: pulls match upstream digests, and still work from cache with the upstream stopped."""
        registry = await start_registry(self.path("registry"), test=self, address="127.0.0.21", port=80)
        await self.push_both(registry)
        server = await self.serve([{"name": registry.host, "scheme": "http"}])
        await registry.settled()
        heads = registry.count_requests("HEAD", "/manifests/v1.0-RC")
        await self.check_pulls(server, registry)
        await registry.settled()
        self.assertEqual(registry.count_requests("HEAD", "/manifests/v1.0-RC") - heads, 1)
        self.assertEqual(registry.count_requests("GET", "/manifests/v1.0-RC"), 0)
        self.assertEqual(registry.count_requests("GET", f"/manifests/{self.oci.digest}"), 1)
        await registry.stop()
        await server.stop()
        # Every tag is now due for a recheck, which fails: the cached tags are served.
        server.args += ["--tag-ttl", "0"]
        await server.start()
        puller = Puller(self, server)
        for image, repository, tag in [(self.oci, "team/app", "v1.0-RC"), (self.docker, "tools", "Latest")]:
            pulled = await skopeo_copy_all(f"{server.host}/{registry.host}/{repository}:{tag}",
                                           self.path(f"offline-{repository.replace('/', '-')}"))
            self.assertEqual((pulled.digest, pulled.manifests, pulled.blobs),
                             (image.digest, image.manifests, image.blobs))
            self.assertEqual(await puller.pull(registry.host, repository, tag),
                             (image.digest, image.manifests, image.blobs))
        response, body = await puller.get("/v2/team/app/manifests/not-cached", registry.host)
        self.assertEqual(response.code, 502)
        self.assertEqual(json.loads(body)["errors"][0]["code"], "UNAVAILABLE")

    async def test_tls_basic_auth(self) -> None:
        """HTTPS with a private CA and basic auth."""
        ca = make_ca(self.path("ca"), "upstream")
        registry = await start_registry(self.path("registry"), test=self, address="127.0.0.22", port=443,
                                        tls=ca.issue_server("127.0.0.22"), htpasswd_users={"alice": "s3cret"})
        certs = ca.cert_dir(self.path("certs"))
        await self.push_both(registry, creds=("alice", "s3cret"), cert_dir=certs)
        server = await self.serve([{"name": registry.host, "auth": {"user": "alice", "password": "s3cret"},
                                    "tls": {"ca": ca.cert_path}}])
        await self.check_pulls(server, registry)
        self.assertNotIn("s3cret", server.log_text())

    async def test_mutual_tls(self) -> None:
        """HTTPS requiring client certificates."""
        ca = make_ca(self.path("ca"), "upstream")
        registry = await start_registry(self.path("registry"), test=self, address="127.0.0.23", port=443,
                                        tls=ca.issue_server("127.0.0.23"), client_ca=ca.cert_path)
        certs = ca.cert_dir(self.path("certs"), client="mirror")
        await self.push_both(registry, cert_dir=certs)
        server = await self.serve([{"name": registry.host, "tls": {
            "ca": ca.cert_path, "cert": os.path.join(certs, "client.cert"), "key": os.path.join(certs, "client.key")}}])
        await self.check_pulls(server, registry)

    async def test_token_auth(self) -> None:
        """Token auth: the server answers the bearer challenge, and reuses its token per repository."""
        issuer = await start_token_issuer(self.path("issuer"), test=self, users={"bob": "hunter2"})
        registry = await start_registry(self.path("registry"), test=self, address="127.0.0.24", port=80,
                                        token=issuer)
        await self.push_both(registry, creds=("bob", "hunter2"))
        server = await self.serve([{"name": registry.host, "scheme": "http",
                                    "auth": {"user": "bob", "password": "hunter2"}}])
        before = len(issuer.requests)
        await self.check_pulls(server, registry)
        ours = [r for r in issuer.requests[before:] if r[1].endswith(":pull") and r[1].count(":") == 2]
        scopes = sorted({scope for _, scope, user in ours})
        self.assertEqual(scopes, ["repository:team/app:pull", "repository:tools:pull"])
        self.assertEqual(len(ours), 2)
        self.assertNotIn("hunter2", server.log_text())


class CoalescingTests(TestCase):
    """Many clients, one upstream download."""

    async def test_twenty_clients_one_upstream_get(self) -> None:
        """20 concurrent GETs of an uncached 64 MiB blob: one upstream GET, 20 verified bodies."""
        base = os.path.abspath(self.mktemp())
        image = build_oci_index(os.path.join(base, "image"), platforms=[("linux", "amd64")],
                                layer_sizes=(), large_layer=64 << 20)
        registry = await start_registry(os.path.join(base, "registry"), test=self)
        await push(image, registry, "big", "v1")
        config = os.path.join(base, "config.yaml")
        with open(config, "w") as f:
            yaml.safe_dump({"registries": [{"name": registry.host, "scheme": "http"}]}, f)
        server = await start_server(os.path.join(base, "cache"), test=self, args=("--config-file", config))
        web = WebClient()
        self.addCleanup(web.close)
        digest = image.large_layer
        assert digest is not None

        async def pull() -> tuple[int, str, int]:
            response = await web.client.get(f"{server.url}/v2/big/blobs/{digest}", params={"ns": registry.host},
                                             unbuffered=True)
            hasher = hashlib.sha256()
            size = [0]

            def collect(data: bytes) -> None:
                hasher.update(data)
                size[0] += len(data)

            from treq import collect as treq_collect
            await treq_collect(response, collect)
            return response.code, "sha256:" + hasher.hexdigest(), size[0]

        results = await DeferredList([Deferred.fromCoroutine(pull()) for _ in range(20)], consumeErrors=True)
        for ok, result in results:
            self.assertTrue(ok, result)
            self.assertEqual(result, (200, digest, image.blobs[digest]))
        await registry.settled()
        self.assertEqual(registry.count_requests("GET", f"/blobs/{digest}"), 1)
