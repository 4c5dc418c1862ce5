"""The index in a real PostgreSQL 15: the same cases as sqlite, migrations racing, the CLI, start-up and restarts."""

from __future__ import annotations

import json
import os
import threading

from psycopg import errors
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase

from ociregistry.index import Index, IndexConnection, IndexUnavailable, Reference, migrations, utc
from ociregistry.postgres import PostgresEngine
from ociregistry.store import CacheUnusable
from ociregistry.tap import Options, build_config
from tests.postgres_service import cluster, fresh_database
from tests.realparts import (
    PROJECT_ROOT, WorkspaceTestCase, build_oci_index, free_port, http_request, push, skopeo_copy_all, start_registry,
    start_server, twistd_command,
)
from tests.test_config import _Files
from tests.test_load import run_cli
from tests.test_store import IndexCases

LAYER = Reference("sha256:" + "c" * 64, "layer", "application/vnd.oci.image.layer.v1.tar+gzip", 100)
MANIFEST = "sha256:" + "a" * 64


def fill(index: IndexConnection) -> None:
    """One tagged image with its layer."""
    index.record_blob(LAYER.child, LAYER.size)
    index.record_manifest(MANIFEST, "application/vnd.oci.image.manifest.v1+json", 50, "quay.io", "team/app",
                          [LAYER], tag="v1")


class PostgresIndexTests(IndexCases, SynchronousTestCase):
    """The index cases on PostgreSQL."""

    def setUp(self) -> None:
        clock = Clock()
        clock.advance(1_700_000_000)
        self.index = PostgresEngine(fresh_database(self), clock).connect()
        self.addCleanup(self.index.close)


class PostgresEngineTests(WorkspaceTestCase):
    """The engine against a real server: migrations, threads, the CLI, refused and lost connections."""

    timeout = 120

    async def test_replicas_migrate_at_once(self) -> None:
        """Two replicas migrating the same empty database at once both start, and the schema is applied once."""
        url = fresh_database(self)
        barrier = threading.Barrier(2)

        def start() -> None:
            barrier.wait()
            PostgresEngine(url, reactor).connect().close()

        await deferToThread(lambda: None)
        first, second = deferToThread(start), deferToThread(start)
        await first
        await second
        engine = PostgresEngine(url, reactor)
        connection = engine.connect()
        self.addCleanup(connection.close)
        self.assertEqual(connection.raw.execute("SELECT version FROM schema_version").fetchall(),
                         [(number,) for number, _ in migrations("postgres")])

    async def test_server_calls_run_on_threads(self) -> None:
        """The server's calls run off the reactor thread and answer through Deferreds; pull times are written."""
        index = Index(PostgresEngine(fresh_database(self), reactor))
        self.addCleanup(index.close)
        await index.record_blob(LAYER.child, LAYER.size)
        record = await index.record_manifest(MANIFEST, "m", 50, "quay.io", "team/app", [LAYER], tag="v1")
        self.assertEqual((await index.tag("quay.io", "team/app", "v1"))[0], record)  # type: ignore[index]
        self.assertEqual(await index.blob_size(LAYER.child), LAYER.size)
        where = await index.run(lambda db: threading.current_thread().name)
        self.assertTrue(where.startswith("index-"), where)
        index.record_pull(MANIFEST)
        self.assertEqual(await index.flush_pulls(), 1)
        self.assertIsNone(index.readable())

    async def test_list_and_prune_from_the_cli(self) -> None:
        """`ociregistry list`, `prune` (dry, then real) and `check` work on the shared index, by config file or URL."""
        url = fresh_database(self)
        connection = PostgresEngine(url, reactor).connect()
        fill(connection)
        # Pulled an hour ago: a prune on a shared index keeps what was pulled in the last minutes.
        connection.set_times(MANIFEST, utc(reactor.seconds() - 3600), utc(reactor.seconds() - 3600))
        connection.close()
        config = self.path("config.yaml")
        with open(config, "w") as f:
            f.write(f'index:\n  postgresql: "{url}"\n')
        listed = await run_cli("list", "--config-file", config, "--image-path", self.path("cache"))
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertIn("quay.io/team/app", listed.stdout)
        self.assertIn("v1", listed.stdout)
        dry = await run_cli("prune", "--index-url", url, "--image-path", self.path("cache"),
                            "--pattern", "team/app", "--dry-run")
        self.assertEqual(dry.returncode, 0, dry.stderr)
        self.assertIn("would remove 1 images, 1 manifests, 1 blobs", dry.stdout)
        checked = await run_cli("check", "--index-url", url, "--image-path", self.path("cache"))
        self.assertIn("2 objects checked", checked.stdout)
        pruned = await run_cli("prune", "--index-url", url, "--image-path", self.path("cache"),
                               "--pattern", "team/app")
        self.assertEqual(pruned.returncode, 0, pruned.stderr)
        self.assertIn("removed 1 images, 1 manifests, 1 blobs", pruned.stdout)

    async def test_refused_at_start(self) -> None:
        """A server whose database refuses connections says so in one line and exits 1."""
        url = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
        self.assertRaises(CacheUnusable, PostgresEngine(url, reactor).start)
        command = ["timeout", "20", *twistd_command(
            "ociregistry", "--image-path", self.path("cache"), "--index-url", url,
            "--listen", f"tcp:{free_port()}:interface=127.0.0.1", "--admin-listen", "none")]
        env = {**os.environ, "PYTHONPATH": PROJECT_ROOT}
        out, err, code = await getProcessOutputAndValue(command[0], command[1:], env=env)
        output = (out + err).decode(errors="replace")
        lines = [line for line in output.splitlines() if line.strip()]
        self.assertEqual(code, 1, output)
        self.assertEqual(len(lines), 1, output)
        self.assertIn("cannot use the PostgreSQL index at", lines[0])

    async def test_lost_races_and_connections_are_retried(self) -> None:
        """A serialization failure or deadlock is tried again; a connection the database dropped is replaced unseen."""
        url = fresh_database(self)
        index = Index(PostgresEngine(url, reactor))
        self.addCleanup(index.close)
        await index.record_blob(LAYER.child, LAYER.size)
        failures = [errors.SerializationFailure("could not serialize access"), errors.DeadlockDetected("deadlock")]

        def racing(db: IndexConnection) -> int | None:
            if failures:
                raise failures.pop()
            return db.blob_size(LAYER.child)

        self.assertEqual(await index.run(racing), LAYER.size)
        self.assertEqual(failures, [])
        dropped = cluster().admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                  f" WHERE datname = '{url.rpartition('/')[2]}'")
        self.assertTrue(dropped)
        self.assertEqual(await index.blob_size(LAYER.child), LAYER.size)
        self.assertIsNone(index.readable())

    async def test_database_restarted(self) -> None:
        """While the database is down calls fail with a 503 and /health says why; afterwards it recovers by itself."""
        index = Index(PostgresEngine(fresh_database(self), reactor))
        self.addCleanup(index.close)
        await index.record_blob(LAYER.child, LAYER.size)
        running = cluster()
        await deferToThread(running.stop)
        try:
            error = await self.assertFailure(index.blob_size(LAYER.child), IndexUnavailable)
            self.assertEqual(error.status, 503)
            self.assertIn("index is not reachable", index.readable() or "")
        finally:
            await deferToThread(running.start)
        self.assertEqual(await index.blob_size(LAYER.child), LAYER.size)
        self.assertIsNone(index.readable())


