"""Real services for tests that are too slow to start per test: each is started once
per test run by the first test that asks for it, shared by every later test, and
stopped when the run exits.

A service is a ``Shared(start)``: ``start`` is an async function that builds it in a
private temporary directory and returns an object with a synchronous ``stop()``
(called from ``atexit``, when the reactor no longer runs).  Ceph RGW is the first;
a PostgreSQL cluster fits the same pattern.
"""

from __future__ import annotations

import atexit
import base64
import ctypes
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import psycopg
import treq
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, FirstError, gatherResults
from twisted.internet.threads import deferToThread
from twisted.web.client import HTTPConnectionPool

from ociregistry.s3 import _NS, S3Config, S3Store, _xml, key_for
from tests.postgres_service import fresh_database
from tests.realparts import (
    PROJECT_ROOT,
    Server,
    WorkspaceTestCase,
    _tail,
    free_port,
    sleep,
    start_server,
    twistd_command,
)

# How long one daemon may take to come up, and one setup command to finish.
START_TIMEOUT = 30.0
COMMAND_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0


class Stoppable(Protocol):
    """What a shared service offers its owner: a way to stop it without the reactor."""

    def stop(self) -> None: ...


S = TypeVar("S", bound=Stoppable)


class Shared(Generic[S]):
    """A real service for the whole test run: started on first ``get()``, stopped at exit.

    A service that failed to start fails every later ``get()`` with the same error
    rather than being tried again by each test.
    """

    def __init__(self, start: Callable[[], Awaitable[S]]) -> None:
        self._start = start
        self._service: S | None = None
        self._error: BaseException | None = None
        self._waiters: list[Deferred[S]] = []
        self.start_seconds: float | None = None

    async def get(self) -> S:
        """The running service, started now if nobody asked before."""
        if self._service is not None:
            return self._service
        if self._error is not None:
            raise self._error
        waiter: Deferred[S] = Deferred()
        self._waiters.append(waiter)
        if len(self._waiters) == 1:
            Deferred.fromCoroutine(self._run())
        return await waiter

    async def _run(self) -> None:
        began = time.monotonic()
        try:
            service = await self._start()
        except BaseException as e:
            self._error = e
        else:
            self.start_seconds = time.monotonic() - began
            self._service = service
            atexit.register(service.stop)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if self._error is not None:
                waiter.errback(self._error)
            else:
                waiter.callback(service)


