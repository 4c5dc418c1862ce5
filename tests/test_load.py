"""Loading the cache: image lists through the pull path, tarballs, and the Go server's image store."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from typing import Any

import yaml

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from ociregistry.config import RegistrySettings
from ociregistry.errors import OCIError
from ociregistry.load import (
    Importer,
    Loaded,
    Loader,
    LoadError,
    Platform,
    PreloadService,
    load_files,
    parse_reference,
    threaded_store,
)
from ociregistry.metrics import Metrics
from ociregistry.tap import ServerConfig, open_cache
from tests.fakes import OCI_INDEX, OCI_MANIFEST, FakeRegistry, Image, connection_of, digest_of, listen, make_image
from tests.realparts import PROJECT_ROOT, ImageSet, WorkspaceTestCase, build_oci_index, push, skopeo_copy_all, start_registry, start_server

DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"


async def run_cli(*args: str, wrapper: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run ``python -m ociregistry.cli`` from this tree without blocking the reactor."""
    env = {**os.environ, "PYTHONPATH": PROJECT_ROOT, "TZ": "UTC"}
    command = [*wrapper, sys.executable, "-m", "ociregistry.cli", *args]
    out, err, code = await getProcessOutputAndValue(shutil.which(command[0]) or command[0], command[1:], env=env)
    return subprocess.CompletedProcess(command, code, out.decode(), err.decode())


def platform_index(entries: list[tuple[Image, dict[str, str]]]) -> bytes:
    """An OCI index of images with the given platforms."""
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": image.digest, "size": len(image.manifest), "platform": platform}
        for image, platform in entries]}).encode()


def add_tar_member(tar: tarfile.TarFile, name: str, content: bytes) -> None:
    """Add a file to a tarball being written."""
    info = tarfile.TarInfo(name)
    info.size = len(content)
    tar.addfile(info, io.BytesIO(content))


