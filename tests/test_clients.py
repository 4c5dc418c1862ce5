"""Real clients pull through the server set up as the README's "Pointing clients at it" says.

containerd 1.6 (hosts.toml: `_default`, per registry, TLS with client certificates) and
podman 4.3 (registries.conf mirror with the path prefix), from Debian, pull images that
a real upstream holds.  Not run here: docker (`registry-mirrors` is used only for Docker
Hub names, and dockerd falls back to Docker Hub when a mirror fails, so a test could send
traffic off this machine), crane (not packaged in Debian 12), kind and k3s (they need
node images or binaries that no package registry here provides).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence

import yaml
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from ociregistry import __version__
from tests.realparts import (
    START_TIMEOUT,
    ImageSet,
    Registry,
    Server,
    build_docker_list,
    build_oci_index,
    free_port,
    make_ca,
    push,
    sleep,
    start_process,
    start_registry,
    start_server,
    stop_process,
)

# distribution's access log is in the combined format: the user agent ends the line.
_AGENT = re.compile(r'"[A-Z]+ \S+ HTTP/[0-9.]+" \d{3} \d+ "[^"]*" "([^"]*)"')
_CAPABILITIES = 'capabilities = ["pull", "resolve"]'


class ClientError(Exception):
    """A client command exited with an error; the message holds its stderr."""


async def run(executable: str, args: Sequence[str], env: dict[str, str], cwd: str) -> str:
    """Run a command to completion: its stdout, or ClientError."""
    out, err, code = await getProcessOutputAndValue(shutil.which(executable) or executable,
                                                    list(args), env=env, path=cwd)
    if code != 0:
        raise ClientError(f"{executable} {' '.join(args)} exited {code}:\n"
                          f"{err.decode(errors='replace')}{out.decode(errors='replace')}")
    return str(out.decode())


def write(path: str, text: str) -> str:
    """Write a text file, making its directory: its path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def agents_since(registry: Registry, offset: int) -> set[str]:
    """The user agents of the requests an upstream logged after `offset` bytes of its log."""
    with open(registry.log_path, "rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").splitlines()
    return {m[1] for m in map(_AGENT.search, lines) if m}


