"""A full disk under the image path: a real tmpfs filled up beneath a real server and upstream."""

from __future__ import annotations

import json
import os
import subprocess
import time

from twisted.web.client import ResponseFailed

from tests.realparts import (
    MIB,
    WorkspaceTestCase,
    build_oci_index,
    cache_problems,
    http_request,
    push,
    sleep,
    start_registry,
    start_server,
)
from tests.test_integration import Puller

ONE_PLATFORM = (("linux", "amd64"),)


def fill(path: str, leave: int) -> None:
    """Grow a file until its file system has at most ``leave`` bytes free (or none at all)."""
    chunk = b"\0" * (64 * 1024)
    with open(path, "ab") as f:
        try:
            while True:
                found = os.statvfs(path)
                if found.f_bavail * found.f_frsize <= leave:
                    break
                f.write(chunk)
                f.flush()
        except OSError:
            pass


def leaked(pid: int, directory: str) -> list[str]:
    """The files under ``directory`` a process holds open."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith(directory + "/"):
            found.append(target)
    return found


class DiskFullTests(WorkspaceTestCase):
    """The image path on an 8 MiB tmpfs, filled by a filler file while the server runs."""

    timeout = 240

    def mount(self, name: str) -> str:
        path = self.path(name)
        os.makedirs(path)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", path], check=True)
        self.addCleanup(subprocess.run, ["umount", "-l", path], check=True)
        return path

    async def health(self, server: object) -> tuple[int, dict[str, str]]:
        response, body = await http_request("GET", f"{server.url}/health")  # type: ignore[attr-defined]
        return response.code, json.loads(body)

    async def settled(self, pid: int, tmp: str) -> None:
        """Wait (a bounded time) for failing downloads to let go of their temporary files."""
        deadline = time.monotonic() + 10
        while (os.listdir(tmp) or leaked(pid, tmp)) and time.monotonic() < deadline:
            await sleep(0.1)

    async def test_full_disk(self) -> None:
        """New content is a JSON 507, cached images are served, /health says why, nothing leaks, room heals it."""
        cached = build_oci_index(self.path("cached"), ONE_PLATFORM, layer_sizes=(64 * 1024, 1024))
        big = build_oci_index(self.path("big"), ONE_PLATFORM, layer_sizes=(3 * MIB, 1024))
        small = build_oci_index(self.path("small"), ONE_PLATFORM, layer_sizes=(2048,))
        registry = await start_registry(self.path("registry"), test=self)
        await push(cached, registry, "disk/cached", "v1")
        await push(big, registry, "disk/big", "v1")
        await push(small, registry, "disk/small", "v1")
        image_path = self.mount("cache")
        tmp = os.path.join(image_path, "tmp")
        server = await start_server(image_path, test=self, args=(
            "--config-file", self.config([{"name": registry.host, "scheme": "http"}]),
            "--tag-ttl", "0", "--admin-listen", "none"))
        assert server.pid is not None
        puller = Puller(self, server)
        expected = await puller.pull(registry.host, "disk/cached", "v1")
        self.assertEqual(await self.health(server), (200, {"status": "ok"}))

        # Room for manifests but not for the 3 MiB layer: the download fails part-way.
        filler = os.path.join(image_path, "filler")
        fill(filler, leave=MIB + MIB // 2)
        try:
            await puller.pull(registry.host, "disk/big", "v1")
        except (AssertionError, ResponseFailed):
            pass
        else:
            self.fail("a 3 MiB layer was stored in 1.5 MiB")
        await self.settled(server.pid, tmp)
        self.assertEqual((os.listdir(tmp), leaked(server.pid, tmp)), ([], []))
        code, document = await self.health(server)
        self.assertEqual((code, document["status"]), (503, "unhealthy"))
        self.assertIn("image path is full", document["problem"])

        # No room at all: new content is refused up front with a JSON 507.
        fill(filler + "2", leave=0)
        for path in (f"/v2/disk/small/manifests/v1?ns={registry.host}",
                     f"/v2/disk/big/blobs/{big.large_layer or max(big.blobs, key=big.blobs.__getitem__)}"
                     f"?ns={registry.host}"):
            response, body = await http_request("GET", server.url + path)
            self.assertEqual(response.code, 507, body)
            self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
            error = json.loads(body)["errors"][0]
            self.assertIn("no room for new content", error["message"])
        self.assertEqual(await puller.pull(registry.host, "disk/cached", "v1"), expected)
        code, document = await self.health(server)
        self.assertEqual(code, 503)
        self.assertIn("image path is full", document["problem"])
        self.assertEqual((os.listdir(tmp), leaked(server.pid, tmp)), ([], []))

        # Space returns: everything works again, without a restart.
        os.unlink(filler)
        os.unlink(filler + "2")
        self.assertEqual(await self.health(server), (200, {"status": "ok"}))
        top, _, blobs = await puller.pull(registry.host, "disk/big", "v1")
        self.assertEqual((top, blobs), (big.digest, big.blobs))
        self.assertEqual((await puller.pull(registry.host, "disk/small", "v1"))[0], small.digest)
        self.assertEqual(await puller.pull(registry.host, "disk/cached", "v1"), expected)
        await server.stop()
        self.assertEqual(cache_problems(image_path), [])
        self.assertNotIn("Traceback", server.log_text())
