"""End to end: docker.io served from another registry under a path, as enterprises proxy Docker Hub.

Real parts: CNCF distribution as the upstream, Debian's nginx in front of it
publishing it under /v2/dockerhub-proxy/ (as a Harbor proxy project or an
Artifactory remote repository is), the server under twistd, skopeo.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3

from tests.realparts import (
    ImageSet,
    Registry,
    Server,
    WorkspaceTestCase,
    build_oci_index,
    push,
    skopeo_copy_all,
    start_nginx,
    start_registry,
    start_server,
    start_token_issuer,
)
from tests.test_integration import Puller

AGENT = "corp-mirror/2.0 (+https://wiki.corp/mirror)"
SECRET = "s3cret-Rw4"
# distribution's access log: "METHOD PATH HTTP/1.1" STATUS SIZE "REFERER" "USER-AGENT"
_DISTRIBUTION_LINE = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+" (\d{3}) \d+ "[^"]*" "([^"]*)"')


def cached_images(server: Server) -> set[tuple[str, str]]:
    """What the cache's index says it holds, read as users do, with sqlite3."""
    with sqlite3.connect(os.path.join(server.image_path, "index.db")) as db:
        return set(db.execute("SELECT registry, repository FROM manifests")) | set(
            db.execute("SELECT registry, repository FROM tags"))


def registry_agents(registry: Registry, offset: int) -> list[tuple[str, str, int, str]]:
    """(method, path, status, User-Agent) of each request distribution logged after ``offset`` bytes."""
    with open(registry.log_path, encoding="utf-8", errors="replace") as f:
        f.seek(offset)
        return [(m[1], m[2], int(m[3]), m[4]) for m in map(_DISTRIBUTION_LINE.search, f) if m]


class AliasTests(WorkspaceTestCase):
    """Clients name docker.io; the server goes to the corporate proxy, and caches under docker.io."""

    def setUp(self) -> None:
        super().setUp()
        self.image = build_oci_index(self.path("oci"))

    async def pull(self, server: Server, name: str) -> ImageSet:
        """skopeo pulls docker.io/library/app:v1 in the in-path form: every platform, the upstream's digests."""
        pulled = await skopeo_copy_all(f"{server.host}/docker.io/library/app:v1",
                                       self.path(f"{name}-{os.urandom(4).hex()}"))
        self.assertEqual((pulled.digest, pulled.manifests, pulled.blobs),
                         (self.image.digest, self.image.manifests, self.image.blobs))
        return pulled

    async def test_pull_through_path_prefix(self) -> None:
        """Pulled in-path and with ns=, docker.io/library/app comes from nginx's /v2/dockerhub-proxy/, with our User-Agent, cached as docker.io."""
        registry = await start_registry(self.path("registry"), test=self)
        await push(self.image, registry, "library/app", "v1")
        nginx = await start_nginx(self.path("nginx"), test=self, address="127.0.20.1",
                                  locations={"/v2/dockerhub-proxy/": f"http://{registry.host}/v2/"})
        config = self.config([{"name": "docker.io", "upstream": f"{nginx.url}/dockerhub-proxy", "userAgent": AGENT}])
        server = await start_server(self.path("cache"), test=self, args=("--config-file", config))
        await self.pull(server, "in-path")
        top, platforms, blobs = await Puller(self, server).pull("docker.io", "library/app", "v1")
        self.assertEqual((top, set(blobs)), (self.image.digest, set(self.image.blobs)))
        await nginx.settled()
        seen = nginx.requests()
        self.assertTrue(seen)
        for method, uri, status, agent in seen:
            self.assertTrue(uri.startswith("/v2/dockerhub-proxy/library/app/"), uri)
            self.assertEqual((status, agent), (200, AGENT), uri)
        self.assertGreater(registry.count_requests("GET", "/v2/library/app/blobs/", 200), 0)
        self.assertEqual(cached_images(server), {("docker.io", "library/app")})

        # Without the alias (and without any upstream) the same cache serves the same image.
        await server.stop()
        offline = await start_server(self.path("cache"), test=self, args=("--air-gapped",))
        await self.pull(offline, "offline")
        await nginx.settled()
        self.assertEqual(len(nginx.requests()), len(seen))

    async def test_token_scoped_to_prefixed_repository(self) -> None:
        """Behind a token service, the token is asked for dockerhub-proxy/library/app, the name distribution checks."""
        issuer = await start_token_issuer(self.path("token"), test=self, users={"robot": SECRET})
        registry = await start_registry(self.path("registry"), test=self, token=issuer)
        await push(self.image, registry, "dockerhub-proxy/library/app", "v1", creds=("robot", SECRET))
        pushed = len(issuer.requests)
        config = self.config([{"name": "docker.io", "upstream": f"{registry.url}/dockerhub-proxy",
                               "auth": {"user": "robot", "password": SECRET}}])
        server = await start_server(self.path("cache"), test=self, args=("--config-file", config))
        top, _, blobs = await Puller(self, server).pull("docker.io", "library/app", "v1")
        self.assertEqual((top, set(blobs)), (self.image.digest, set(self.image.blobs)))
        fetched = issuer.requests[pushed:]
        self.assertTrue(fetched)
        self.assertEqual({(scope, user) for _, scope, user in fetched},
                         {("repository:dockerhub-proxy/library/app:pull", "robot")})
        self.assertEqual(cached_images(server), {("docker.io", "library/app")})

    async def test_rust_configuration_and_credentials(self) -> None:
        """The Rust oci-registry's file and $UPSTREAM_CREDENTIALS pull from an htpasswd registry with its user_agent."""
        registry = await start_registry(self.path("registry"), test=self, htpasswd_users={"example": SECRET})
        await push(self.image, registry, "library/app", "v1", creds=("example", SECRET))
        await registry.settled()
        offset = os.path.getsize(registry.log_path)
        config = self.path("upstreams.yaml")
        with open(config, "w") as f:
            f.write(f'- namespace: docker.io\n  host: "{registry.host}"\n  tls: false\n'
                    '  user_agent: "containerd/1.6.8"\n  manifest_invalidation_time: 0s\n')
        credentials = json.dumps({"docker.io": {"username": "example", "password": SECRET}})
        server = await start_server(self.path("cache"), test=self, args=("--config-file", config),
                                    env={"UPSTREAM_CREDENTIALS": credentials})
        await self.pull(server, "rust")
        await registry.settled()
        seen = registry_agents(registry, offset)
        self.assertTrue(any(status == 200 and "/blobs/" in path for _, path, status, _ in seen), seen)
        self.assertEqual({agent for _, _, _, agent in seen}, {"containerd/1.6.8"})
        self.assertNotIn(SECRET, server.log_text())
