"""Name lookups that never answer, through a real twistd process and a real docker-registry.

The server runs in a private mount namespace whose /etc/resolv.conf names a
name server on 127.0.12.1 that receives every query and answers none, so
each lookup of an unknown name really blocks in getaddrinfo for as long as
the resolver options say, as it does when a network's DNS goes silent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import DatagramProtocol
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient

from tests.realparts import (
    OCI_CONFIG,
    OCI_LAYER,
    OCI_MANIFEST,
    Server,
    WebClient,
    WorkspaceTestCase,
    digest_of,
    free_port,
    sleep,
    start_registry,
    upload_blob,
    upload_manifest,
)

NAME_SERVER = "127.0.12.1"
OTHER_CLIENT = "127.0.12.2"
# glibc waits this long for the silent name server: longer than any timeout the server is given.
STUCK_SECONDS = 30
BAD_REQUESTS = 300


class _SilentNameServer(DatagramProtocol):
    """Takes DNS queries and never answers them."""

    def __init__(self) -> None:
        self.queries = 0

    def datagramReceived(self, datagram: bytes, address: Any) -> None:
        self.queries += 1


class _ServerWithSilentDNS(Server):
    """The twistd server, in a mount namespace whose resolv.conf names the silent name server."""

    def __init__(self, resolv_conf: str, *args: Any) -> None:
        super().__init__(*args)
        self._resolv_conf = resolv_conf

    def command(self) -> list[str]:
        return ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"',
                self._resolv_conf, *super().command()]


def _bad_request(number: int) -> tuple[str, dict[str, str]]:
    """A manifest request naming an unresolvable upstream, in each of the three ways a client can."""
    host = f"nx-{number}.invalid"
    form = number % 3
    if form == 0:
        return f"/v2/app/manifests/v1?ns={host}", {}
    if form == 1:
        return f"/v2/{host}/app/manifests/v1", {}
    return "/v2/app/manifests/v1", {"X-Registry": host}


class SilentDNSTests(WorkspaceTestCase):
    """Lookups stuck in getaddrinfo leave everything else responsive and shutdown prompt."""

    timeout = 120

    async def start(self, *args: str) -> tuple[Server, list[str], list[str]]:
        """A registry with cold manifests and blobs, the silent name server, and the server using it."""
        # A private /etc/resolv.conf needs root and a mount namespace (util-linux's unshare).
        probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, check=False)
        self.assertEqual(probe.returncode, 0, f"unshare --mount (run the tests as root): {probe.stderr!r}")
        dns = _SilentNameServer()
        port = reactor.listenUDP(53, dns, interface=NAME_SERVER)
        self.addCleanup(port.stopListening)
        resolv_conf = self.path("resolv.conf")
        with open(resolv_conf, "w") as f:
            f.write(f"nameserver {NAME_SERVER}\noptions timeout:{STUCK_SECONDS} attempts:1\n")
        registry = await start_registry(self.path("registry"), test=self)
        web = WebClient()
        self.addCleanup(web.close)
        manifests, blobs = [], []
        for number in range(4):
            config = await upload_blob(registry, "app", json.dumps({"n": number}).encode(), web)
            layer = await upload_blob(registry, "app", os.urandom(4096), web)
            manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                   "config": {"mediaType": OCI_CONFIG, "digest": config, "size": 8},
                                   "layers": [{"mediaType": OCI_LAYER, "digest": layer, "size": 4096}]})
            manifests.append(await upload_manifest(registry, "app", digest_of(manifest.encode()),
                                                   OCI_MANIFEST, manifest.encode()))
            blobs.append(layer)
        # Named as localhost: connections to it need a lookup too (answered from /etc/hosts).
        self.upstream = f"localhost:{registry.port}"
        config_file = self.config([{"name": self.upstream, "scheme": "http"}])
        run_dir = os.path.abspath(self.mktemp())
        os.makedirs(run_dir)
        server = _ServerWithSilentDNS(resolv_conf, self.path("cache"), ["--config-file", config_file, *args],
                                      free_port(), run_dir)
        self.addCleanup(server.stop)
        await server.start()
        self.web = web
        return server, manifests, blobs

    async def timed(self, url: str, headers: dict[str, str] | None = None,
                    client: HTTPClient | None = None) -> tuple[float, int, bytes]:
        """Seconds to a whole answer, its status and body."""
        started = time.monotonic()
        response = await (client or self.web.client).get(url, headers=headers)
        body = await response.content()
        return time.monotonic() - started, response.code, body

    def flood(self, server: Server) -> list[Deferred[tuple[float, int, bytes]]]:
        """Send the requests naming unresolvable upstreams, without waiting for them."""
        requests = []
        for number in range(BAD_REQUESTS):
            path, headers = _bad_request(number)
            requests.append(Deferred.fromCoroutine(self.timed(server.url + path, headers)))
        return requests

    async def test_everything_else_stays_responsive(self) -> None:
        """With 300 requests naming hosts whose lookups hang, /v2/, /metrics, cold pulls and other clients answer."""
        server, manifests, blobs = await self.start("--dns-timeout", "3")
        flood = self.flood(server)
        await sleep(0.5)
        ns = f"?ns={self.upstream}"
        for url in [server.url + "/v2/", server.url + "/metrics",
                    f"{server.url}/v2/app/manifests/{manifests[0]}{ns}",
                    f"{server.url}/v2/app/blobs/{blobs[1]}{ns}",
                    f"{server.url}/v2/{self.upstream}/app/manifests/{manifests[2]}"]:
            seconds, code, _ = await self.timed(url)
            self.assertEqual(code, 200, url)
            self.assertLess(seconds, 1.0, url)
        # Another client's lookup gets a thread at once ("vm" is in /etc/hosts, a loopback name: denied).
        pool = HTTPConnectionPool(reactor, persistent=False)
        other = HTTPClient(Agent(reactor, bindAddress=(OTHER_CLIENT, 0), pool=pool))
        seconds, code, body = await self.timed(f"{server.url}/v2/app/manifests/v1?ns=vm:5000", client=other)
        self.assertEqual(code, 403, body)
        self.assertLess(seconds, 1.0)
        answers = [result for _, result in await DeferredList(flood, fireOnOneErrback=True)]
        statuses = sorted({code for _, code, _ in answers})
        self.assertEqual(set(statuses) - {429, 503, 504}, set(), statuses)
        self.assertIn(504, statuses)
        refused = [seconds for seconds, code, _ in answers if code in (429, 503)]
        self.assertGreater(len(refused), BAD_REQUESTS // 2)
        self.assertLess(max(refused), 2.0)
        self.assertLess(max(seconds for seconds, _, _ in answers), 3 + 2.0)
        for number, (_, code, body) in enumerate(answers):
            error = json.loads(body)["errors"][0]
            if code == 504:
                self.assertIn(f"nx-{number}.invalid", error["message"])

    async def test_shutdown_with_lookups_stuck(self) -> None:
        """SIGTERM with lookups queued and threads stuck in getaddrinfo exits within --shutdown-grace."""
        grace = 2.0
        server, _, _ = await self.start("--dns-timeout", "60", "--shutdown-grace", str(grace))
        flood = self.flood(server)
        await sleep(1.0)
        started = time.monotonic()
        await server.stop()
        stopped = time.monotonic() - started
        await DeferredList(flood, consumeErrors=True)
        # twistd ends with the signal that stopped it; SIGKILL would mean it had to be killed.
        self.assertEqual(server.returncode, -signal.SIGTERM, server.log_text()[-3000:])
        self.assertLess(stopped, grace + 2.0)
