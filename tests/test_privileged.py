"""twistd started as root with --uid/--gid: the server binds a port below 1024 before privileges are
dropped, preloads as the unprivileged user, and answers connections made meanwhile once the preload is done."""

from __future__ import annotations

import errno
import json
import os
import pwd
import socket
import sys
import time

from twisted.internet.defer import Deferred

from tests.fakes import Behaviour, FakeRegistry, listen, make_image
from tests.realparts import (
    Server,
    WorkspaceTestCase,
    _accepts,
    digest_of,
    http_request,
    sleep,
    twistd_command,
)

ADDRESS = "127.0.14.9"


def privileged_port(address: str) -> int:
    """A port below 1024 that nothing listens on at the moment on the given address."""
    for port in range(1023, 900, -1):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((address, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    continue
                raise
            return port
    raise RuntimeError(f"no free port below 1024 on {address}")


def _closed_ancestor(path: str) -> str | None:
    """The outermost directory above ``path`` that other users may not enter, if any."""
    parts = os.path.abspath(path).split(os.sep)[1:]
    for end in range(1, len(parts)):
        directory = os.sep + os.path.join(*parts[:end])
        if not os.stat(directory).st_mode & 0o001:
            return directory
    return None


def _traversable(directory: str) -> None:
    """Let every user through the directories from the test's own up to trial's working directory."""
    top = os.path.dirname(os.getcwd())
    while directory.startswith(top + os.sep):
        os.chmod(directory, os.stat(directory).st_mode | 0o005)
        directory = os.path.dirname(directory)


class SwitchingServer(Server):
    """The server as `twistd --uid U --gid G ociregistry --listen tcp:PORT:interface=ADDRESS ...`."""

    def __init__(self, image_path: str, args: list[str], port: int, run_dir: str, user: pwd.struct_passwd) -> None:
        super().__init__(image_path, args, port, run_dir)
        self.user = user
        self.host = f"{ADDRESS}:{port}"
        self.url = f"http://{self.host}"

    def command(self) -> list[str]:
        """twistd switching to the user after the privileged start."""
        command = twistd_command("--uid", str(self.user.pw_uid), "--gid", str(self.user.pw_gid), "ociregistry",
                                 "--image-path", self.image_path, "--listen", f"tcp:{self.port}:interface={ADDRESS}",
                                 *self.args)
        closed = _closed_ancestor(sys.base_prefix)
        if closed is None:
            return command
        # The interpreter lives under a directory the user may not enter (a Python in /root): once twistd has
        # switched users it could not import a module it had not loaded yet.  In a mount namespace of the
        # process's own, a tmpfs over that directory shows the interpreter's tree and nothing else.
        stash = os.path.join(self.run_dir, "interpreter")
        os.makedirs(stash, exist_ok=True)
        script = ('mount --bind "$1" "$2" && mount -t tmpfs -o mode=0755 tmpfs "$3" && mkdir -p "$1" '
                  '&& mount --bind "$2" "$1" && shift 3 && exec "$@"')
        return ["unshare", "-m", "sh", "-c", script, "sh", sys.base_prefix, stash, closed, *command]


class PrivilegedStartTests(WorkspaceTestCase):
    """What `twistd --uid` needs: bind first, then drop privileges, then preload, then serve."""

    async def test_low_port_with_uid_and_preload(self) -> None:
        """As nobody on a port below 1024, a connection made during the preload is answered after it, not refused."""
        self.assertEqual(os.getuid(), 0, "binding a port below 1024 and switching users needs root")
        user = pwd.getpwnam("nobody")
        upstream = FakeRegistry()
        upstream_port, listening = await listen(upstream)
        self.addCleanup(listening.stopListening)
        registry = f"127.0.0.1:{upstream_port}"
        slow = os.urandom(4096)
        image = make_image(b"small layer", slow)
        upstream.add_image("app", "v1", image)
        upstream.behaviour[digest_of(slow)] = Behaviour(chunk=1024, delay=0.7)
        config = self.path("config.yaml")
        with open(config, "w") as f:
            json.dump({"registries": [{"name": registry, "scheme": "http"}]}, f)
        listing = self.path("preload.txt")
        with open(listing, "w") as f:
            f.write(f"{registry}/app:v1\n")
        _traversable(self.base)
        run_dir = self.path("run")
        os.makedirs(run_dir)
        os.chown(run_dir, user.pw_uid, user.pw_gid)
        server = SwitchingServer(self.path("cache"), ["--config-file", config, "--preload-images", listing,
                                                      "--admin-listen", "none"],
                                 privileged_port(ADDRESS), run_dir, user)
        self.addCleanup(server.stop)
        started = time.monotonic()
        starting = Deferred.fromCoroutine(server.start())
        while not await _accepts(ADDRESS, server.port):
            self.assertLess(time.monotonic() - started, 15, server.log_text())
            await sleep(0.02)
        accepted = time.monotonic() - started
        self.assertNotIn("Preloaded", server.log_text(), "the port was bound only after the preload")
        response, body = await http_request("GET", f"{server.url}/v2/")
        answered = time.monotonic() - started
        self.assertEqual((response.code, body), (200, b"{}"))
        await starting
        log = server.log_text()
        self.assertIn("set uid/gid", log)
        self.assertLess(log.index("Preloaded 127.0.0.1"), log.index("GET /v2/ 200"))
        self.assertGreater(answered - accepted, 1.0, log)
        with open(f"/proc/{server.pid}/status") as f:
            uids = next(line.split()[1:] for line in f if line.startswith("Uid:"))
        self.assertEqual(set(uids), {str(user.pw_uid)})
        calls = upstream.count("GET", "/blobs/")
        response, body = await http_request("GET", f"{server.url}/v2/app/blobs/{digest_of(slow)}?ns={registry}")
        self.assertEqual((response.code, body), (200, slow))
        self.assertEqual(upstream.count("GET", "/blobs/"), calls)
        print(f"port {server.port}: accepting after {accepted:.2f}s, first answer after {answered:.2f}s")