def oci_layout_tarball(path: str, images: list[tuple[Image, dict[str, str]]], ref_name: str | None,
                       compress: bool = False) -> str:
    """An OCI image layout holding an index of the images, written as a tarball; returns the index digest."""
    index = platform_index(images)
    annotations = {"org.opencontainers.image.ref.name": ref_name} if ref_name else {}
    with tarfile.open(path, "w:gz" if compress else "w") as tar:
        add_tar_member(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        for image, _ in images:
            for content in [image.manifest, image.config, *image.layers]:
                add_tar_member(tar, f"blobs/sha256/{digest_of(content)[7:]}", content)
        add_tar_member(tar, f"blobs/sha256/{digest_of(index)[7:]}", index)
        add_tar_member(tar, "index.json", json.dumps({"schemaVersion": 2, "manifests": [
            {"mediaType": OCI_INDEX, "digest": digest_of(index), "size": len(index),
             "annotations": annotations}]}).encode())
    return digest_of(index)


def docker_save_tarball(path: str, repo_tags: list[str], config: bytes, layers: list[bytes]) -> None:
    """A legacy ``docker save`` archive: manifest.json, <id>.json, <id>/layer.tar."""
    with tarfile.open(path, "w") as tar:
        names = []
        for number, layer in enumerate(layers):
            names.append(f"{number:064x}/layer.tar")
            add_tar_member(tar, names[-1], layer)
        config_name = f"{digest_of(config)[7:]}.json"
        add_tar_member(tar, config_name, config)
        add_tar_member(tar, "manifest.json", json.dumps(
            [{"Config": config_name, "RepoTags": repo_tags, "Layers": names}]).encode())


class LoadTests(TestCase):
    """A real reactor, a cache on disk, a fake upstream on loopback."""

    async def start(self, platform: Platform | None = Platform("linux", "amd64")) -> None:
        self.upstream = FakeRegistry()
        port, listening = await listen(self.upstream)
        self.addCleanup(listening.stopListening)
        self.registry = f"127.0.0.1:{port}"
        self.image_path = os.path.abspath(self.mktemp())
        config = ServerConfig(image_path=self.image_path, listen=(), default_ns=self.registry,
                              registries=(RegistrySettings(name=self.registry, scheme="http"),),
                              pull_timeout=5.0, max_manifest_size=8 << 20)
        self.cache, self.server_index, _ = open_cache(config, reactor, Metrics())
        self.index = connection_of(self.server_index)
        self.addCleanup(lambda: Deferred.fromCoroutine(self.cache.close()))
        self.store = threaded_store(self.image_path, reactor)
        self.loader = Loader(self.cache, self.server_index, self.store, platform, self.registry)

    def files(self) -> list[str]:
        """Every file under blobs/."""
        return [name for _, _, names in os.walk(os.path.join(self.image_path, "blobs")) for name in names]

    def cached_blobs(self) -> set[str]:
        return {digest for digest, _, kind in self.index.stored_objects() if kind == "blob"}

    def test_parse_reference(self) -> None:
        """References default to docker.io/library and latest; a digest wins over a tag; bad ones are named."""
        where, ref = parse_reference("nginx", "docker.io")
        self.assertEqual((where.registry, where.repository, ref), ("docker.io", "library/nginx", "latest"))
        where, ref = parse_reference("quay.io/a/b:v1@sha256:" + "a" * 64, "docker.io")
        self.assertEqual((where.registry, where.repository, ref), ("quay.io", "a/b", "sha256:" + "a" * 64))
        where, ref = parse_reference("127.0.0.1:5000/app:V1.0", "docker.io")
        self.assertEqual((where.registry, where.repository, ref), ("127.0.0.1:5000", "app", "V1.0"))
        with self.assertRaises(LoadError) as caught:
            parse_reference("Bad/Name", "docker.io")
        self.assertIn("Bad/Name", str(caught.exception))

    def test_platform_matching(self) -> None:
        """Variants are told apart (arm/v7 vs arm/v6); arm64 without a variant is v8."""
        self.assertTrue(Platform("linux", "arm", "v7").matches("linux/arm/v7"))
        self.assertFalse(Platform("linux", "arm", "v7").matches("linux/arm/v6"))
        self.assertTrue(Platform("linux", "arm64", "v8").matches("linux/arm64"))
        self.assertTrue(Platform("linux", "arm").matches("linux/arm/v6"))
        self.assertFalse(Platform("linux", "amd64").matches("windows/amd64"))
        self.assertFalse(Platform("linux", "amd64").matches(None))

    async def test_list_keeps_index_and_chosen_platform(self) -> None:
        """Loading a multi-arch tag caches the index under the tag, the chosen platform and its blobs only."""
        await self.start(Platform("linux", "arm", "v6"))
        v6, v7, amd = make_image(b"v6 layer"), make_image(b"v7 layer"), make_image(b"amd layer")
        index = platform_index([(amd, {"os": "linux", "architecture": "amd64"}),
                                (v6, {"os": "linux", "architecture": "arm", "variant": "v6"}),
                                (v7, {"os": "linux", "architecture": "arm", "variant": "v7"})])
        self.upstream.add_manifest("team/app", "1.0", OCI_INDEX, index)
        for image in (v6, v7, amd):
            self.upstream.add_manifest("team/app", image.digest, OCI_MANIFEST, image.manifest)
            self.upstream.blobs.update(image.blobs)
        loaded = await self.loader.load_reference(f"{self.registry}/team/app:1.0")
        self.assertEqual(loaded, Loaded(f"{self.registry}/team/app:1.0", digest_of(index), 2, 2))
        record = self.index.manifest_for_tag(self.registry, "team/app", "1.0")
        assert record is not None
        self.assertEqual((record.digest, record.media_type), (digest_of(index), OCI_INDEX))
        self.assertIsNotNone(self.index.manifest(v6.digest))
        self.assertIsNone(self.index.manifest(v7.digest))
        self.assertEqual(self.cached_blobs(), set(v6.blobs))
        for digest, content in v6.blobs.items():
            with open(self.store.path_for(digest), "rb") as f:
                self.assertEqual(f.read(), content)

    async def test_all_platforms_and_missing_platform(self) -> None:
        """--all-platforms caches every platform; a platform the index lacks is a clear error."""
        await self.start(None)
        amd, arm = make_image(b"amd"), make_image(b"arm")
        index = platform_index([(amd, {"os": "linux", "architecture": "amd64"}),
                                (arm, {"os": "linux", "architecture": "arm64"})])
        self.upstream.add_manifest("app", "latest", OCI_INDEX, index)
        for image in (amd, arm):
            self.upstream.add_manifest("app", image.digest, OCI_MANIFEST, image.manifest)
            self.upstream.blobs.update(image.blobs)
        loaded = await self.loader.load_reference("app")
        self.assertEqual((loaded.manifests, loaded.blobs), (3, 3))
        self.assertEqual(self.cached_blobs(), set(amd.blobs) | set(arm.blobs))
        loader = Loader(self.cache, self.server_index, self.store, Platform("linux", "s390x"), self.registry)
        with self.assertRaises(LoadError) as caught:
            await loader.load_reference("app")
        self.assertIn("linux/amd64, linux/arm64", str(caught.exception))

    async def test_image_list_file_with_failures(self) -> None:
        """An image list with comments loads every good line and reports the bad ones."""
        await self.start()
        good = make_image(b"good layer" * 100)
        self.upstream.add_image("good", "v1", good)
        listing = os.path.join(self.image_path, "images.txt")
        with open(listing, "w") as f:
            f.write(f"# images for the edge\n{self.registry}/good:v1  # pinned\n\n{self.registry}/missing:v1\n")
        reports: list[tuple[str, Any]] = []
        failures = await load_files(self.loader, [listing], 2, lambda name, r: reports.append((name, r)))
        self.assertEqual(failures, 1)
        outcome = {name: isinstance(result, Loaded) for name, result in reports}
        self.assertEqual(outcome, {f"{self.registry}/good:v1": True, f"{self.registry}/missing:v1": False})
        self.assertEqual(self.cached_blobs(), set(good.blobs))

    async def test_oci_layout_tarball(self) -> None:
        """A gzip OCI-layout tarball is stored verified, named by --name, with every platform it holds."""
        await self.start()
        amd, arm = make_image(b"amd" * 1000), make_image(b"arm" * 1000)
        path = os.path.join(self.image_path, "layout.tar.gz")
        top = oci_layout_tarball(path, [(amd, {"os": "linux", "architecture": "amd64"}),
                                        (arm, {"os": "linux", "architecture": "arm64"})], "v2", compress=True)
        with self.assertRaises(LoadError) as caught:
            await self.loader.load_tarball(path)
        self.assertIn("--name", str(caught.exception))
        self.assertEqual(self.files(), [])
        loaded = await self.loader.load_tarball(path, "quay.io/team/app")
        self.assertEqual(loaded, [Loaded("quay.io/team/app:v2", top, 3, 4)])
        record = self.index.manifest_for_tag("quay.io", "team/app", "v2")
        assert record is not None
        self.assertEqual(record.digest, top)
        self.assertEqual(self.cached_blobs(), set(amd.blobs) | set(arm.blobs))

    async def test_tarball_with_wrong_content(self) -> None:
        """A tarball member whose bytes do not match its digest is refused and leaves nothing behind."""
        await self.start()
        image = make_image(b"layer")
        path = os.path.join(self.image_path, "bad.tar")
        with tarfile.open(path, "w") as tar:
            add_tar_member(tar, "oci-layout", b"{}")
            add_tar_member(tar, f"blobs/sha256/{image.digest[7:]}", image.manifest)
            add_tar_member(tar, f"blobs/sha256/{digest_of(image.config)[7:]}", b"not the config")
        with self.assertRaises(LoadError) as caught:
            await self.loader.load_tarball(path, "quay.io/x")
        self.assertIn("hashes to", str(caught.exception))
        self.assertEqual(self.index.stored_objects(), [])
        self.assertEqual(self.files(), [])
        self.assertEqual(os.listdir(os.path.join(self.image_path, "tmp")), [])

    async def test_docker_save_tarball(self) -> None:
        """A legacy docker save archive becomes a Docker schema 2 image under each of its RepoTags."""
        await self.start()
        config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers"}}'
        layers = [b"plain tar layer" * 50, gzip.compress(b"zipped layer")]
        path = os.path.join(self.image_path, "saved.tar")
        docker_save_tarball(path, ["nginx:1.25", "registry.example.com/web/nginx:stable"], config, layers)
        loaded = await self.loader.load_tarball(path)
        self.assertEqual([item.name for item in loaded],
                         ["docker.io/library/nginx:1.25", "registry.example.com/web/nginx:stable"])
        digest = loaded[0].digest
        content = self.store.read(digest)
        assert content is not None
        manifest = json.loads(content)
        self.assertEqual(manifest["config"]["digest"], digest_of(config))
        self.assertEqual([(layer["digest"], layer["mediaType"]) for layer in manifest["layers"]], [
            (digest_of(layers[0]), "application/vnd.docker.image.rootfs.diff.tar"),
            (digest_of(layers[1]), "application/vnd.docker.image.rootfs.diff.tar.gzip")])
        for registry, repository, tag in [("docker.io", "library/nginx", "1.25"),
                                          ("registry.example.com", "web/nginx", "stable")]:
            record = self.index.manifest_for_tag(registry, repository, tag)
            assert record is not None
            self.assertEqual(record.digest, digest)
        self.assertEqual(self.cached_blobs(), {digest_of(config), *map(digest_of, layers)})

    async def test_preload_service_accepts_after_loading(self) -> None:
        """The listeners' ports are bound at the privileged start, and accept only once the files are loaded."""
        await self.start()
        image = make_image(b"preloaded layer")
        self.upstream.add_image("app", "v1", image)
        listing = os.path.join(self.image_path, "preload.txt")
        with open(listing, "w") as f:
            f.write(f"{self.registry}/app:v1\n{self.registry}/absent:v1\n")
        service = PreloadService(self.loader, [listing])
        port = HeldPort()
        StreamServerEndpointService(service.hold(PortEndpoint(port)), Factory()).setServiceParent(service)
        service.privilegedStartService()
        self.assertEqual(port.events, ["listening", "paused"])
        service.startService()
        self.assertEqual(port.events, ["listening", "paused"])
        assert service._loading is not None
        await service._loading
        self.assertEqual(port.events, ["listening", "paused", "accepting"])
        self.assertEqual(self.cached_blobs(), set(image.blobs))
        await service.stopService()
        self.assertEqual(port.events[-1], "closed")
        unstarted = PreloadService(self.loader, [listing])
        port = HeldPort()
        StreamServerEndpointService(unstarted.hold(PortEndpoint(port)), Factory()).setServiceParent(unstarted)
        unstarted.startService()
        await unstarted.stopService()
        self.assertTrue(unstarted._loading is not None and unstarted._loading.called)
        self.assertEqual(port.events, ["listening", "paused", "closed"])
        with self.assertRaises(OCIError):
            await self.loader.load_reference(f"{self.registry}/absent:v1")


class HeldPort:
    """A listening port that records whether it accepts connections."""

    def __init__(self) -> None:
        self.events = ["listening"]

    def stopReading(self) -> None:
        self.events.append("paused")

    def startReading(self) -> None:
        self.events.append("accepting")

    def stopListening(self) -> None:
        self.events.append("closed")


class PortEndpoint:
    """An endpoint whose listen gives a HeldPort."""

    def __init__(self, port: HeldPort) -> None:
        self.port = port

    def listen(self, factory: Any) -> Deferred[HeldPort]:
        return succeed(self.port)


def go_holder(url: str, content: bytes, created: str = "2024-03-01T10:00:00",
              pulled: str = "2024-04-01T10:00:00") -> dict[str, Any]:
    """A manifest file as the Go server writes it (imgpull's ManifestHolder)."""
    return {"type": 3, "digest": hashlib.sha256(content).hexdigest(), "imageUrl": url,
            "bytes": base64.b64encode(content).decode(), "v1.oci.manifest": json.loads(content),
            "created": created, "pulled": pulled}


def write_go_store(directory: str, holders: dict[str, list[dict[str, Any]]], blobs: dict[str, bytes]) -> None:
    """Lay out a Go server image store: lts/, img/ (or fat/) holder files and flat blobs/."""
    for folder, items in holders.items():
        os.makedirs(os.path.join(directory, folder), exist_ok=True)
        for holder in items:
            with open(os.path.join(directory, folder, holder["digest"]), "w") as f:
                json.dump(holder, f)
    os.makedirs(os.path.join(directory, "blobs"), exist_ok=True)
    for digest, content in blobs.items():
        with open(os.path.join(directory, "blobs", digest[7:]), "wb") as f:
            f.write(content)


class GoCacheImportTests(TestCase):
    """The Go server's image store, imported without the network."""

    async def test_import(self) -> None:
        """Lists keep their tags, times carry over, digests are checked, and bad files are reported."""
        base = os.path.abspath(self.mktemp())
        amd, arm = make_image(b"amd" * 100), make_image(b"arm" * 100)
        index = platform_index([(amd, {"os": "linux", "architecture": "amd64"}),
                                (arm, {"os": "linux", "architecture": "arm64"})])
        tampered = go_holder("quay.io/x/y:1", arm.manifest)
        tampered["bytes"] = base64.b64encode(arm.manifest + b" ").decode()
        write_go_store(os.path.join(base, "go"), {
            "lts": [go_holder("docker.io/hello-world:latest", index)],
            "img": [go_holder(f"docker.io/hello-world@{amd.digest}", amd.manifest), tampered],
        }, amd.blobs)
        image_path = os.path.join(base, "cache")
        store = threaded_store(image_path, reactor)
        store.prepare()
        from ociregistry.index import Index
        from ociregistry.sqlite import SqliteEngine

        server = Index(SqliteEngine(os.path.join(image_path, "index.db"), reactor))
        self.addCleanup(server.close)
        db = connection_of(server)
        loaded, problems = await Importer(server, store).import_go_cache(os.path.join(base, "go"))
        self.assertEqual(sorted(item.digest for item in loaded), sorted([digest_of(index), amd.digest]))
        self.assertEqual(len(problems), 1)
        self.assertIn("hash to", problems[0])
        record = db.manifest_for_tag("docker.io", "library/hello-world", "latest")
        assert record is not None
        self.assertEqual(record.digest, digest_of(index))
        self.assertEqual(record.media_type, OCI_INDEX)
        imported = db.manifest(amd.digest)
        assert imported is not None
        self.assertEqual(imported.created[:10], "2024-03-01")
        self.assertEqual(imported.pulled[:10], "2024-04-01")
        self.assertEqual({d for d, _, kind in db.stored_objects() if kind == "blob"}, set(amd.blobs))
        with self.assertRaises(LoadError):
            await Importer(server, store).import_go_cache(base)


def go_store_from(image: ImageSet, directory: str, url: str) -> None:
    """The Go server's store holding an OCI index (by tag, in lts/) and its platform images (by digest)."""
    holders = {"lts": [go_holder(url, image.manifest_bytes(image.digest))], "img": []}
    blobs = {}
    name = url.rsplit(":", 1)[0]
    for digest in image.manifests.values():
        holders["img"].append(go_holder(f"{name}@{digest}", image.manifest_bytes(digest)))
    for digest in image.blobs:
        with open(image.blob_path(digest), "rb") as f:
            blobs[digest] = f.read()
    write_go_store(directory, holders, blobs)


def tar_directory(directory: str, path: str) -> None:
    """A gzip tarball of a directory's contents (an OCI image layout)."""
    with tarfile.open(path, "w:gz") as tar:
        for name in sorted(os.listdir(directory)):
            tar.add(os.path.join(directory, name), arcname=name)


class LoadServeTests(WorkspaceTestCase):
    """The command loads from a real upstream and from tarballs; twistd then serves skopeo with no upstream."""


    async def test_load_then_serve_offline(self) -> None:
        """An image list, an OCI-layout tarball and a docker save tarball load; all pull with the upstream gone."""
        registry = await start_registry(self.path("registry"), test=self, address="127.0.0.40", port=80)
        pushed = build_oci_index(self.path("pushed"))
        await push(pushed, registry, "team/app", "v1")
        layout = build_oci_index(self.path("layout"), platforms=[("linux", "arm", "v7")])
        tar_directory(layout.directory, self.path("layout.tar.gz"))
        config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
        docker_save_tarball(self.path("saved.tar"), ["registry.example.com/saved/app:1"], config, [b"layer" * 999])
        with open(self.path("config.yaml"), "w") as f:
            yaml.safe_dump({"registries": [{"name": registry.host, "scheme": "http"}]}, f)
        with open(self.path("images.txt"), "w") as f:
            f.write(f"# what the edge needs\n{registry.host}/team/app:v1\n")
        cache = self.path("cache")
        loaded = await run_cli("load", "--image-path", cache, "--config-file", self.path("config.yaml"),
                               "--all-platforms", self.path("images.txt"), self.path("saved.tar"))
        self.assertEqual(loaded.returncode, 0, loaded.stderr)
        self.assertIn(f"loaded {registry.host}/team/app:v1 {pushed.digest} (3 manifests, 6 blobs)", loaded.stdout)
        saved_digest = loaded.stdout.split("loaded registry.example.com/saved/app:1 ")[1].split()[0]
        named = await run_cli("load", "--image-path", cache, "--name", f"{registry.host}/layout/app",
                              self.path("layout.tar.gz"))
        self.assertEqual(named.returncode, 0, named.stderr)
        await registry.stop()
        server = await start_server(cache, test=self, args=("--config-file", self.path("config.yaml")))
        for image, name in [(pushed, f"{registry.host}/team/app:v1"), (layout, f"{registry.host}/layout/app:latest")]:
            pulled = await skopeo_copy_all(f"{server.host}/{name}", self.path(f"pulled-{name.replace('/', '_')}"))
            self.assertEqual((pulled.digest, pulled.manifests, pulled.blobs),
                             (image.digest, image.manifests, image.blobs))
        pulled = await skopeo_copy_all(f"{server.host}/registry.example.com/saved/app:1", self.path("pulled-saved"))
        self.assertEqual((pulled.digest, set(pulled.blobs)), (saved_digest, {digest_of(config), digest_of(b"layer" * 999)}))

    async def test_preload_images_option(self) -> None:
        """twistd --preload-images loads a tarball before listening (needs the option wired into tap.py)."""
        config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
        docker_save_tarball(self.path("saved.tar"), ["registry.example.com/saved/app:1"], config, [b"layer"])
        server = await start_server(self.path("cache"), test=self, args=("--preload-images", self.path("saved.tar")))
        pulled = await skopeo_copy_all(f"{server.host}/registry.example.com/saved/app:1", self.path("pulled"))
        self.assertEqual(set(pulled.blobs), {digest_of(config), digest_of(b"layer")})

    async def test_import_go_cache_serves_identically(self) -> None:
        """A Go server store imported with the command serves the same digests, air-gapped."""
        image = build_oci_index(self.path("image"))
        go_store_from(image, self.path("go"), "registry.example.com/team/app:latest")
        cache = self.path("cache")
        imported = await run_cli("import-go-cache", "--image-path", cache, "--from", self.path("go"))
        self.assertEqual(imported.returncode, 0, imported.stderr)
        self.assertIn("3 manifests imported, 0 problems", imported.stdout)
        server = await start_server(cache, test=self, args=("--air-gapped",))
        pulled = await skopeo_copy_all(f"{server.host}/registry.example.com/team/app:latest", self.path("pulled"))
        self.assertEqual((pulled.digest, pulled.manifests, pulled.blobs), (image.digest, image.manifests, image.blobs))
