"""Running for years: HTTPS to clients, /health, /metrics, SIGTERM and SIGHUP, under twistd."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import time

from prometheus_client.parser import text_string_to_metric_families
from twisted.logger import formatEvent

from tests.fakes import Behaviour, FakeRegistry, digest_of, listen, make_image, wait
from tests.realparts import (
    WorkspaceTestCase,
    SkopeoError,
    WebClient,
    build_oci_index,
    free_port,
    http_request,
    make_ca,
    push,
    skopeo_copy_all,
    start_registry,
    start_server,
)
from tests.test_integration import Puller


class ServiceTests(WorkspaceTestCase):
    """The server as an operator runs it."""


    async def test_https_and_client_certificates(self) -> None:
        """skopeo pulls over HTTPS with the test CA; with clientAuth verify, only a client with a certificate may."""
        registry = await start_registry(self.path("registry"), test=self)
        image = build_oci_index(self.path("image"), platforms=[("linux", "amd64")], layer_sizes=(300,))
        await push(image, registry, "app", "v1")
        ca = make_ca(self.path("ca"), "mirror")
        cert, key = ca.issue_server("127.0.0.1")
        tls_port = free_port()
        server = await start_server(self.path("cache"), test=self, args=(
            "--config-file", self.config([{"name": registry.host, "scheme": "http"}]), "--default-ns", registry.host,
            "--tls-cert", cert, "--tls-key", key, "--tls-port", str(tls_port)))
        trusted = ca.cert_dir(self.path("trust"))
        pulled = await skopeo_copy_all(f"127.0.0.1:{tls_port}/app:v1", self.path("pulled"), src_tls_verify=True,
                                       cert_dir=trusted)
        self.assertEqual((pulled.digest, pulled.blobs), (image.digest, image.blobs))
        self.assertIn("TLS: server certificate", server.log_text())

        await server.stop()
        server.args += ["--tls-ca", ca.cert_path, "--tls-client-auth", "verify"]
        await server.start()
        with self.assertRaises(SkopeoError):
            await skopeo_copy_all(f"127.0.0.1:{tls_port}/app:v1", self.path("refused"), src_tls_verify=True,
                                  cert_dir=trusted)
        with_client = ca.cert_dir(self.path("mtls"), client="node-1")
        pulled = await skopeo_copy_all(f"127.0.0.1:{tls_port}/app:v1", self.path("accepted"), src_tls_verify=True,
                                       cert_dir=with_client)
        self.assertEqual(pulled.digest, image.digest)

    async def test_metrics_and_health(self) -> None:
        """After a scripted pull /metrics counts it; /health turns 503 when the image path cannot be written."""
        registry = await start_registry(self.path("registry"), test=self)
        image = build_oci_index(self.path("image"), platforms=[("linux", "amd64")], layer_sizes=(300, 400))
        await push(image, registry, "app", "v1")
        server = await start_server(self.path("cache"), test=self, args=(
            "--config-file", self.config([{"name": registry.host, "scheme": "http"}])))
        puller = Puller(self, server)
        await puller.pull(registry.host, "app", "v1")
        await puller.pull(registry.host, "app", "v1")
        response, body = await http_request("GET", server.url + "/metrics")
        self.assertEqual(response.code, 200)
        samples = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        blobs = len(image.blobs)
        # Each pull: HEAD of the tag, GET of the index, GET of the platform manifest, GET of each blob.
        self.assertEqual(samples[("ociregistry_manifest_pulls_total", ())], 6)
        self.assertEqual(samples[("ociregistry_blob_pulls_total", ())], 2 * blobs)
        self.assertEqual(samples[("ociregistry_api_errors_total", ())], 0)
        ns = (("ns", registry.host),)
        cached = samples[("ociregistry_cached_pulls_by_ns_total", ns)]
        upstream = samples[("ociregistry_upstream_pulls_by_ns", ns)]
        self.assertEqual(cached + upstream, 6 + 2 * blobs)
        # The second pull is all cache hits; the first fetched at least the tag and the platform manifest.
        self.assertGreaterEqual(cached, 3 + blobs)
        self.assertGreaterEqual(upstream, 2)
        self.assertGreaterEqual(samples[("ociregistry_bytes_fetched_total", (("registry", registry.host),))],
                                sum(image.blobs.values()))
        self.assertEqual(samples[("ociregistry_downloads_in_flight", ())], 0)

        response, body = await http_request("GET", server.url + "/health")
        self.assertEqual((response.code, json.loads(body)["status"]), (200, "ok"))
        tmp = os.path.join(server.image_path, "tmp")
        shutil.rmtree(tmp)
        with open(tmp, "w") as f:
            f.write("not a directory")
        response, body = await http_request("GET", server.url + "/health")
        self.assertEqual(response.code, 503)
        self.assertIn("not writable", json.loads(body)["problem"])
        os.unlink(tmp)
        os.makedirs(tmp)
        response, _ = await http_request("GET", server.url + "/health")
        self.assertEqual(response.code, 200)

    async def test_health_and_metrics_ports(self) -> None:
        """--health and --metrics serve on their own ports; /metrics then leaves the main listener."""
        health, metrics = free_port(), free_port()
        server = await start_server(self.path("cache"), test=self,
                                    args=("--health", str(health), "--metrics", str(metrics), "--host", "127.0.0.1"))
        response, body = await http_request("GET", f"http://127.0.0.1:{health}/health")
        self.assertEqual((response.code, json.loads(body)["status"]), (200, "ok"))
        response, body = await http_request("GET", f"http://127.0.0.1:{metrics}/metrics")
        self.assertEqual(response.code, 200)
        self.assertIn(b"ociregistry_cached_manifest_count", body)
        response, _ = await http_request("GET", server.url + "/metrics")
        self.assertEqual(response.code, 404)
        response, _ = await http_request("GET", server.url + "/health")
        self.assertEqual(response.code, 200)

    async def test_sigterm_during_download(self) -> None:
        """SIGTERM mid-download: exit within the grace period, a sound index, no temporary file, committed data kept."""
        upstream = FakeRegistry()
        port, listening = await listen(upstream)
        self.addCleanup(listening.stopListening)
        registry = f"127.0.0.1:{port}"
        image = make_image(b"small layer")
        upstream.add_image("app", "v1", image)
        big = os.urandom(8 * 1024 * 1024)
        upstream.blobs[digest_of(big)] = big
        upstream.behaviour[digest_of(big)] = Behaviour(chunk=64 * 1024, delay=0.05)
        server = await start_server(self.path("cache"), test=self, args=(
            "--config-file", self.config([{"name": registry, "scheme": "http"}]), "--shutdown-grace", "2"))
        web = WebClient()
        self.addCleanup(web.close)
        response = await web.client.get(f"{server.url}/v2/app/manifests/v1?ns={registry}")
        self.assertEqual(response.code, 200)
        await response.content()
        for digest in image.blobs:
            response = await web.client.get(f"{server.url}/v2/app/blobs/{digest}?ns={registry}")
            await response.content()
        slow = web.client.get(f"{server.url}/v2/app/blobs/{digest_of(big)}?ns={registry}")
        await wait(1.0)
        started = time.monotonic()
        os.kill(server.pid, signal.SIGTERM)
        while server.running and time.monotonic() - started < 10:
            await wait(0.05)
        self.assertLess(time.monotonic() - started, 4.0)
        self.assertFalse(server.running)
        try:
            await slow
        except Exception:
            pass
        self.assertEqual(os.listdir(os.path.join(server.image_path, "tmp")), [])
        db = sqlite3.connect(os.path.join(server.image_path, "index.db"))
        self.assertEqual(db.execute("PRAGMA integrity_check").fetchone(), ("ok",))
        self.assertIsNone(db.execute("SELECT 1 FROM blobs WHERE digest = ?", (digest_of(big),)).fetchone())
        db.close()
        await listening.stopListening()
        await server.start()
        for digest, content in image.blobs.items():
            response = await web.client.get(f"{server.url}/v2/app/blobs/{digest}?ns={registry}")
            self.assertEqual(await response.content(), content)
        response = await web.client.get(f"{server.url}/v2/app/manifests/v1?ns={registry}")
        self.assertEqual(await response.content(), image.manifest)
        self.assertIn("Shutting down with", server.log_text())


class OperationsTests(WorkspaceTestCase):
    """Logs for machines, and certificates renewed without a restart."""


    async def test_json_log_and_level(self) -> None:
        """--log-format json writes one JSON event per line; --log-level warn leaves the info events out."""
        server = await start_server(os.path.join(self.base, "cache"), test=self, args=("--log-format", "json"))
        await http_request("GET", server.url + "/v2/")
        await server.stop()
        events = [json.loads(line.strip("\x1e")) for line in server.log_text().splitlines() if line.strip("\x1e ")]
        texts = [formatEvent(event) for event in events]
        self.assertTrue([t for t in texts if "GET /v2/ 200" in t], "the access line is logged at info")
        self.assertTrue([t for t in texts if "image path" in t], "the banner is logged at info")
        before = len(server.log_text())
        server.args = ["--log-level", "warn"]
        await server.start()
        await http_request("GET", server.url + "/v2/")
        await server.stop()
        self.assertNotIn("GET /v2/ 200", server.log_text()[before:])

    async def test_sighup_reloads_certificates(self) -> None:
        """After the certificate files change, SIGHUP makes new connections use the new certificate."""
        first, second = make_ca(os.path.join(self.base, "ca1"), "one"), make_ca(os.path.join(self.base, "ca2"), "two")
        cert, key = first.issue_server("127.0.0.1")
        live_cert, live_key = os.path.join(self.base, "server.crt"), os.path.join(self.base, "server.key")
        shutil.copyfile(cert, live_cert)
        shutil.copyfile(key, live_key)
        tls_port = free_port()
        server = await start_server(os.path.join(self.base, "cache"), test=self, args=(
            "--tls-cert", live_cert, "--tls-key", live_key, "--tls-port", str(tls_port)))
        url = f"https://127.0.0.1:{tls_port}/v2/"
        trust_first = first.cert_dir(os.path.join(self.base, "trust1"))
        trust_second = second.cert_dir(os.path.join(self.base, "trust2"))
        response, _ = await http_request("GET", url, cert_dir=trust_first)
        self.assertEqual(response.code, 200)
        cert, key = second.issue_server("127.0.0.1")
        shutil.copyfile(cert, live_cert)
        shutil.copyfile(key, live_key)
        os.kill(server.pid, signal.SIGHUP)
        await wait(0.5)
        response, _ = await http_request("GET", url, cert_dir=trust_second)
        self.assertEqual(response.code, 200)
        with self.assertRaises(Exception):
            await http_request("GET", url, cert_dir=trust_first)
        self.assertIn("Reloaded TLS certificates", server.log_text())