class Containerd:
    """A containerd daemon of its own (root, state, socket, config), without the CRI plugin."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        # A unix socket path must stay under 108 bytes; trial's directories can be deeper.
        self.socket_dir = tempfile.mkdtemp(prefix="ctd-")
        self.socket = os.path.join(self.socket_dir, "containerd.sock")
        self.log_path = os.path.join(directory, "containerd.log")
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": directory}
        self.config = write(os.path.join(directory, "config.toml"), "\n".join([
            "version = 2",
            f"root = {json.dumps(os.path.join(directory, 'root'))}",
            f"state = {json.dumps(os.path.join(directory, 'state'))}",
            'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",'
            ' "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",'
            ' "io.containerd.snapshotter.v1.zfs"]',
            "[grpc]",
            f"  address = {json.dumps(self.socket)}",
            "[ttrpc]",
            f"  address = {json.dumps(self.socket + '.ttrpc')}",
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {json.dumps(os.path.join(directory, 'opt'))}",
            "",
        ]))
        self._process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        """Start the daemon and wait until `ctr version` reaches it."""
        self._process = start_process(["containerd", "--config", self.config], self.log_path,
                                      cwd=self.directory, env=self.env)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                await self.ctr("version")
                return
            except ClientError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise
            await sleep(0.05)

    async def stop(self) -> None:
        """Stop the daemon and remove its sockets."""
        if self._process is not None:
            await stop_process(self._process)
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    async def ctr(self, *args: str) -> str:
        """Run `ctr` against this daemon in the namespace `test`: its stdout."""
        return await run("ctr", ["-a", self.socket, "-n", "test", *args], self.env, self.directory)

    async def pull(self, reference: str, hosts_dir: str) -> None:
        """`ctr image pull` of every platform, unpacked with the native snapshotter."""
        await self.ctr("image", "pull", "--snapshotter", "native", "--all-platforms",
                       "--hosts-dir", hosts_dir, reference)

    async def image_digest(self, reference: str) -> str:
        """The digest an image name points at."""
        for line in (await self.ctr("image", "ls")).splitlines()[1:]:
            name, _, digest, *_ = line.split()
            if name == reference:
                return digest
        raise AssertionError(f"no image {reference}")

    async def content(self) -> set[str]:
        """Every digest in the content store."""
        return set((await self.ctr("content", "ls", "-q")).split())


class ContainerdTests(TestCase):
    """containerd's hosts.toml sends every request of a pull to the server."""

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())

    async def prepare(self, image: ImageSet, *server_args: str) -> tuple[Registry, Server, Containerd]:
        """An upstream on a free port holding `image` as team/app:v1, the server, and containerd."""
        registry = await start_registry(self.path("registry"), test=self)
        await push(image, registry, "team/app", "v1")
        config = write(self.path("config.yaml"),
                       yaml.safe_dump({"registries": [{"name": registry.host, "scheme": "http"}]}))
        server = await start_server(self.path("cache"), test=self,
                                    args=("--config-file", config, *server_args))
        containerd = Containerd(self.path("containerd"))
        self.addCleanup(containerd.stop)
        await containerd.start()
        return registry, server, containerd

    def path(self, name: str) -> str:
        """A path in this test's directory."""
        return os.path.join(self.base, name)

    async def check_pull(self, containerd: Containerd, registry: Registry, image: ImageSet,
                         hosts_dir: str) -> None:
        """A pull gets every manifest and blob of `image`, and the upstream sees only the server."""
        await registry.settled()
        offset = os.path.getsize(registry.log_path)
        reference = f"{registry.host}/team/app:v1"
        await containerd.pull(reference, hosts_dir)
        self.assertEqual(await containerd.image_digest(reference), image.digest)
        wanted = {image.digest, *image.manifests.values(), *image.blobs}
        self.assertEqual(wanted - await containerd.content(), set())
        await registry.settled()
        self.assertEqual(agents_since(registry, offset), {f"ociregistry/{__version__}"})

    async def test_default_hosts(self) -> None:
        """`_default/hosts.toml` naming the server as a pull/resolve host pulls an OCI index through it."""
        image = build_oci_index(self.path("image"))
        registry, server, containerd = await self.prepare(image)
        hosts_dir = self.path("certs.d")
        write(os.path.join(hosts_dir, "_default", "hosts.toml"),
              f'[host."{server.url}"]\n  {_CAPABILITIES}\n')
        await self.check_pull(containerd, registry, image, hosts_dir)

    async def test_per_registry_hosts(self) -> None:
        """A registry's own hosts.toml with `server` as fallback pulls a Docker list through the server."""
        image = build_docker_list(self.path("image"))
        registry, server, containerd = await self.prepare(image)
        hosts_dir = self.path("certs.d")
        write(os.path.join(hosts_dir, registry.host, "hosts.toml"),
              f'server = "{registry.url}"\n\n[host."{server.url}"]\n  {_CAPABILITIES}\n')
        await self.check_pull(containerd, registry, image, hosts_dir)

    async def test_tls_with_client_certificate(self) -> None:
        """An HTTPS server requiring client certificates: refused without `client`, pulls with `ca` and `client`."""
        ca = make_ca(self.path("ca"), "mirror")
        cert, key = ca.issue_server("127.0.0.1")
        node_cert, node_key = ca.issue_client("node")
        image = build_oci_index(self.path("image"))
        tls_port = free_port()
        registry, _, containerd = await self.prepare(
            image, "--tls-cert", cert, "--tls-key", key, "--tls-ca", ca.cert_path,
            "--tls-client-auth", "verify", "--host", "127.0.0.1", "--tls-port", str(tls_port))
        hosts_dir = self.path("certs.d")
        hosts = os.path.join(hosts_dir, registry.host, "hosts.toml")
        # The upstream speaks plain HTTP: the fallback to `server` fails, and so does a pull
        # that the server refuses.
        mirror = (f'server = "https://{registry.host}"\n\n[host."https://127.0.0.1:{tls_port}"]\n'
                  f'  {_CAPABILITIES}\n  ca = "{ca.cert_path}"\n')
        write(hosts, mirror)
        with self.assertRaises(ClientError) as refused:
            await containerd.pull(f"{registry.host}/team/app:v1", hosts_dir)
        self.assertIn("tls: certificate required", str(refused.exception))
        write(hosts, mirror + f'  client = [["{node_cert}", "{node_key}"]]\n')
        await self.check_pull(containerd, registry, image, hosts_dir)


