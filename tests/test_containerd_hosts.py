"""deploy/containerd-hosts writes the hosts.toml files a node's containerd reads (a pull
through them is in tests/test_image.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import tomllib
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.realparts import PROJECT_ROOT

SCRIPT = os.path.join(PROJECT_ROOT, "deploy", "containerd-hosts")


class ContainerdHostsTests(SynchronousTestCase):
    """One file per registry, or _default, in the layout containerd's config_path expects."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="certs.d-")
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)

    def run_script(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The script writing into this test's directory."""
        return subprocess.run([SCRIPT, "--dir", self.dir, *args], text=True, capture_output=True,
                              timeout=30)

    def hosts(self, name: str) -> dict[str, Any]:
        """One registry directory's hosts.toml, parsed."""
        with open(os.path.join(self.dir, name, "hosts.toml"), "rb") as f:
            return tomllib.load(f)

    def test_default(self) -> None:
        """Without registries: _default/hosts.toml, the mirror for pull and resolve, no fallback."""
        result = self.run_script("--mirror", "http://127.0.0.1:30500")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(os.listdir(self.dir), ["_default"])
        self.assertEqual(self.hosts("_default"),
                         {"host": {"http://127.0.0.1:30500": {"capabilities": ["pull", "resolve"]}}})

    def test_registries_fall_back_to_themselves(self) -> None:
        """Named registries each get a file whose server is the registry itself (Docker Hub's
        API host for docker.io, http for a registry given as an http:// URL)."""
        result = self.run_script("--mirror", "https://mirror.example:8443", "--ca", "/etc/ca.crt",
                                 "--client-cert", "/etc/node.crt", "--client-key", "/etc/node.key",
                                 "docker.io", "quay.io", "http://registry.internal:5000")
        self.assertEqual(result.returncode, 0, result.stderr)
        host = {"capabilities": ["pull", "resolve"], "ca": "/etc/ca.crt",
                "client": [["/etc/node.crt", "/etc/node.key"]]}
        for name, server in [("docker.io", "https://registry-1.docker.io"), ("quay.io", "https://quay.io"),
                             ("registry.internal:5000", "http://registry.internal:5000")]:
            self.assertEqual(self.hosts(name),
                             {"server": server, "host": {"https://mirror.example:8443": host}})
        self.assertEqual(sorted(os.listdir(self.dir)), ["docker.io", "quay.io", "registry.internal:5000"])

    def test_refused(self) -> None:
        """A missing or schemeless mirror, or half a client key pair, writes nothing."""
        for args in [(), ("--mirror", "127.0.0.1:30500"),
                     ("--mirror", "https://m", "--client-cert", "/etc/node.crt")]:
            result = self.run_script(*args)
            self.assertEqual(result.returncode, 2, args)
            self.assertEqual(os.listdir(self.dir), [])
