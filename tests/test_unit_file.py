"""scripts/ociregistry.service is a unit systemd accepts, and its reload is the signal the server reloads on."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from twisted.trial.unittest import SynchronousTestCase

from tests.realparts import PROJECT_ROOT, installed_script

UNIT = os.path.join(PROJECT_ROOT, "scripts", "ociregistry.service")


class UnitFileTests(SynchronousTestCase):
    """What `systemctl reload` and `systemd-analyze verify` see."""

    def read(self) -> str:
        with open(UNIT, encoding="utf-8") as f:
            return f.read()

    def test_reload_sends_sighup(self) -> None:
        """ExecReload sends SIGHUP, which reloads the server instead of ending it (tests.test_signals)."""
        self.assertRegex(self.read(), re.compile(r"^ExecReload=/bin/kill -HUP \$MAINPID$", re.M))

    def test_systemd_analyze_verify(self) -> None:
        """systemd-analyze verify finds nothing wrong, with ExecStart pointing at the installed twistd."""
        analyze = shutil.which("systemd-analyze")
        assert analyze is not None, "systemd-analyze comes with Debian's systemd, which scripts/test installs"
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        copy = os.path.join(directory, "ociregistry.service")
        with open(copy, "w", encoding="utf-8") as f:
            f.write(self.read().replace("/opt/ociregistry/bin/twistd", installed_script("twistd")))
        result = subprocess.run([analyze, "verify", copy], capture_output=True, text=True, timeout=60)
        self.assertEqual((result.returncode, result.stderr.strip()), (0, ""))
