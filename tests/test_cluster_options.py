"""Which replicas take part in one download per blob: --advertise-url, --lease-seconds, and the single node."""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from ociregistry.metrics import Metrics
from ociregistry.tap import Options, open_cache


class ClusterOptionsTests(SynchronousTestCase):
    """The advertised URL and the lease, from the command line over the file; no cluster on one node."""

    def parse(self, *args: str) -> Options:
        options = Options()
        options.parseOptions(list(args))
        return options

    def test_command_line_wins(self) -> None:
        """--advertise-url wins over advertiseUrl, without its trailing slash; --lease-seconds takes a duration."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("advertiseUrl: http://10.0.0.11:8080\n")
        self.assertEqual(self.parse("--config-file", path).config.advertise_url, "http://10.0.0.11:8080")
        config = self.parse("--config-file", path, "--advertise-url", "https://10.0.0.12:8443/",
                            "--lease-seconds", "5s").config
        self.assertEqual((config.advertise_url, config.lease_seconds), ("https://10.0.0.12:8443", 5.0))
        self.assertEqual(self.parse().config.lease_seconds, 30.0)

    def test_bad_values_name_the_option(self) -> None:
        """An advertised URL that is not http(s) to a host, or a lease that is no duration, names the option."""
        for args, name in [(["--advertise-url", "10.0.0.11:8080"], "--advertise-url"),
                           (["--advertise-url", "http://10.0.0.11:8080/path"], "--advertise-url"),
                           (["--lease-seconds", "soon"], "--lease-seconds")]:
            with self.assertRaises(usage.UsageError) as caught:
                self.parse(*args)
            self.assertIn(name, str(caught.exception))

    def test_single_node_has_no_cluster(self) -> None:
        """sqlite and files, even with an advertised URL: no cluster, so no lease is ever asked for."""
        image_path = os.path.abspath(self.mktemp())
        config = self.parse("--image-path", image_path, "--advertise-url", "http://10.0.0.11:8080").config
        cache, index, _ = open_cache(config, reactor, Metrics())
        self.addCleanup(index.engine.close)
        self.assertIsNone(cache.cluster)
