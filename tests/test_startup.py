"""Start-up on a bad image path: one clear line and a non-zero exit, or a warning that says how to recover."""

from __future__ import annotations

import os
import subprocess
import time

from twisted.internet.utils import getProcessOutputAndValue

from tests.realparts import PROJECT_ROOT, WorkspaceTestCase, free_port, start_server, twistd_command
from tests.test_load import run_cli
from tests.test_store import digest_of


async def run_twistd(image_path: str) -> tuple[int, str]:
    """Run the server on an image path until it exits by itself (or 20 s); (exit code, output)."""
    command = ["timeout", "20", *twistd_command(
        "ociregistry", "--image-path", image_path, "--listen", f"tcp:{free_port()}:interface=127.0.0.1",
        "--admin-listen", "none")]
    env = {**os.environ, "PYTHONPATH": PROJECT_ROOT}
    out, err, code = await getProcessOutputAndValue(command[0], command[1:], env=env)
    return code, (out + err).decode(errors="replace")


class StartupTests(WorkspaceTestCase):
    """`twistd -n ociregistry` on an image path it cannot use, or one whose index is gone."""

    timeout = 120

    def mount(self, name: str, options: str) -> str:
        """A tmpfs mounted for this test (unmounted at cleanup)."""
        path = self.path(name)
        os.makedirs(path)
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path], check=True)
        self.addCleanup(subprocess.run, ["umount", "-l", path], check=True)
        return path

    def assertOneLine(self, code: int, output: str, expected: str) -> None:
        self.assertNotEqual(code, 0, output)
        self.assertNotEqual(code, 124, f"still running after 20 s: {output}")
        self.assertNotIn("Traceback", output)
        lines = [line for line in output.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, output)
        self.assertIn(expected, lines[0])

    async def test_read_only_image_path(self) -> None:
        """A read-only file system: one line naming the image path, exit 1."""
        path = self.mount("ro", "size=1m,ro")
        code, output = await run_twistd(path)
        self.assertOneLine(code, output, f"image path {path} is not writable: Read-only file system")

    async def test_garbage_index(self) -> None:
        """An index.db that is not a database: one line saying so and what to do, exit 1."""
        path = self.path("cache")
        os.makedirs(path)
        with open(os.path.join(path, "index.db"), "wb") as f:
            f.write(b"this is not sqlite\n" * 100)
        code, output = await run_twistd(path)
        self.assertOneLine(code, output, "index.db is not an sqlite database")
        self.assertIn("move it aside", output)

    async def test_deleted_index_with_files_left(self) -> None:
        """Files a new index does not name: a warning with their count; check --repair removes them."""
        path = self.path("cache")
        contents = [b"left over %d" % number for number in range(3)]
        for content in contents:
            digest = digest_of(content)
            file = os.path.join(path, "blobs", "sha256", digest[7:9], digest[7:])
            os.makedirs(os.path.dirname(file), exist_ok=True)
            with open(file, "wb") as f:
                f.write(content)
            long_ago = time.time() - 86400
            os.utime(file, (long_ago, long_ago))
        server = await start_server(path, test=self, args=("--admin-listen", "none"))
        await server.stop()
        warnings = [line for line in server.log_text().splitlines() if "named by no row" in line]
        self.assertEqual(len(warnings), 1, server.log_text())
        self.assertIn("3 files under blobs/", warnings[0])
        self.assertIn("ociregistry check --repair", warnings[0])
        self.assertNotIn("Traceback", server.log_text())
        repaired = await run_cli("check", "--repair", "--image-path", path)
        self.assertEqual(repaired.returncode, 0, repaired.stderr)
        self.assertIn("3 problems, repaired", repaired.stdout)
        checked = await run_cli("check", "--image-path", path)
        self.assertEqual((checked.returncode, checked.stdout.strip()), (0, "0 objects checked, 0 problems"))
