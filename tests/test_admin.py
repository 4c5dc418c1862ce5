"""The admin API: the Go server's /cmd endpoints on a listener of their own, behind an optional token."""

from __future__ import annotations

import json
import os
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ociregistry.admin import admin_site, read_token
from tests.fakes import make_image
from tests.realparts import free_port, http_request, sleep, start_server
from tests.test_prune import CacheContent


class AdminAPITests(SynchronousTestCase):
    """The endpoints against a small cache, through StubTreq."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.cache = CacheContent(self.mktemp(), self.clock)
        self.addCleanup(self.cache.index.close)
        self.web = make_image(b"shared" * 10, b"web", config=b'{"app":"web"}')
        self.db = make_image(b"shared" * 10, b"db", config=b'{"app":"db"}')
        self.cache.image(self.web, "team/web", "1.0")
        self.cache.image(self.db, "team/db", "2.0")
        self.stops: list[None] = []
        self.site = admin_site(self.cache.server, self.cache.root, self.clock,
                               lambda: self.stops.append(None), token="s3cret")
        self.http = StubTreq(self.site.resource)

    def request(self, method: str, path: str, token: str | None = "s3cret") -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = self.successResultOf(self.http.request(method, "http://127.0.0.1:8081" + path, headers=headers))
        return response.code, self.successResultOf(response.text())

    def test_token_enforced(self) -> None:
        """Without the right bearer token every endpoint answers 401 and does nothing."""
        for token in (None, "wrong"):
            code, _ = self.request("POST", "/cmd/stop", token)
            self.assertEqual(code, 401)
        self.clock.advance(1)
        self.assertEqual(self.stops, [])

    def test_manifest_list(self) -> None:
        """Text like the Go server's, filtered by pattern; JSON on request."""
        code, text = self.request("GET", "/cmd/manifest/list?pattern=web,nomatch")
        self.assertEqual(code, 200)
        lines = text.splitlines()
        self.assertEqual(lines[0], "URL DIGEST CREATED PULLED")
        self.assertEqual([line.split()[:2] for line in lines[1:]], [["quay.io/team/web:1.0", self.web.digest]])
        code, text = self.request("GET", "/cmd/manifest/list?format=json&count=1")
        self.assertEqual([item["url"] for item in json.loads(text)], ["quay.io/team/db:2.0"])
        self.assertEqual(self.request("GET", "/cmd/manifest/list?pattern=zzz")[1], "no manifests found\n")
        self.assertEqual(self.request("GET", "/cmd/manifest/list?pattern=(")[0], 400)

    def test_image_and_blob_lists(self) -> None:
        """Images list their blobs and can be found by a blob digest; blobs show reference counts."""
        shared = next(d for d, c in self.web.blobs.items() if c == b"shared" * 10)
        code, text = self.request("GET", f"/cmd/image/list?digest={shared[7:20]}")
        self.assertEqual(text.count("- sha256:"), 6)
        code, text = self.request("GET", f"/cmd/blob/list?substr={shared[7:20]}")
        self.assertEqual(text, f"URL REFCNT\n{shared} 2\n")
        code, text = self.request("GET", "/cmd/blob/list?format=json&count=-1")
        self.assertEqual(len(json.loads(text)), 5)

    def test_prune_is_dry_by_default(self) -> None:
        """DELETE /cmd/prune only reports unless dryRun=false; then the files go."""
        code, text = self.request("DELETE", "/cmd/prune?type=pattern&expr=web")
        self.assertEqual(code, 200)
        self.assertIn("would remove image quay.io/team/web:1.0", text)
        self.assertIn(self.web.digest, self.cache.files())
        code, text = self.request("DELETE", "/cmd/prune?type=pattern&expr=web&dryRun=false&format=json")
        self.assertEqual(json.loads(text)["images"], ["quay.io/team/web:1.0"])
        self.assertNotIn(self.web.digest, self.cache.files())
        self.assertEqual(self.request("DELETE", "/cmd/prune?type=created")[0], 400)
        self.assertEqual(self.request("DELETE", "/cmd/prune?type=size&maxSize=lots")[0], 400)
        self.assertEqual(self.request("GET", "/cmd/prune?type=pattern&expr=x")[0], 405)

    def test_stop(self) -> None:
        """POST /cmd/stop answers, then stops the server."""
        self.assertEqual(self.request("POST", "/cmd/stop"), (200, "stopping\n"))
        self.clock.advance(0)
        self.assertEqual(self.stops, [None])
        self.assertEqual(self.request("GET", "/cmd/nothing")[0], 404)

    def test_read_token(self) -> None:
        """The token file's first line is the token; an empty file is refused."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("  abc123 \nignored\n")
        self.assertEqual(read_token(path), "abc123")
        with open(path, "w") as f:
            f.write("\n")
        self.assertRaises(ValueError, read_token, path)


class AdminServerTests(TestCase):
    """The admin listener of the twistd server (needs the --admin-* options wired into tap.py)."""

    async def test_stop_endpoint_stops_server(self) -> None:
        """The admin API listens on its own address with the token required, and /cmd/stop ends twistd cleanly."""
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        token_file = os.path.join(base, "token")
        with open(token_file, "w") as f:
            f.write("t0ken\n")
        port = free_port("127.0.0.41")
        server = await start_server(os.path.join(base, "cache"), test=self, args=(
            "--admin-listen", f"tcp:{port}:interface=127.0.0.41", "--admin-token-file", token_file))
        admin = f"http://127.0.0.41:{port}"
        response, _ = await http_request("GET", f"{admin}/cmd/manifest/list")
        self.assertEqual(response.code, 401)
        response, _ = await http_request("GET", f"{server.url}/cmd/stop")
        self.assertEqual(response.code, 404)
        self.assertTrue(server.running)
        headers: dict[Any, Any] = {"Authorization": "Bearer t0ken"}
        response, body = await http_request("GET", f"{admin}/cmd/manifest/list", headers=headers)
        self.assertEqual((response.code, body), (200, b"no manifests found\n"))
        response, body = await http_request("POST", f"{admin}/cmd/stop", headers=headers)
        self.assertEqual((response.code, body), (200, b"stopping\n"))
        for _ in range(300):
            if not server.running:
                break
            await sleep(0.05)
        self.assertFalse(server.running)
        self.assertEqual(server.returncode, 0)
        self.assertIn("Stopping, as the admin API was asked to", server.log_text())
