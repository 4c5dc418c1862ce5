"""Run a script inside the project's environment (.venv), installing it there first."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = os.path.join(ROOT, ".venv", "bin", "python")


def enter() -> None:
    """Re-execute the running script with the project's Python, which has the server and test helpers."""
    if os.path.abspath(sys.executable) == PYTHON:
        return
    subprocess.run([os.path.join(ROOT, "scripts", "install"), "test"], check=True)
    os.execv(PYTHON, [PYTHON, *sys.argv])
