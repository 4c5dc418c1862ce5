"""The server image from scripts/image, run with podman: as a non-root user with its cache on
a volume it pulls images through from a real registry, stops cleanly on SIGTERM, serves its
own image once that is pushed to a registry, and runs as the Helm chart runs it."""

from __future__ import annotations

import atexit
import json
import os
import resource
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, TimeoutError
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.client import ResponseFailed

import ociregistry
from tests.realparts import (
    PROJECT_ROOT,
    Registry,
    WorkspaceTestCase,
    build_oci_index,
    cache_problems,
    free_port,
    http_request,
    push,
    registry_manifest_digest,
    skopeo,
    skopeo_copy_all,
    sleep,
    start_registry,
)
from tests.test_chart import render_chart
from tests.test_clients import Containerd

UID = 10001
IMAGE_PATH = "/var/lib/ociregistry"
# Building takes a minute or two (debootstrap included); the first test pays for it.
BUILD_TIMEOUT = 900
# A container starts in about 2 s here; a busy machine gets more room.
CONTAINER_START_TIMEOUT = 60.0


class PodmanError(Exception):
    """podman exited with an error; the message holds its output."""


def _limit(kind: int, wanted: int) -> int:
    """`wanted`, or the hard limit if that is lower: podman may not raise a limit past it."""
    hard = resource.getrlimit(kind)[1]
    return wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)


