"""SIGHUP and SIGUSR1 to a real twistd serving plain HTTP: it keeps serving, and reopens its log file
as logrotate expects (move the file, signal, and new lines land in a new file of the same name)."""

from __future__ import annotations

import os
import signal
import time

from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from ociregistry.logs import LogFile, observer
from tests.realparts import Server, WorkspaceTestCase, http_request, sleep, start_server


class LogFileTests(SynchronousTestCase):
    """The file behind --log-file, reopened by name."""

    def test_reopen_follows_the_name(self) -> None:
        """After the file is moved, reopen continues in a new file of the same name; a failed reopen keeps the old."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "server.log")
        output = LogFile(path)
        log = Logger(namespace="test", observer=observer("info", output, False))
        log.info("one")
        os.rename(path, path + ".1")
        log.info("two")
        output.reopen()
        log.info("three")
        self.assertEqual([_read(path + ".1").count(word) for word in ("one", "two", "three")], [1, 1, 0])
        self.assertIn("three", _read(path))
        os.rename(path, path + ".2")
        os.mkdir(path)  # not a file that can be opened, even by root
        output.reopen()
        log.info("four")
        self.assertIn("four", _read(path + ".2"))


class SignalTests(WorkspaceTestCase):
    """`systemctl reload` (SIGHUP) and a stray SIGUSR1 never end the server."""

    async def request_logged(self, server: Server, log_file: str, marker: str) -> str:
        """GET /v2/?marker and wait for its access line; the text of the log file it landed in."""
        response, _ = await http_request("GET", f"{server.url}/v2/?{marker}")
        self.assertEqual(response.code, 200)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            text = _read(log_file)
            if marker in text:
                return text
            await sleep(0.05)
        self.fail(f"{marker} never reached {log_file}; server output:\n{server.log_text()}")

    async def signal_and_wait(self, server: Server, number: int, log_file: str) -> None:
        """Send a signal, and wait until the log file exists again with the server alive."""
        assert server.pid is not None
        os.kill(server.pid, number)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not os.path.exists(log_file):
            await sleep(0.05)
        await sleep(0.2)
        self.assertTrue(server.running, f"signal {number} ended the server:\n{server.log_text()}")

    async def test_signals_reopen_the_log_file(self) -> None:
        """After a SIGHUP or SIGUSR1 the server still serves; each reopens a moved log file by its name."""
        log_file = self.path("server.log")
        server = await start_server(self.path("cache"), test=self,
                                    args=("--log-file", log_file, "--admin-listen", "none"))
        await self.request_logged(server, log_file, "first")
        for number, name in [(signal.SIGHUP, "hup"), (signal.SIGUSR1, "usr1")]:
            rotated = f"{log_file}.{name}"
            os.rename(log_file, rotated)
            await self.signal_and_wait(server, number, log_file)
            text = await self.request_logged(server, log_file, f"after-{name}")
            self.assertIn("Reopened the log file", text)
            self.assertNotIn(f"after-{name}", _read(rotated))
        self.assertIn("Reloading on SIGHUP", _read(f"{log_file}.hup") + _read(f"{log_file}.usr1"))
        await server.stop()
        self.assertEqual(server.returncode, -signal.SIGTERM)

    async def test_signals_without_a_log_file(self) -> None:
        """Logging to standard output, SIGHUP and SIGUSR1 leave the server serving."""
        server = await start_server(self.path("cache"), test=self, args=("--admin-listen", "none"))
        for number in (signal.SIGHUP, signal.SIGUSR1, signal.SIGHUP):
            await self.signal_and_wait(server, number, server.log_path)
            response, _ = await http_request("GET", f"{server.url}/v2/")
            self.assertEqual(response.code, 200)
        self.assertIn("Reloading on SIGHUP", server.log_text())


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""
