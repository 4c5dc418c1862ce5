"""/metrics stays bounded however many upstreams clients name."""

from __future__ import annotations

from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults

from tests.realparts import WebClient, WorkspaceTestCase, http_request, start_server

NAMES = 1000


def _upstream_names(count: int) -> list[str]:
    """Distinct registry hosts on loopback that refuse connections at once."""
    return [f"127.0.16.{1 + n % 250}:{1 + n // 250}" for n in range(count)]


class MetricsCardinalityTests(WorkspaceTestCase):
    """Labels fed by client-chosen upstream names."""

    async def test_client_named_upstreams_share_one_label(self) -> None:
        """1,000 upstreams named by clients add a bounded number of lines to /metrics, counted as other."""
        server = await start_server(self.path("cache"), test=self, args=["--allow-any-upstream"])
        _, before = await http_request("GET", server.url + "/metrics")
        web = WebClient()
        self.addCleanup(web.close)
        gate = DeferredSemaphore(100)

        async def pull(name: str) -> int:
            response = await web.client.get(f"{server.url}/v2/{name}/app/manifests/v1")
            await response.content()
            return int(response.code)

        codes = await gatherResults([gate.run(lambda n=n: Deferred.fromCoroutine(pull(n)))
                                     for n in _upstream_names(NAMES)])
        self.assertEqual(set(codes), {502})
        _, after = await http_request("GET", server.url + "/metrics")
        lines_before, lines_after = before.count(b"\n"), after.count(b"\n")
        self.assertLess(lines_after - lines_before, 100, f"{lines_before} lines before, {lines_after} after")
        self.assertIn(b'registry="other"', after)
        self.assertNotIn(b"127.0.16.", after)