class Podman:
    """podman with runc, cgroupfs and storage of its own, as it works on a machine without systemd."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        # podman refuses a runroot path longer than 50 characters, so it is kept short
        # whatever TMPDIR says.
        self.runroot = tempfile.mkdtemp(prefix="ocireg-", dir="/tmp")
        self.flags = ["--root", os.path.join(directory, "root"),
                      "--runroot", self.runroot,
                      "--storage-driver", "overlay", "--runtime", "runc",
                      "--cgroup-manager", "cgroupfs", "--events-backend", "none"]

    async def __call__(self, *args: str) -> str:
        """Run one podman command: its standard output, or PodmanError."""
        out, err, code = await getProcessOutputAndValue(
            shutil.which("podman") or "podman", [*self.flags, *args], env=dict(os.environ),
            path=self.directory)
        if code != 0:
            raise PodmanError(f"podman {' '.join(args)} exited {code}:\n"
                              f"{err.decode(errors='replace')}{out.decode(errors='replace')}")
        return str(out.decode(errors="replace"))

    def remove_everything(self) -> None:
        """Remove every container and image, then the storage itself."""
        podman = shutil.which("podman") or "podman"
        for args in (["rm", "--all", "--force"], ["rmi", "--all", "--force"]):
            subprocess.run([podman, *self.flags, *args], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False)
        shutil.rmtree(self.directory, ignore_errors=True)
        shutil.rmtree(self.runroot, ignore_errors=True)


@dataclass(frozen=True)
class BuiltImage:
    """The archive scripts/image wrote, loaded into a podman storage."""

    archive: str
    name: str
    podman: Podman


_built: BuiltImage | None = None
_build_error: str | None = None


async def built_image() -> BuiltImage:
    """Build the image once for every test in this module (a failed build fails each of them)."""
    global _built, _build_error
    if _build_error is not None:
        raise RuntimeError(_build_error)
    if _built is None:
        work = tempfile.mkdtemp(prefix="ociregistry-image-test-")
        podman = Podman(work)
        atexit.register(podman.remove_everything)
        archive = os.path.join(work, "ociregistry.tar")
        _, err, code = await getProcessOutputAndValue(
            os.path.join(PROJECT_ROOT, "scripts", "image"), ["--output", archive],
            env=dict(os.environ), path=PROJECT_ROOT)
        if code != 0:
            _build_error = f"scripts/image exited {code}:\n{err.decode(errors='replace')}"
            raise RuntimeError(_build_error)
        loaded = await podman("load", "--quiet", "--input", archive)
        name = loaded.strip().rsplit(" ", 1)[-1]
        _built = BuiltImage(archive, name, podman)
    return _built


@dataclass
class Container:
    """One running server container, answering at `url`."""

    name: str
    url: str
    podman: Podman

    @property
    def host(self) -> str:
        """host:port of `url`, as image references name it."""
        return self.url.split("://", 1)[1]

    async def logs(self) -> str:
        """Everything the server wrote."""
        return await self.podman("logs", self.name)

    async def state(self) -> dict[str, object]:
        """podman's record of the container's state."""
        return dict(json.loads(await self.podman("inspect", "--format", "{{json .State}}", self.name)))


class ImageTests(WorkspaceTestCase):
    """The image runs as users run it: podman, a volume for the cache, a mounted config file."""

    timeout = BUILD_TIMEOUT

    def cache_volume(self) -> str:
        """A host directory the container's user may write: the image path's volume."""
        directory = self.path("cache")
        os.makedirs(directory)
        os.chown(directory, UID, UID)
        return directory

    async def run_container(self, image: BuiltImage, url: str, network: list[str],
                            config: str, volume: str, *args: str) -> Container:
        """Start the image as the chart runs it (read-only root, no capabilities, a config
        file mounted), with `args` as the server's options, and wait until `url` answers."""
        name = f"ociregistry-test-{uuid.uuid4().hex[:12]}"
        self.addCleanup(lambda: Deferred.fromCoroutine(
            image.podman("rm", "--force", "--time", "0", name)))
        await image.podman(
            "run", "--detach", "--name", name, *network,
            "--ulimit", "nofile={0}:{0}".format(_limit(resource.RLIMIT_NOFILE, 65536)),
            "--ulimit", "nproc={0}:{0}".format(_limit(resource.RLIMIT_NPROC, 32768)),
            "--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp",
            "--cap-drop", "all", "--security-opt", "no-new-privileges",
            "--volume", f"{volume}:{IMAGE_PATH}",
            "--volume", f"{config}:/etc/ociregistry/config.yaml:ro",
            image.name, *args)
        container = Container(name, url, image.podman)
        deadline = time.monotonic() + CONTAINER_START_TIMEOUT
        while True:
            try:
                await http_request("GET", url + "/v2/")
                return container
            except (ConnectError, TimeoutError, ResponseFailed):
                pass
            if (await container.state())["Status"] != "running" or time.monotonic() > deadline:
                self.fail(f"the container did not start serving:\n{await container.logs()}")
            await sleep(0.1)

    async def run_server(self, image: BuiltImage, address: str, registry: Registry,
                         volume: str) -> Container:
        """The image on the host's network, its arguments the server's options as the README
        gives them, configured for `registry`."""
        config = self.config([{"name": registry.host, "scheme": "http"}])
        port = free_port(address)
        return await self.run_container(
            image, f"http://{address}:{port}", ["--network", "host"], config, volume,
            "--port", str(port), "--host", address, "--config-file", "/etc/ociregistry/config.yaml")

    async def test_image_configuration(self) -> None:
        """The image runs twistd's plugin as a numeric non-root user, exposes 8080, keeps the
        cache on a volume, and carries the OCI labels."""
        image = await built_image()
        config = json.loads(await skopeo("inspect", "--config", f"oci-archive:{image.archive}"))
        settings = config["config"]
        self.assertEqual(settings["User"], f"{UID}:{UID}")
        self.assertEqual(settings["Entrypoint"], ["twistd", "--nodaemon", "--pidfile=", "ociregistry"])
        self.assertEqual(settings["ExposedPorts"], {"8080/tcp": {}})
        self.assertEqual(settings["Volumes"], {IMAGE_PATH: {}})
        labels = settings["Labels"]
        revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, text=True,
                                  capture_output=True, check=True).stdout.strip()
        self.assertEqual(labels["org.opencontainers.image.version"], ociregistry.__version__)
        self.assertTrue(labels["org.opencontainers.image.revision"].startswith(revision))
        self.assertEqual(labels["org.opencontainers.image.licenses"], "Apache-2.0")
        self.assertIn("org.opencontainers.image.source", labels)

    async def test_pull_through_then_sigterm(self) -> None:
        """As uid 10001 with the cache on a volume, /v2/ answers, an image from a real
        registry pulls through with its digests (skopeo, and containerd set up by
        deploy/containerd-hosts), and SIGTERM ends the server with status 0."""
        image = await built_image()
        registry = await start_registry(self.path("registry"), test=self, address="127.0.17.1", port=80)
        pushed = build_oci_index(self.path("oci"))
        await push(pushed, registry, "team/app", "v1")
        volume = self.cache_volume()
        container = await self.run_server(image, "127.0.17.2", registry, volume)
        response, body = await http_request("GET", container.url + "/v2/")
        self.assertEqual((response.code, body), (200, b"{}"))
        pulled = await skopeo_copy_all(f"{container.host}/{registry.host}/team/app:v1",
                                       self.path("pulled"))
        self.assertEqual((pulled.digest, pulled.manifests, pulled.blobs),
                         (pushed.digest, pushed.manifests, pushed.blobs))
        hosts = self.path("certs.d")
        subprocess.run([os.path.join(PROJECT_ROOT, "deploy", "containerd-hosts"), "--mirror",
                        container.url, "--dir", hosts], check=True, capture_output=True)
        containerd = Containerd(self.path("containerd"))
        self.addCleanup(containerd.stop)
        await containerd.start()
        await containerd.pull(f"{registry.host}/team/app:v1", hosts)
        self.assertEqual(await containerd.image_digest(f"{registry.host}/team/app:v1"), pushed.digest)
        self.assertEqual(os.stat(os.path.join(volume, "index.db")).st_uid, UID)
        self.assertIn(f"as uid:gid {UID}:{UID}", await container.logs())
        await image.podman("stop", "--time", "30", container.name)
        state = await container.state()
        self.assertEqual(state["ExitCode"], 0, await container.logs())
        self.assertIn("Server Shut Down.", await container.logs())
        self.assertEqual(cache_problems(volume), [])

    async def test_serves_its_own_image(self) -> None:
        """The image, pushed to a registry with skopeo, pulls back through a server running it,
        and podman can pull it from there."""
        image = await built_image()
        registry = await start_registry(self.path("registry"), test=self, address="127.0.17.3", port=80)
        repository, tag = "ociregistry", ociregistry.__version__
        await push(f"oci-archive:{image.archive}", registry, repository, tag)
        digest = await registry_manifest_digest(registry, repository, tag)
        container = await self.run_server(image, "127.0.17.4", registry, self.cache_volume())
        reference = f"{container.host}/{registry.host}/{repository}:{tag}"
        pulled = await skopeo_copy_all(reference, self.path("pulled"))
        self.assertEqual(pulled.digest, digest)
        await image.podman("pull", "--quiet", "--tls-verify=false", reference)
        ids = await image.podman("image", "inspect", "--format", "{{.Id}}", image.name, reference)
        loaded_id, pulled_id = ids.split()
        self.assertEqual(pulled_id, loaded_id)

    async def test_runs_as_the_chart_runs_it(self) -> None:
        """The chart's container (its arguments, configuration, user and security context)
        serves /health, the probes' path, and /v2/ on the port the chart declares."""
        image = await built_image()
        # The host's network, as the other tests here use: the chart's port moves to a free one.
        port = free_port("127.0.17.5")
        objects = render_chart(self.path("helm"), "--set", "persistence.enabled=false",
                               "--set", f"config.port={port}", "--set", "config.host=127.0.17.5")
        config_map = next(o for o in objects if o["kind"] == "ConfigMap")
        pod = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"]
        (spec,) = pod["containers"]
        self.assertEqual(spec["securityContext"]["capabilities"], {"drop": ["ALL"]})
        self.assertTrue(spec["securityContext"]["readOnlyRootFilesystem"])
        self.assertEqual({m["mountPath"] for m in spec["volumeMounts"]},
                         {IMAGE_PATH, "/etc/ociregistry/config.yaml", "/tmp"})
        config = self.path("chart-config.yaml")
        with open(config, "w") as f:
            f.write(config_map["data"]["config.yaml"])
        self.assertEqual([p["containerPort"] for p in spec["ports"] if p["name"] == "http"], [port])
        user = f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
        container = await self.run_container(
            image, f"http://127.0.17.5:{port}", ["--network", "host", "--user", user],
            config, self.cache_volume(), *spec["args"])
        response, body = await http_request("GET", container.url + spec["livenessProbe"]["httpGet"]["path"])
        self.assertEqual((response.code, json.loads(body)), (200, {"status": "ok"}))
        await image.podman("stop", "--time", "30", container.name)
        self.assertEqual((await container.state())["ExitCode"], 0, await container.logs())

    async def test_containerd_imports_the_archive(self) -> None:
        """containerd imports the archive as a node would (ctr images import) under the name
        the chart's default values give the pod."""
        image = await built_image()
        containerd = Containerd(self.path("containerd"))
        self.addCleanup(containerd.stop)
        await containerd.start()
        await containerd.ctr("images", "import", "--snapshotter", "native", image.archive)
        (spec,) = next(o for o in render_chart(self.path("helm"))
                       if o["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"]
        self.assertEqual((await containerd.ctr("images", "ls", "-q")).split(), [spec["image"]])
        self.assertEqual(spec["image"], image.name)
