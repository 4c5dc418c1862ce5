"""The installed package provides the twistd plugin."""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import TestCase

from tests.realparts import twistd_command


class PluginTests(TestCase):
    """Packaging silently drops plugin files; these tests notice."""

    def run_outside_tree(self, *command: str) -> subprocess.CompletedProcess[str]:
        # Outside the source tree, only the installed copy can be found.
        environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        return subprocess.run(list(command), cwd="/", env=environment, capture_output=True, text=True, timeout=60)

    def test_installed_plugin_found(self) -> None:
        """getPlugins(IServiceMaker) finds ociregistry from the installed package."""
        result = self.run_outside_tree(
            sys.executable, "-c",
            "from twisted.plugin import getPlugins\n"
            "from twisted.application.service import IServiceMaker\n"
            "print(sorted(p.tapname for p in getPlugins(IServiceMaker)))",
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("'ociregistry'", result.stdout)

    def test_twistd_help_lists_plugin(self) -> None:
        """twistd --help lists the plugin."""
        result = self.run_outside_tree(*twistd_command("--help"))
        self.assertIn("ociregistry", result.stdout)

    def test_bad_option_is_usage_error(self) -> None:
        """A bad option value exits non-zero naming the problem."""
        result = self.run_outside_tree(*twistd_command("ociregistry", "--port", "notaport"))
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("--port", result.stdout + result.stderr)
