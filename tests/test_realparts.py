"""The integration harness against the real processes it starts."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import tarfile

from twisted.trial.unittest import TestCase

from tests.realparts import (
    DOCKER_LIST,
    OCI_INDEX,
    Server,
    SkopeoError,
    build_docker_list,
    build_oci_index,
    digest_of,
    free_port,
    http_request,
    make_ca,
    push,
    registry_manifest_digest,
    registry_request,
    skopeo_copy_all,
    start_registry,
    start_token_issuer,
    twistd_command,
)


class PlainRegistryTests(TestCase):
    """A plain HTTP registry on a free port."""

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)

    async def test_push_oci_index_preserves_digests(self) -> None:
        """An OCI index pushed with skopeo reads back with the digests it was built with."""
        image = build_oci_index(os.path.join(self.base, "image"))
        registry = await start_registry(os.path.join(self.base, "registry"), test=self)
        await push(image, registry, "team/app", "v1")
        self.assertEqual(await registry_manifest_digest(registry, "team/app", "v1"), image.digest)
        for digest in image.manifests.values():
            self.assertEqual(await registry_manifest_digest(registry, "team/app", digest), digest)
        pulled = await skopeo_copy_all(f"{registry.host}/team/app:v1", os.path.join(self.base, "pulled"))
        self.assertEqual((pulled.digest, pulled.media_type, pulled.manifests),
                         (image.digest, OCI_INDEX, image.manifests))
        self.assertEqual(pulled.blobs, image.blobs)

    async def test_push_docker_list_preserves_digests(self) -> None:
        """A Docker manifest list pushed from a dir: directory reads back with its digests."""
        image = build_docker_list(os.path.join(self.base, "image"))
        registry = await start_registry(os.path.join(self.base, "registry"), test=self)
        await push(image, registry, "app", "latest")
        self.assertEqual(await registry_manifest_digest(registry, "app", "latest"), image.digest)
        pulled = await skopeo_copy_all(f"{registry.host}/app:latest", os.path.join(self.base, "pulled"))
        self.assertEqual((pulled.digest, pulled.media_type, pulled.manifests),
                         (image.digest, DOCKER_LIST, image.manifests))
        self.assertEqual(pulled.blobs, image.blobs)


class SecureRegistryTests(TestCase):
    """TLS registries on 127.0.0.N:443 with basic auth, client certificates or tokens."""

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.ca = make_ca(os.path.join(self.base, "ca"), "upstream")
        self.image = build_oci_index(os.path.join(self.base, "image"), layer_sizes=(512,))

    async def test_tls_basic_auth_on_443(self) -> None:
        """A TLS registry with htpasswd on 127.0.0.5:443 takes a push with the right password only."""
        registry = await start_registry(
            os.path.join(self.base, "registry"), test=self, address="127.0.0.5", port=443,
            tls=self.ca.issue_server("127.0.0.5", "registry.test"),
            htpasswd_users={"alice": "s3cret"})
        self.assertEqual((registry.host, registry.url), ("127.0.0.5", "https://127.0.0.5"))
        certs = self.ca.cert_dir(os.path.join(self.base, "certs"))
        with self.assertRaises(SkopeoError) as e:
            await push(self.image, registry, "app", "v1", creds=("alice", "wrong"), cert_dir=certs)
        self.assertIn("unauthorized", str(e.exception))
        await push(self.image, registry, "app", "v1", creds=("alice", "s3cret"), cert_dir=certs)
        digest = await registry_manifest_digest(registry, "app", "v1", creds=("alice", "s3cret"),
                                                cert_dir=certs)
        self.assertEqual(digest, self.image.digest)

    async def test_client_certificate_required(self) -> None:
        """A registry with client CAs refuses a push without a client certificate and takes one with it."""
        registry = await start_registry(
            os.path.join(self.base, "registry"), test=self, address="127.0.0.6", port=443,
            tls=self.ca.issue_server("127.0.0.6"), client_ca=self.ca.cert_path)
        without = self.ca.cert_dir(os.path.join(self.base, "ca-only"))
        with self.assertRaises(SkopeoError) as e:
            await push(self.image, registry, "app", "v1", cert_dir=without)
        self.assertIn("bad certificate", str(e.exception))
        with_client = self.ca.cert_dir(os.path.join(self.base, "mtls"), client="puller")
        await push(self.image, registry, "app", "v1", cert_dir=with_client)
        digest = await registry_manifest_digest(registry, "app", "v1", cert_dir=with_client)
        self.assertEqual(digest, self.image.digest)

    async def test_token_auth(self) -> None:
        """A registry with token auth accepts a push whose tokens came from the issuer, which saw the scopes."""
        issuer = await start_token_issuer(os.path.join(self.base, "issuer"), test=self,
                                          users={"bob": "hunter2"}, expires_in=120)
        registry = await start_registry(
            os.path.join(self.base, "registry"), test=self, address="127.0.0.7", port=443,
            tls=self.ca.issue_server("127.0.0.7"), token=issuer)
        certs = self.ca.cert_dir(os.path.join(self.base, "certs"))
        response, _ = await registry_request(registry, "GET", "/v2/", cert_dir=certs)
        self.assertEqual(response.code, 401)
        challenge = response.headers.getRawHeaders("www-authenticate")[0]
        self.assertIn(f'realm="{issuer.realm}"', challenge)
        with self.assertRaises(SkopeoError) as e:
            await push(self.image, registry, "team/app", "v1", creds=("bob", "nope"), cert_dir=certs)
        self.assertIn("invalid username/password", str(e.exception))
        self.assertNotIn("nope", str(e.exception))
        await push(self.image, registry, "team/app", "v1", creds=("bob", "hunter2"), cert_dir=certs)
        scope = "repository:team/app:pull,push"
        self.assertEqual(issuer.requests, [("GET", "", None), ("GET", scope, "bob"), ("GET", scope, "bob")])
        digest = await registry_manifest_digest(registry, "team/app", "v1", creds=("bob", "hunter2"),
                                                cert_dir=certs)
        self.assertEqual(digest, self.image.digest)

    async def test_token_password_grant(self) -> None:
        """A token from an OAuth2 password grant (POST) opens the registry; a wrong password gets 401."""
        issuer = await start_token_issuer(os.path.join(self.base, "issuer"), test=self,
                                          users={"bob": "hunter2"})
        registry = await start_registry(os.path.join(self.base, "registry"), test=self, token=issuer)
        form = {"grant_type": "password", "service": issuer.service, "client_id": "test",
                "scope": "repository:app:pull", "username": "bob", "password": "wrong"}
        response, _ = await http_request("POST", issuer.realm, data=form)
        self.assertEqual(response.code, 401)
        response, body = await http_request("POST", issuer.realm, data={**form, "password": "hunter2"})
        self.assertEqual(response.code, 200)
        token = json.loads(body)["access_token"]
        self.assertEqual(issuer.requests[-1], ("POST", "repository:app:pull", "bob"))
        response, _ = await http_request("GET", registry.url + "/v2/app/tags/list",
                                         headers={"Authorization": f"Bearer {token}"})
        self.assertEqual(response.code, 404)
        response, _ = await http_request("GET", registry.url + "/v2/app/tags/list",
                                         headers={"Authorization": "Bearer x.y.z"})
        self.assertEqual(response.code, 401)


class AccessLogTests(TestCase):
    """Counting upstream requests from distribution's access log, across a restart."""

    async def test_count_requests_across_restart(self) -> None:
        """A blob GET through treq is counted once, and the count and storage survive a restart on port 80."""
        base = os.path.abspath(self.mktemp())
        image = build_oci_index(os.path.join(base, "image"), platforms=[("linux", "amd64")],
                                layer_sizes=(4096,))
        registry = await start_registry(os.path.join(base, "registry"), test=self,
                                        address="127.0.0.8", port=80)
        self.assertEqual((registry.host, registry.url), ("127.0.0.8", "http://127.0.0.8"))
        await push(image, registry, "app", "v1")
        layer = next(d for d, size in image.blobs.items() if size > 4096)
        await registry.settled()
        self.assertEqual(registry.count_requests("GET", layer), 0)
        response, body = await registry_request(registry, "GET", f"/v2/app/blobs/{layer}")
        self.assertEqual((response.code, digest_of(body)), (200, layer))
        await registry.settled()
        self.assertEqual(registry.count_requests("GET", layer), 1)
        self.assertEqual(registry.count_requests("GET", f"/v2/app/blobs/{layer}", status=200), 1)
        await registry.stop()
        self.assertFalse(registry.running)
        with self.assertRaises(Exception):
            await registry_request(registry, "GET", "/v2/")
        await registry.start()
        response, _ = await registry_request(registry, "HEAD", f"/v2/app/blobs/{layer}")
        self.assertEqual(response.code, 200)
        await registry.settled()
        self.assertEqual(registry.count_requests("GET", layer), 1)
        self.assertEqual(registry.count_requests("HEAD", layer, status=200), 1)


