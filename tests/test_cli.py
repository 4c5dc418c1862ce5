"""The ``ociregistry`` command as users run it: a separate process on the cache directory."""

from __future__ import annotations

import json
import os
import subprocess
import time

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from tests.fakes import make_image
from tests.realparts import installed_script
from tests.test_load import run_cli
from tests.test_prune import CacheContent


class CommandTests(TestCase):
    """list, prune, check and the errors, on a small cache made in the test."""

    def setUp(self) -> None:
        clock = Clock()
        clock.advance(time.time() - 3 * 86400)
        self.path = os.path.abspath(self.mktemp())
        cache = CacheContent(self.path, clock)
        self.web = make_image(b"shared" * 100, b"web", config=b'{"app":"web"}')
        self.db = make_image(b"shared" * 100, b"db", config=b'{"app":"db"}')
        cache.image(self.web, "team/web", "1.0")
        clock.advance(2.5 * 86400)
        cache.image(self.db, "team/db", "2.0")
        cache.index.close()
        self.cache = cache

    async def test_help_everywhere(self) -> None:
        """Every command has --help naming its options."""
        for command, option in [("load", "--all-platforms"), ("list", "--short-digest"), ("prune", "--max-size"),
                                ("check", "--repair"), ("import-go-cache", "--from"), ("version", "--help")]:
            result = await run_cli(command, "--help")
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertIn(option, result.stdout)

    async def test_bad_input(self) -> None:
        """Bad input exits non-zero with a message saying what is wrong."""
        cases = [
            (("prune", "--image-path", self.path), "say what to prune"),
            (("prune", "--image-path", self.path, "--created-before", "someday"), "invalid date 'someday'"),
            (("prune", "--image-path", self.path, "--max-size", "huge"), "invalid size 'huge'"),
            (("list", "--image-path", self.path, "--pattern", "("), "--pattern"),
            (("list", "--image-path", os.path.join(self.path, "nothing")), "no cache at"),
            (("load", "--image-path", self.path, "/no/such/list"), "/no/such/list: no such file"),
            (("import-go-cache", "--image-path", self.path, "--from", "/no/such/dir"), "no such directory"),
            (("frobnicate",), "invalid choice"),
        ]
        for args, message in cases:
            result = await run_cli(*args)
            self.assertNotEqual(result.returncode, 0, args)
            self.assertIn(message, result.stderr, args)
            self.assertNotIn("Traceback", result.stderr, args)

    async def test_list(self) -> None:
        """The table has the documented columns in local time; JSON has UTC times and bytes."""
        result = await run_cli("list", "--image-path", self.path)
        self.assertEqual(result.returncode, 0, result.stderr)
        header, *rows = result.stdout.splitlines()
        self.assertEqual(header.split(), ["IMAGE", "TAG", "DIGEST", "TYPE", "CREATED", "PULLED", "SIZE"])
        self.assertEqual([row.split()[:4] for row in rows], [
            ["quay.io/team/db", "2.0", self.db.digest, "oci-image"],
            ["quay.io/team/web", "1.0", self.web.digest, "oci-image"]])
        short = (await run_cli("list", "--image-path", self.path, "--short-digest", "--pattern", "web")).stdout
        self.assertEqual(short.splitlines()[1].split()[2], self.web.digest[7:19])
        documents = json.loads((await run_cli("list", "--image-path", self.path, "--format", "json")).stdout)
        self.assertEqual(documents[1]["tag"], "1.0")
        self.assertEqual(documents[1]["size"], len(self.web.manifest) + sum(map(len, self.web.blobs.values())))
        self.assertTrue(documents[1]["created"].endswith("Z"))
        self.assertEqual(rows[1].split()[4], documents[1]["created"][:-1])

    async def test_list_on_read_only_image_path(self) -> None:
        """list and prune --dry-run work where the image path is mounted read-only."""
        mount = f"mount --bind -o ro {self.path} {self.path} && exec \"$@\""
        result = await run_cli("list", "--image-path", self.path, wrapper=("unshare", "-m", "sh", "-c", mount, "sh"))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(len(result.stdout.splitlines()), 3)
        result = await run_cli("prune", "--image-path", self.path, "--pattern", "web", "--dry-run",
                               wrapper=("unshare", "-m", "sh", "-c", mount, "sh"))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("would remove image quay.io/team/web:1.0", result.stdout)

    async def test_prune(self) -> None:
        """A dry run prints exactly what the real prune then removes; the shared layer stays."""
        args = ("prune", "--image-path", self.path, "--accessed-before", "1d")
        before = self.cache.files()
        dry = await run_cli(*args, "--dry-run")
        self.assertEqual(dry.returncode, 0, dry.stderr)
        self.assertEqual(self.cache.files(), before)
        real = await run_cli(*args)
        self.assertEqual(real.stdout, dry.stdout.replace("would remove", "removed"))
        self.assertIn("removed image quay.io/team/web:1.0", real.stdout)
        self.assertEqual(before - self.cache.files(), {self.web.digest, *self.web.blobs} - set(self.db.blobs))
        self.assertIn("removed 0 images", (await run_cli(*args)).stdout)


class InstalledTests(TestCase):
    """pip installs the console script."""

    def test_console_script(self) -> None:
        """`ociregistry version` runs from the console script installed beside this Python, whatever PATH holds."""
        script = installed_script("ociregistry")
        self.assertTrue(os.access(script, os.X_OK), f"no console script at {script} (pip install .)")
        result = subprocess.run([script, "version"], capture_output=True, text=True, timeout=60, cwd="/",
                                env={**os.environ, "PATH": "/usr/bin:/bin"})
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r"^ociregistry \d+\.\d+")
