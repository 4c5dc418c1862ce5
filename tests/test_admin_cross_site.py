"""The admin API refuses what a web page of another site can send: simple GETs that change state,
foreign Host names (DNS rebinding) and cross-site Origins, with or without the token."""

from __future__ import annotations

import json

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ociregistry.admin import admin_site
from tests.fakes import make_image
from tests.realparts import WorkspaceTestCase, free_port, http_request, sleep, start_server
from tests.test_prune import CacheContent

ADMIN = "http://127.0.0.1:8081"


class CrossSiteTests(SynchronousTestCase):
    """Each refusal is a JSON 403 that does nothing; same-origin requests work."""

    token: str | None = None

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.cache = CacheContent(self.mktemp(), self.clock)
        self.addCleanup(self.cache.index.close)
        self.image = make_image(b"layer", b"web")
        self.cache.image(self.image, "team/web", "1.0")
        self.stops: list[None] = []
        site = admin_site(self.cache.server, self.cache.root, self.clock, lambda: self.stops.append(None),
                          token=self.token, listen_host="10.1.2.3")
        self.http = StubTreq(site.resource)

    def request(self, method: str, url: str, **headers: str) -> tuple[int, str, bytes]:
        sent = {name.replace("_", "-"): value for name, value in headers.items()}
        if self.token:
            sent["Authorization"] = f"Bearer {self.token}"
        response = self.successResultOf(self.http.request(method, url, headers=sent))
        content_type = (response.headers.getRawHeaders("content-type") or [""])[0]
        return response.code, content_type, self.successResultOf(response.content())

    def assert_refused(self, method: str, url: str, why: str, **headers: str) -> None:
        code, content_type, body = self.request(method, url, **headers)
        self.assertEqual((code, content_type), (403, "application/json"), body)
        error = json.loads(body)["errors"][0]
        self.assertEqual(error["code"], "DENIED")
        self.assertIn(why, error["message"])

    def assert_nothing_happened(self) -> None:
        self.clock.advance(1)
        self.assertEqual(self.stops, [])
        self.assertIn(self.image.digest, self.cache.files())

    def test_get_does_not_stop(self) -> None:
        """An <img src=.../cmd/stop> (a GET or HEAD) does not stop the server: stop needs POST."""
        for method in ("GET", "HEAD"):
            code, _, body = self.request(method, f"{ADMIN}/cmd/stop")
            self.assertEqual(code, 405, body)
        self.assertIn(b"use POST for /cmd/stop", self.request("GET", f"{ADMIN}/cmd/stop")[2])
        self.assert_nothing_happened()

    def test_foreign_host_refused(self) -> None:
        """A Host that is not a loopback name, an address of the listener or its configured address is refused."""
        self.assert_refused("GET", "http://attacker.example:8081/cmd/image/list", "Host 'attacker.example:8081'")
        self.assert_refused("DELETE", "http://attacker.example:8081/cmd/prune?type=pattern&expr=web&dryRun=false",
                            "is not a name of this listener")
        self.assert_refused("POST", "http://attacker.example:8081/cmd/stop", "Host")
        self.assert_refused("POST", "http://10.9.9.9:8081/cmd/stop", "Host '10.9.9.9:8081'")
        self.assert_nothing_happened()

    def test_foreign_origin_refused(self) -> None:
        """A request from another origin (Origin, or a browser's Sec-Fetch-Site) is refused, even to loopback."""
        self.assert_refused("POST", f"{ADMIN}/cmd/stop", "Origin 'http://attacker.example'",
                            Origin="http://attacker.example")
        self.assert_refused("POST", f"{ADMIN}/cmd/stop", "Origin 'null'", Origin="null")
        self.assert_refused("DELETE", f"{ADMIN}/cmd/prune?type=pattern&expr=web&dryRun=false", "another site",
                            Origin="http://127.0.0.1:3000")
        self.assert_refused("GET", f"{ADMIN}/cmd/image/list", "Sec-Fetch-Site 'cross-site'",
                            Sec_Fetch_Site="cross-site")
        self.assert_nothing_happened()

    def test_same_origin_works(self) -> None:
        """Loopback names and addresses, and the configured address, work, same-origin Origin included."""
        for host in ("127.0.0.1:8081", "localhost:8081", "[::1]:8081", "127.7.7.7", "10.1.2.3:8081"):
            code, _, body = self.request("GET", f"{ADMIN}/cmd/image/list", Host=host, Origin=f"http://{host}",
                                         Sec_Fetch_Site="same-origin")
            self.assertEqual(code, 200, (host, body))
            self.assertIn(self.image.digest.encode(), body)
        code, _, body = self.request("DELETE", f"{ADMIN}/cmd/prune?type=pattern&expr=web&dryRun=false",
                                     Origin=ADMIN)
        self.assertEqual(code, 200, body)
        self.assertNotIn(self.image.digest, self.cache.files())
        self.assertEqual(self.request("POST", f"{ADMIN}/cmd/stop", Origin=ADMIN)[0], 200)
        self.clock.advance(0)
        self.assertEqual(self.stops, [None])


class CrossSiteWithTokenTests(CrossSiteTests):
    """The same with a token: the token does not make a foreign site's request acceptable."""

    token = "s3cret"


class CrossSiteServerTests(WorkspaceTestCase):
    """The default admin listener of a real twistd server, as a browser would reach it."""

    async def test_default_listener(self) -> None:
        """Cross-site requests are JSON 403s and GET /cmd/stop is 405; a same-origin POST stops the server."""
        port = free_port("127.0.14.41")
        server = await start_server(self.path("cache"), test=self,
                                    args=("--admin-listen", f"tcp:{port}:interface=127.0.14.41"))
        admin = f"http://127.0.14.41:{port}"
        response, body = await http_request("GET", f"{admin}/cmd/stop")
        self.assertEqual(response.code, 405, body)
        response, body = await http_request("GET", f"{admin}/cmd/image/list", headers={"Host": "rebound.example"})
        self.assertEqual((response.code, json.loads(body)["errors"][0]["code"]), (403, "DENIED"))
        response, body = await http_request("POST", f"{admin}/cmd/stop", headers={"Origin": "http://evil.example"})
        self.assertEqual(response.code, 403, body)
        await sleep(0.2)
        self.assertTrue(server.running)
        response, body = await http_request("POST", f"{admin}/cmd/stop", headers={"Origin": admin})
        self.assertEqual((response.code, body), (200, b"stopping\n"))
        for _ in range(200):
            if not server.running:
                break
            await sleep(0.05)
        self.assertEqual(server.returncode, 0)
        self.assertIn("Refused an admin request: Host 'rebound.example'", server.log_text())