class ImageBuilderTests(TestCase):
    """The images the tests build are what they claim to be."""

    def test_large_layer_is_a_tar_of_the_requested_size(self) -> None:
        """A 64 MiB layer is streamed to disk as a tar holding that many bytes, under its digest."""
        base = os.path.abspath(self.mktemp())
        image = build_oci_index(base, large_layer=64 << 20)
        assert image.large_layer is not None
        path = image.blob_path(image.large_layer)
        self.assertEqual(os.path.getsize(path), image.blobs[image.large_layer])
        hasher = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                hasher.update(chunk)
        self.assertEqual("sha256:" + hasher.hexdigest(), image.large_layer)
        with tarfile.open(path) as tar:
            self.assertEqual([m.size for m in tar.getmembers()], [64 << 20])
        index = json.loads(image.manifest_bytes(image.digest))
        self.assertEqual([m["digest"] for m in index["manifests"]], list(image.manifests.values()))
        self.assertEqual(list(image.manifests), ["linux/amd64", "linux/arm64"])

    def test_docker_layers_are_gzip_tars_with_matching_diff_ids(self) -> None:
        """Docker list layers are gzip tars whose uncompressed digests are the config's diff_ids."""
        image = build_docker_list(os.path.abspath(self.mktemp()), platforms=[("linux", "arm64", "v8")])
        self.assertEqual(list(image.manifests), ["linux/arm64/v8"])
        (manifest_digest,) = image.manifests.values()
        manifest = json.loads(image.manifest_bytes(manifest_digest))
        with open(image.blob_path(manifest["config"]["digest"]), "rb") as f:
            config = json.loads(f.read())
        diff_ids = []
        for layer in manifest["layers"]:
            with gzip.open(image.blob_path(layer["digest"]), "rb") as f:
                diff_ids.append(digest_of(f.read()))
        self.assertEqual(config["rootfs"]["diff_ids"], diff_ids)
        self.assertEqual(config["architecture"], "arm64")


