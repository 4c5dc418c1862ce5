"""Where the server listens: --port and --host typed beside --listen add a listener, as in twistd's web
plugin, rather than being dropped."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from ociregistry.tap import Options
from tests.realparts import WorkspaceTestCase, free_port, http_request, make_ca, start_server


def parse(*args: str) -> Options:
    """Options parsed from a command line."""
    options = Options()
    options.parseOptions(list(args))
    return options


class ListenOptionTests(SynchronousTestCase):
    """Every listener a user named is in the configuration."""

    def test_port_beside_listen(self) -> None:
        """--listen X --port Y listens on both; --host alone adds the default port on that address."""
        config = parse("--listen", "tcp:9001:interface=127.0.0.1", "--port", "9002").config
        self.assertEqual(config.listen, ("tcp:9001:interface=127.0.0.1", "tcp:9002"))
        config = parse("--port", "9002", "--listen", "unix:/tmp/o.sock", "--host", "127.0.0.2").config
        self.assertEqual(config.listen, ("unix:/tmp/o.sock", "tcp:9002:interface=127.0.0.2"))
        config = parse("--listen", "tcp:9001", "--host", "127.0.0.3").config
        self.assertEqual(config.listen, ("tcp:9001", "tcp:8080:interface=127.0.0.3"))

    def test_listen_replaces_the_files_port(self) -> None:
        """--listen alone replaces the config file's port and host (command line over file)."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("port: 9000\nhost: 127.0.0.1\n")
        self.assertEqual(parse("--config-file", path, "--listen", "tcp:9001").config.listen, ("tcp:9001",))
        self.assertEqual(parse("--config-file", path, "--listen", "tcp:9001", "--port", "9002").config.listen,
                         ("tcp:9001", "tcp:9002:interface=127.0.0.1"))

    def test_port_is_https_with_tls(self) -> None:
        """With a certificate and no --tls-port, the --port listener beside --listen serves HTTPS."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cert, key = make_ca(directory).issue_server("localhost")
        config = parse("--tls-cert", cert, "--tls-key", key, "--listen", "tcp:9001", "--port", "9443").config
        self.assertEqual((config.listen, config.tls_listen), (("tcp:9001",), ("tcp:9443",)))
        config = parse("--tls-cert", cert, "--tls-key", key, "--listen", "tcp:9001", "--port", "9002",
                       "--tls-port", "9443").config
        self.assertEqual((config.listen, config.tls_listen), (("tcp:9001", "tcp:9002"), ("tcp:9443",)))


class ListenServerTests(WorkspaceTestCase):
    """A real twistd serves the registry API on every listener it was given."""

    async def test_serves_on_listen_and_port(self) -> None:
        """`twistd ociregistry --listen X --port Y --host 127.0.0.1` answers /v2/ on X and on Y."""
        port = free_port()
        server = await start_server(self.path("cache"), test=self,
                                    args=("--port", str(port), "--host", "127.0.0.1", "--admin-listen", "none"))
        for url in (server.url, f"http://127.0.0.1:{port}"):
            response, body = await http_request("GET", f"{url}/v2/")
            self.assertEqual((response.code, body), (200, b"{}"), url)
        self.assertIn(f"tcp:{port}:interface=127.0.0.1", server.log_text())