class PostgresServerTests(WorkspaceTestCase):
    """A real twistd with ``index.postgresql``, a real upstream registry, skopeo."""

    timeout = 180

    async def test_pull_then_serve_offline_and_survive_a_restart(self) -> None:
        """An image pulled through the server is served again from the shared index after a restart with the
        upstream stopped; while the database is down requests are a JSON 503 and /health says why; then it recovers."""
        url = fresh_database(self)
        image = build_oci_index(self.path("oci"))
        registry = await start_registry(self.path("registry"), test=self, address="127.0.19.1", port=80)
        await push(image, registry, "team/app", "v1")
        config = self.path("config.yaml")
        with open(config, "w") as f:
            json.dump({"registries": [{"name": registry.host, "scheme": "http"}], "index": {"postgresql": url}}, f)
        server = await start_server(self.path("cache"), test=self, args=("--config-file", config, "--admin-listen", "none"))
        pulled = await skopeo_copy_all(f"{server.host}/{registry.host}/team/app:v1", self.path("pulled"))
        self.assertEqual((pulled.digest, pulled.manifests, pulled.blobs), (image.digest, image.manifests, image.blobs))
        self.assertFalse(os.path.exists(self.path("cache/index.db")))
        await registry.stop()
        await server.stop()
        await server.start()
        again = await skopeo_copy_all(f"{server.host}/{registry.host}/team/app:v1", self.path("again"))
        self.assertEqual((again.digest, again.blobs), (image.digest, image.blobs))
        manifest = f"{server.url}/v2/team/app/manifests/{image.digest}?ns={registry.host}"
        running = cluster()
        await deferToThread(running.stop)
        try:
            response, body = await http_request("GET", manifest)
            self.assertEqual(response.code, 503, body)
            self.assertEqual(json.loads(body)["errors"][0]["code"], "UNAVAILABLE")
            response, body = await http_request("GET", f"{server.url}/health")
            self.assertEqual(response.code, 503, body)
            self.assertIn("index is not reachable", json.loads(body)["problem"])
        finally:
            await deferToThread(running.start)
        response, body = await http_request("GET", manifest)
        self.assertEqual(response.code, 200, body)
        self.assertNotIn("Traceback", server.log_text())


class IndexConfigTests(_Files):
    """The ``index`` key of the configuration file, and --index-url."""

    def test_postgresql_url(self) -> None:
        """index.postgresql is the URL; its password is masked in --print-config; --index-url wins."""
        settings = self.load('index:\n  postgresql: "postgresql://ociregistry:pw@db.internal:5432/cache"\n')
        self.assertEqual(settings.index_url, "postgresql://ociregistry:pw@db.internal:5432/cache")
        options = Options()
        options.parseOptions(["--config-file", self.path])
        config = build_config(options, settings)
        self.assertEqual(config.masked()["index_url"], "postgresql://ociregistry:***@db.internal:5432/cache")
        options = Options()
        options.parseOptions(["--config-file", self.path, "--index-url", "postgresql://other/db"])
        self.assertEqual(build_config(options, settings).index_url, "postgresql://other/db")
        self.assertIsNone(self.load("index: {}\n").index_url)

    def test_bad_index_settings(self) -> None:
        """A misspelt key under index is named with a suggestion; a URL of another kind is refused."""
        self.assertIn("index.postgres: unknown key (did you mean 'postgresql'?)",
                      self.error('index:\n  postgres: "postgresql://db/x"\n'))
        self.assertIn("expected a URL like postgresql://", self.error('index:\n  postgresql: "mysql://db/x"\n'))
