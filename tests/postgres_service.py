"""A real PostgreSQL 15 for the tests: started once per test run when a test first needs it, a database per test.

The cluster lives in a temporary directory owned by the ``postgres`` user
(root runs its tools through ``runuser``), listens on 127.0.0.1 on a free
port, and is stopped at exit with ``pg_ctl stop -m immediate``.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import uuid
from typing import Any

import psycopg
from twisted.trial.unittest import SynchronousTestCase

from tests.realparts import free_port

PG_BIN = "/usr/lib/postgresql/15/bin"


class PostgresCluster:
    """One throw-away cluster: initdb, pg_ctl start, and stop (also when it is restarted by a test)."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="ociregistry-pg-")
        self.data = os.path.join(self.directory, "data")
        self.log = os.path.join(self.directory, "postgres.log")
        self.port = free_port()
        if os.getuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.directory, owner.pw_uid, owner.pw_gid)
        self._run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-locale")
        self.start()
        atexit.register(self.remove)

    def _run(self, tool: str, *args: str) -> None:
        command = [os.path.join(PG_BIN, tool), *args]
        if os.getuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)

    def start(self) -> None:
        """Start (again) on the same port, waiting until it accepts connections."""
        self._run("pg_ctl", "-D", self.data, "-l", self.log, "-w", "-o",
                  f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self) -> None:
        """Stop at once, as a crash would (clients' connections drop)."""
        self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        """Stop, and remove the cluster's files."""
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.directory, ignore_errors=True)

    def url(self, database: str) -> str:
        """The connection URL of a database in this cluster."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def admin(self, statement: str) -> Any:
        """Run one statement as the superuser on the maintenance database."""
        with psycopg.connect(self.url("postgres"), autocommit=True) as db:
            return db.execute(statement).fetchall() if statement.lstrip().upper().startswith("SELECT") \
                else db.execute(statement)


_cluster: PostgresCluster | None = None
_lock = threading.Lock()


def cluster() -> PostgresCluster:
    """The run's cluster, started by the first caller."""
    global _cluster
    with _lock:
        if _cluster is None:
            if not os.path.exists(os.path.join(PG_BIN, "initdb")):
                raise RuntimeError(f"{PG_BIN}/initdb is missing: install the Debian package postgresql (scripts/test does)")
            _cluster = PostgresCluster()
        return _cluster


def fresh_database(test: SynchronousTestCase) -> str:
    """A new empty database for one test (dropped at its cleanup); its URL."""
    running = cluster()
    name = "test_" + uuid.uuid4().hex[:16]
    running.admin(f"CREATE DATABASE {name}")
    test.addCleanup(running.admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    return running.url(name)