async def podman_pull(test: TestCase, upstream: str, mirror: str, reference: str,
                      platform: str = "linux/amd64") -> list[str]:
    """Pull one platform with podman, its registries.conf naming `mirror` (SERVER/UPSTREAM) as the
    mirror of `upstream`: the pulled image's [id, digest]."""
    # podman refuses a runroot path longer than 50 characters, so its home is kept short.
    home = tempfile.mkdtemp(prefix="podman-", dir="/tmp")
    test.addCleanup(shutil.rmtree, home, True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home, "TMPDIR": home,
        "XDG_RUNTIME_DIR": home,
        "CONTAINERS_CONF": write(os.path.join(home, "containers.conf"), ""),
        "CONTAINERS_STORAGE_CONF": write(os.path.join(home, "storage.conf"), (
            f'[storage]\ndriver = "vfs"\nrunroot = "{home}/run"\ngraphroot = "{home}/root"\n')),
        "CONTAINERS_REGISTRIES_CONF": write(os.path.join(home, "registries.conf"), (
            f'[[registry]]\nprefix = "{upstream}"\nlocation = "{upstream}"\n\n'
            f'[[registry.mirror]]\nlocation = "{mirror}"\ninsecure = true\n')),
    }
    policy = write(os.path.join(home, "policy.json"),
                   json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    podman = ["--root", os.path.join(home, "root"), "--runroot", os.path.join(home, "run"),
              "--tmpdir", os.path.join(home, "tmp"), "--storage-driver", "vfs",
              "--cgroup-manager", "cgroupfs", "--events-backend", "none"]
    await run("podman", [*podman, "pull", "--quiet", "--signature-policy", policy,
                         "--platform", platform, reference], env, home)
    inspected = await run("podman", [*podman, "image", "inspect", "--format",
                                     "{{.Id}} {{.Digest}}", reference], env, home)
    return inspected.split()


class PodmanTests(TestCase):
    """podman's registries.conf mirror in the path-prefix form sends a pull to the server."""

    async def test_path_prefix_mirror(self) -> None:
        """A `[[registry.mirror]]` at SERVER/UPSTREAM pulls the linux/amd64 image of an index through the server."""
        base = os.path.abspath(self.mktemp())
        image = build_oci_index(os.path.join(base, "image"))
        # The path-prefix form cannot carry a port in the upstream's name: port 80 it is.
        registry = await start_registry(os.path.join(base, "registry"), test=self,
                                        address="127.0.0.80", port=80)
        await push(image, registry, "team/app", "v1")
        config = write(os.path.join(base, "config.yaml"),
                       yaml.safe_dump({"registries": [{"name": registry.host, "scheme": "http"}]}))
        server = await start_server(os.path.join(base, "cache"), test=self,
                                    args=("--config-file", config))
        await registry.settled()
        offset = os.path.getsize(registry.log_path)
        inspected = await podman_pull(self, registry.host, f"{server.host}/{registry.host}",
                                      f"{registry.host}/team/app:v1")
        amd64 = json.loads(image.manifest_bytes(image.manifests["linux/amd64"]))
        self.assertEqual(inspected, [amd64["config"]["digest"].split(":")[1], image.digest])
        await registry.settled()
        self.assertEqual(agents_since(registry, offset), {f"ociregistry/{__version__}"})