class _StandIn(Server):
    """twistd's own web plugin in place of the server under test."""

    def command(self) -> list[str]:
        """Serve the run directory with `twistd web`."""
        return twistd_command("web", "--listen", f"tcp:{self.port}:interface=127.0.0.1",
                              "--path", self.run_dir)


class LauncherTests(TestCase):
    """The twistd launcher: start, answer, stop, restart, kill, log."""

    async def test_start_stop_restart_kill(self) -> None:
        """A twistd process answers /v2/ once started, stops on SIGTERM, restarts on its port, dies on SIGKILL."""
        run_dir = os.path.abspath(self.mktemp())
        os.makedirs(run_dir)
        server = _StandIn(os.path.join(run_dir, "cache"), (), free_port(), run_dir)
        self.addCleanup(server.stop)
        await server.start()
        self.assertTrue(server.running)
        response, _ = await http_request("GET", server.url + "/v2/")
        self.assertEqual(response.code, 404)
        await server.stop()
        self.assertFalse(server.running)
        self.assertEqual(server.returncode, -signal.SIGTERM)
        with self.assertRaises(Exception):
            await http_request("GET", server.url + "/v2/")
        await server.start()
        response, _ = await http_request("GET", server.url + "/v2/")
        self.assertEqual(response.code, 404)
        await server.kill()
        self.assertEqual(server.returncode, -signal.SIGKILL)
        self.assertEqual(server.log_text().count(f"Site starting on {server.port}"), 2)

    async def test_start_failure_reports_the_log(self) -> None:
        """A twistd that exits at once makes start() fail with its output."""
        run_dir = os.path.abspath(self.mktemp())
        os.makedirs(run_dir)
        server = Server(run_dir, ("--no-such-option",), free_port(), run_dir)
        self.addCleanup(server.stop)
        with self.assertRaises(RuntimeError) as caught:
            await server.start()
        self.assertIn("exited", str(caught.exception))
        self.assertFalse(server.running)