def _die_with_parent() -> None:
    # A daemon must not outlive an interrupted test run (atexit does not run on SIGKILL).
    # SIGKILL, because radosgw waits for its cluster on SIGTERM, which may be gone by then.
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Daemons:
    """Processes of one service, each logging to a file in the service's directory."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def log_path(self, name: str) -> str:
        """Where a daemon's or command's output goes."""
        return os.path.join(self.directory, f"{name}.out")

    def tail(self, name: str) -> str:
        """The end of what a daemon wrote: its own log file (``name.log``) and its output."""
        parts = [_tail(os.path.join(self.directory, f"{name}.log"), 3000), _tail(self.log_path(name), 1500)]
        return "\n".join(part for part in parts if part.strip()) or "(no output)"

    async def run(self, name: str, argv: Sequence[str], *, also: Sequence[str] = ()) -> str:
        """Run a setup command to completion (in a thread, bounded in time); its output.

        A failure shows the command's output and the logs of the daemons it talks to (``also``).
        """
        def call() -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(list(argv), capture_output=True, cwd=self.directory,
                                  timeout=COMMAND_TIMEOUT, preexec_fn=_die_with_parent)

        def logs() -> str:
            return "\n".join(f"--- {log}:\n{self.tail(log)}" for log in (name, *also))
        try:
            done = await deferToThread(call)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{name} did not finish in {COMMAND_TIMEOUT:.0f} s:\n{logs()}") from None
        with open(self.log_path(name), "ab") as f:
            f.write(done.stdout + done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"{name} ({argv[0]}) failed with {done.returncode}:\n{logs()}")
        return done.stdout.decode("utf-8", "replace")

    def start(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        """Start a daemon in the foreground of a session of its own."""
        with open(self.log_path(name), "ab") as log:
            process = subprocess.Popen(list(argv), cwd=self.directory, stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                       preexec_fn=_die_with_parent)
        self._running.append((name, process))
        return process

    async def until(self, name: str, process: subprocess.Popen[bytes],
                    ready: Callable[[], Awaitable[bool]]) -> None:
        """Wait for ``ready`` to say yes; fail with the daemon's log if it exits or takes too long."""
        deadline = time.monotonic() + START_TIMEOUT
        while not await ready():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.tail(name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not come up in {START_TIMEOUT:.0f} s:\n{self.tail(name)}")
            await sleep(0.05)

    def stop(self) -> None:
        """SIGTERM the daemons, last started first, each waited for (SIGKILL if it lingers)."""
        while self._running:
            _, process = self._running.pop()
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _port_window(count: int, address: str = "127.0.0.1") -> int:
    """The first of ``count`` consecutive ports that are free now, below the ephemeral range."""
    for _ in range(200):
        base = random.randrange(20000, 32000 - count)
        try:
            for port in range(base, base + count):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind((address, port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no window of {count} free ports on {address}")


def _cephx_key() -> str:
    """A new cephx secret: AES type, creation time, length, 16 random bytes (ceph-authtool's format)."""
    return base64.b64encode(struct.pack("<HIIH", 1, int(time.time()), 0, 16) + os.urandom(16)).decode()


# Every path a Ceph daemon or tool would otherwise take from /etc/ceph, /var/lib/ceph,
# /var/log/ceph or /var/run/ceph points into the service's directory.
_CEPH_CONF = """\
[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{mon_port}
public addr = 127.0.0.1
ms bind msgr1 = false
ms bind port min = {bind_min}
ms bind port max = {bind_max}
keyring = {dir}/keyring
run dir = {dir}/run
crash dir = {dir}/crash
log file = {dir}/$name.log
mon cluster log file = default={dir}/$cluster.$channel.log cluster={dir}/$cluster.log
admin socket = {dir}/run/$name.asok
pid file = {dir}/run/$name.pid
mon data = {dir}/$name
osd data = {dir}/$name
rgw data = {dir}/$name
osd objectstore = memstore
memstore device bytes = 2147483648
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
osd crush chooseleaf type = 0
osd pool default pg num = 8
osd pool default pgp num = 8
mon max pg per osd = 1000
paxos propose interval = 0.05
mon data avail crit = 1

[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:{rgw_port}
"""

_KEYRING = """\
[mon.]
\tkey = {mon}
\tcaps mon = "allow *"
[client.admin]
\tkey = {admin}
\tcaps mon = "allow *"
\tcaps osd = "allow *"
\tcaps mgr = "allow *"
[osd.0]
\tkey = {osd}
\tcaps mon = "allow profile osd"
\tcaps osd = "allow *"
\tcaps mgr = "allow profile osd"
[client.rgw.a]
\tkey = {rgw}
\tcaps mon = "allow rw"
\tcaps osd = "allow rwx"
"""

CEPH_BINARIES = ("monmaptool", "ceph-mon", "ceph-osd", "radosgw", "ceph", "radosgw-admin")


@dataclass
class CephRGW:
    """One monitor, one memstore OSD and radosgw on 127.0.0.1, with one S3 user; all in ``directory``."""

    directory: str
    endpoint: str
    access_key: str
    secret_key: str
    daemons: Daemons
    region: str = "us-east-1"

    @property
    def config(self) -> str:
        """The cluster's ceph.conf, for ceph and radosgw-admin commands."""
        return os.path.join(self.directory, "ceph.conf")

    def s3_config(self, bucket: str, prefix: str = "") -> S3Config:
        """Settings for the S3 driver to use a bucket here as this cluster's user."""
        return S3Config(self.endpoint, bucket, self.access_key, self.secret_key, self.region, prefix)

    def stop(self) -> None:
        """SIGTERM radosgw, the OSD, then the monitor, and remove the directory."""
        self.daemons.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


async def _http_answers(url: str) -> bool:
    try:
        response = await treq.get(url, timeout=2, pool=HTTPConnectionPool(reactor, persistent=False))
        await treq.content(response)
    except CancelledError:
        raise
    except Exception:
        return False
    return True


async def start_ceph_rgw() -> CephRGW:
    """Build and start a one-node Ceph cluster with radosgw in a new temporary directory."""
    missing = [name for name in CEPH_BINARIES if shutil.which(name) is None]
    if missing:
        raise RuntimeError(f"Ceph is not installed (no {', '.join(missing)}): scripts/test installs "
                           "ceph-mon ceph-osd radosgw ceph-common")
    directory = tempfile.mkdtemp(prefix="ceph-")
    daemons = Daemons(directory)
    try:
        return await _start_ceph(directory, daemons)
    except BaseException:
        # The error carries the logs that matter; nothing is left behind.
        daemons.stop()
        shutil.rmtree(directory, ignore_errors=True)
        raise


async def _together(*steps: Awaitable[object]) -> None:
    """Run independent steps at once; the first failure is raised once all have ended."""
    try:
        await gatherResults([Deferred.fromCoroutine(step) for step in steps], consumeErrors=True)  # type: ignore[arg-type]
    except FirstError as e:
        e.subFailure.raiseException()


async def _start_ceph(directory: str, daemons: Daemons) -> CephRGW:
    # The monitor on one port, the OSD's four msgr2 listeners in the rest.
    base = _port_window(12)
    rgw_port = free_port()
    fsid = str(uuid.uuid4())
    for sub in ("run", "crash", "mon.a", "osd.0", "client.rgw.a"):
        os.mkdir(os.path.join(directory, sub))
    config = os.path.join(directory, "ceph.conf")
    with open(config, "w") as f:
        f.write(_CEPH_CONF.format(fsid=fsid, dir=directory, mon_port=base, bind_min=base + 1,
                                  bind_max=base + 11, rgw_port=rgw_port))
    with open(os.path.join(directory, "keyring"), "w") as f:
        f.write(_KEYRING.format(mon=_cephx_key(), admin=_cephx_key(), osd=_cephx_key(), rgw=_cephx_key()))
    conf = ["-c", config]
    monmap = os.path.join(directory, "monmap")
    await daemons.run("monmaptool", ["monmaptool", "--create", "--fsid", fsid,
                                     "--addv", "a", f"[v2:127.0.0.1:{base}]", monmap])
    await daemons.run("mon.a", ["ceph-mon", *conf, "-i", "a", "--mkfs", "--monmap", monmap])
    mon = daemons.start("mon.a", ["ceph-mon", *conf, "-i", "a", "-f"])
    osd_uuid = str(uuid.uuid4())
    # Registering the OSD with the monitor and making its store are independent.
    await _together(
        daemons.run("osd new", ["ceph", *conf, "--connect-timeout", "20", "osd", "new", osd_uuid, "0"],
                    also=["mon.a"]),
        daemons.run("osd.0", ["ceph-osd", *conf, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid]))
    if mon.poll() is not None:
        raise RuntimeError(f"ceph-mon exited with {mon.returncode}:\n{daemons.tail('mon.a')}")
    daemons.start("osd.0", ["ceph-osd", *conf, "-i", "0", "-f"])
    rgw = daemons.start("client.rgw.a", ["radosgw", *conf, "-n", "client.rgw.a", "-f"])
    access_key = "OCIREG" + secrets.token_hex(7).upper()
    secret_key = secrets.token_urlsafe(30)
    endpoint = f"http://127.0.0.1:{rgw_port}"
    await daemons.until("client.rgw.a", rgw, lambda: _http_answers(endpoint + "/"))
    # Only now: run while radosgw sets up its zone, radosgw-admin sometimes took 5 s, not 0.1 s.
    await daemons.run("radosgw-admin", [
        "radosgw-admin", *conf, "user", "create", "--uid", "ociregistry", "--display-name", "ociregistry",
        "--access-key", access_key, "--secret-key", secret_key], also=["client.rgw.a"])
    return CephRGW(directory, endpoint, access_key, secret_key, daemons)


ceph = Shared(start_ceph_rgw)


async def ceph_rgw() -> CephRGW:
    """The test run's Ceph RGW, started by the first test that asks."""
    return await ceph.get()


class ReplicaTestCase(WorkspaceTestCase):
    """Replicas under twistd, on one fresh PostgreSQL database and one fresh Ceph RGW bucket."""

    async def setUp(self) -> None:  # type: ignore[override]
        super().setUp()
        self.rgw: CephRGW = await ceph_rgw()
        self.database = fresh_database(self)
        self.bucket = "r-" + secrets.token_hex(6)
        self.s3 = S3Store(self.rgw.s3_config(self.bucket), reactor=reactor)
        self.addCleanup(self.s3.close)
        await self.s3.create_bucket()

    def shared_config(self, registries: list[dict[str, Any]] | None = None, s3: dict[str, Any] | None = None,
                      **extra: object) -> str:
        """The replicas' configuration file for a command run beside them (the secret in it); ``s3`` overrides."""
        path = self.path(f"config-{secrets.token_hex(3)}.yaml")
        with open(path, "w") as f:
            json.dump({"index": {"postgresql": self.database},
                       "storage": {"s3": {"endpoint": self.rgw.endpoint, "bucket": self.bucket,
                                          "region": self.rgw.region, "accessKey": self.rgw.access_key,
                                          "secretKey": self.rgw.secret_key, **(s3 or {})}},
                       "registries": registries or [], **extra}, f)
        return path

    def replica_config(self, name: str, registries: list[dict[str, Any]], port: int,
                       database: str | None = None, **s3: Any) -> str:
        """The replicas' shared settings, with this replica's advertiseUrl."""
        path = self.path(f"config-{name}.yaml")
        with open(path, "w") as f:
            json.dump({
                "index": {"postgresql": database or self.database},
                "storage": {"s3": {"endpoint": self.rgw.endpoint, "bucket": self.bucket,
                                   "region": self.rgw.region, "accessKey": self.rgw.access_key,
                                   "secretKeyFromEnv": "OCIREGISTRY_S3_SECRET", **s3}},
                "advertiseUrl": f"http://127.0.0.1:{port}",
                "registries": registries,
            }, f)
        return path

    async def replica(self, name: str, registries: list[dict[str, Any]], secret: str | None = None,
                      database: str | None = None, admin: str = "none", args: tuple[str, ...] = (),
                      **s3: Any) -> Server:
        """Start one replica, with an image path of its own (its spool) and the shared settings."""
        port = free_port()
        config = self.replica_config(name, registries, port, database, **s3)
        return await start_server(self.path(f"spool-{name}"), test=self, port=port,
                                  args=("--config-file", config, "--admin-listen", admin, *args),
                                  env={"OCIREGISTRY_S3_SECRET": secret or self.rgw.secret_key})


    async def refused_at_start(self, name: str, secret: str | None = None) -> str:
        """Run a replica that must refuse to start: it exits non-zero, saying why in one line (returned)."""
        config = self.replica_config(name, [], 1)
        env = {**os.environ, "OCIREGISTRY_S3_SECRET": secret or self.rgw.secret_key, "PYTHONPATH": PROJECT_ROOT}
        command = twistd_command("ociregistry", "--image-path", self.path(f"spool-{name}"), "--listen",
                                 "tcp:0:interface=127.0.0.1", "--config-file", config, "--admin-listen", "none")
        done = await deferToThread(subprocess.run, command, env=env, capture_output=True, timeout=60)
        output = (done.stdout + done.stderr).decode()
        self.assertNotEqual(done.returncode, 0)
        self.assertNotIn("Traceback", output)
        lines = [line for line in output.splitlines() if "ociregistry:" in line]
        self.assertEqual(len(lines), 1, output)
        return lines[0]


async def until(ask: Any, good: Any = lambda found: found is not None, limit: float = 20.0) -> Any:
    """Ask until the answer is good (or the time is up); the last answer."""
    deadline = time.monotonic() + limit
    while True:
        found = await ask()
        if good(found) or time.monotonic() > deadline:
            return found
        await sleep(0.2)


async def bucket_objects(s3: S3Store) -> dict[str, int]:
    """Every object under the store's prefix (ListObjectsV2, page by page): key without the prefix, and size."""
    found: dict[str, int] = {}
    token: dict[str, str] = {}
    while True:
        query = {"list-type": "2", "prefix": s3.config.prefix, **token}
        response = await s3._call("GET", None, query=query, what="list objects")
        root = _xml(await s3._ok(response, "list objects"), "list objects")
        for item in root.iter(_NS + "Contents"):
            key = (item.findtext(_NS + "Key") or "").removeprefix(s3.config.prefix)
            found[key] = int(item.findtext(_NS + "Size") or 0)
        if root.findtext(_NS + "IsTruncated") != "true":
            return found
        token = {"continuation-token": root.findtext(_NS + "NextContinuationToken") or ""}


async def object_digest(s3: S3Store, key: str) -> str:
    """The sha256 digest of an object's bytes, hashed as they arrive (never whole in memory)."""
    digest = hashlib.sha256()
    response = await treq.get(s3.presign_get(key, 300), pool=HTTPConnectionPool(reactor, persistent=False))
    if response.code != 200:
        await treq.content(response)
        raise RuntimeError(f"GET {key}: {response.code}")
    await treq.collect(response, digest.update)
    return "sha256:" + digest.hexdigest()


async def shared_cache_problems(s3: S3Store, database: str) -> list[str]:
    """What is wrong with a shared cache: an object that does not hash to its key, an index row without its object."""
    objects = await bucket_objects(s3)
    problems = []
    for key in sorted(objects):
        algorithm, _, encoded = key.removeprefix("blobs/").partition("/")
        if not key.startswith("blobs/") or algorithm != "sha256":
            problems.append(f"{key}: not a content-addressed key")
            continue
        actual = await object_digest(s3, key)
        if actual != f"{algorithm}:{encoded}":
            problems.append(f"{key}: its bytes hash to {actual}")
    with psycopg.connect(database) as db:
        rows = db.execute("SELECT digest, size FROM blobs UNION ALL SELECT digest, size FROM manifests").fetchall()
    for digest, size in rows:
        if objects.get(key_for(digest)) != size:
            problems.append(f"{digest}: an index row of {size} bytes, "
                            f"and in the bucket {objects.get(key_for(digest), 'nothing')}")
    return problems
