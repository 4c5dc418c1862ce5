"""Issue-3 behaviour against a real upstream: moving tags, air-gap, credentials from outside the file."""

from __future__ import annotations

import json
import os
import stat
import sys


from tests.fakes import wait
from tests.realparts import (
    WorkspaceTestCase,
    build_oci_index,
    push,
    start_registry,
    start_server,
)
from tests.test_integration import Puller


class OnlineTests(WorkspaceTestCase):
    """A plain HTTP docker-registry upstream and the server under twistd."""


    async def test_tag_moves_upstream(self) -> None:
        """A tag moved upstream is served old before the interval and new after it."""
        first = build_oci_index(self.path("first"), platforms=[("linux", "amd64")], layer_sizes=(100,))
        second = build_oci_index(self.path("second"), platforms=[("linux", "amd64")], layer_sizes=(200,))
        registry = await start_registry(self.path("registry"), test=self)
        await push(first, registry, "app", "stable")
        server = await start_server(self.path("cache"), test=self, args=(
            "--config-file", self.config([{"name": registry.host, "scheme": "http"}]), "--tag-ttl", "2s"))
        puller = Puller(self, server)
        self.assertEqual((await puller.pull(registry.host, "app", "stable"))[0], first.digest)
        await push(second, registry, "app", "stable")
        self.assertEqual((await puller.pull(registry.host, "app", "stable"))[0], first.digest)
        await wait(2.5)
        self.assertEqual((await puller.pull(registry.host, "app", "stable"))[0], second.digest)
        response, _ = await puller.get(f"/v2/app/manifests/{first.digest}", registry.host)
        self.assertEqual(response.code, 200)

    async def test_air_gapped_never_connects(self) -> None:
        """--air-gapped: a configured, running upstream sees no request at all."""
        registry = await start_registry(self.path("registry"), test=self)
        image = build_oci_index(self.path("image"), platforms=[("linux", "amd64")], layer_sizes=(100,))
        await push(image, registry, "app", "v1")
        await registry.settled()
        seen = len(registry.requests())
        server = await start_server(self.path("cache"), test=self, args=(
            "--config-file", self.config([{"name": registry.host, "scheme": "http"}]), "--air-gapped"))
        puller = Puller(self, server)
        for path in ["/v2/app/manifests/v1", f"/v2/app/manifests/{image.digest}", "/v2/app/tags/list",
                     f"/v2/app/blobs/{next(iter(image.blobs))}"]:
            response, body = await puller.get(path, registry.host)
            self.assertEqual(response.code, 404, path)
            self.assertIn("air-gapped", json.loads(body)["errors"][0]["message"])
        await registry.settled()
        self.assertEqual(len(registry.requests()), seen)

    async def test_credentials_from_environment_and_helper(self) -> None:
        """Basic auth from $OCIREGISTRY_CREDENTIALS and from a credential helper; no secret is logged."""
        registry = await start_registry(self.path("registry"), test=self, htpasswd_users={"alice": "env-s3cret",
                                                                                           "bob": "helper-s3cret"})
        image = build_oci_index(self.path("image"), platforms=[("linux", "amd64")], layer_sizes=(100,))
        await push(image, registry, "app", "v1", creds=("alice", "env-s3cret"))
        config = self.config([{"name": registry.host, "scheme": "http"}])
        environment = {"OCIREGISTRY_CREDENTIALS": json.dumps({registry.host: {"user": "alice", "password": "env-s3cret"}})}
        server = await start_server(self.path("cache-env"), test=self, args=("--config-file", config), env=environment)
        self.assertEqual((await Puller(self, server).pull(registry.host, "app", "v1"))[0], image.digest)
        self.assertNotIn("env-s3cret", server.log_text())
        await server.stop()

        helpers = self.path("bin")
        os.makedirs(helpers)
        helper = os.path.join(helpers, "docker-credential-testing")
        with open(helper, "w") as f:
            f.write(f"#!{sys.executable}\n"
                    "import json, sys\n"
                    "assert sys.argv[1:] == ['get']\n"
                    "host = sys.stdin.read().strip()\n"
                    "print(json.dumps({'ServerURL': host, 'Username': 'bob', 'Secret': 'helper-s3cret'}))\n")
        os.chmod(helper, os.stat(helper).st_mode | stat.S_IEXEC)
        config = self.config([{"name": registry.host, "scheme": "http", "auth": {"credentialHelper": "testing"}}])
        environment = {"PATH": helpers + os.pathsep + os.environ.get("PATH", "")}
        server = await start_server(self.path("cache-helper"), test=self, args=("--config-file", config),
                                    env=environment)
        self.assertEqual((await Puller(self, server).pull(registry.host, "app", "v1"))[0], image.digest)
        self.assertNotIn("helper-s3cret", server.log_text())
        await registry.settled()
        self.assertGreater(registry.count_requests("GET", "/v2/app/manifests/", status=200), 0)
