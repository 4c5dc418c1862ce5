"""The twistd plugin's options: precedence, validation, --print-config and the example file."""

from __future__ import annotations

import io
import math
import os
import sys
from importlib import resources

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from ociregistry.config import load_config_file
from ociregistry.tap import Options

GO_SERVER_KEYS = ("imagePath", "logLevel", "logFile", "port", "host", "os", "arch", "pullTimeout", "health",
                  "metrics", "alwaysPullLatest", "airGapped", "defaultNs", "preloadImages", "registries",
                  "pruneConfig", "serverTlsConfig")


class OptionsTests(SynchronousTestCase):
    """Command line over configuration file over defaults."""

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def parse(self, *args: str) -> Options:
        options = Options()
        options.parseOptions(list(args))
        return options

    def test_defaults(self) -> None:
        """Without a file, the documented defaults apply."""
        config = self.parse().config
        self.assertEqual((config.image_path, config.listen, config.default_ns, config.tag_ttl),
                         ("/var/lib/ociregistry", ("tcp:8080",), "docker.io", 300.0))
        self.assertFalse(config.air_gapped or config.always_pull_latest or config.allow_any_upstream)

    def test_precedence(self) -> None:
        """Options given on the command line win over the file, which wins over defaults."""
        path = self.write("port: 9000\nhost: 127.0.0.1\ndefaultNs: quay.io\nmanifestInvalidation: 1m\n"
                          "airGapped: true\npullTimeout: 5000\nallowUpstreams: ['*.corp']\n")
        config = self.parse("--config-file", path, "--port", "9100", "--tag-ttl", "never").config
        self.assertEqual(config.listen, ("tcp:9100:interface=127.0.0.1",))
        self.assertEqual((config.default_ns, config.tag_ttl, config.pull_timeout), ("quay.io", math.inf, 5.0))
        self.assertEqual((config.air_gapped, config.allow_upstreams), (True, ("*.corp",)))
        self.assertEqual(self.parse("--config-file", path).config.tag_ttl, 60.0)

    def test_bad_values_name_the_option(self) -> None:
        """Bad values are usage errors that name the option or key."""
        for args, name in [(["--port", "http"], "--port"), (["--tag-ttl", "soon"], "--tag-ttl"),
                           (["--listen", "nonsense:1"], "--listen"), (["--default-ns", "a b"], "--default-ns"),
                           (["--max-manifest-size", "1MiB"], "--max-manifest-size"),
                           (["--idle-timeout", "0"], "--idle-timeout")]:
            with self.assertRaises(usage.UsageError) as caught:
                self.parse(*args)
            self.assertIn(name, str(caught.exception))
        path = self.write("registries:\n  - name: quay.io\n    scheme: ftp\n")
        with self.assertRaises(usage.UsageError) as caught:
            self.parse("--config-file", path)
        self.assertIn("registries[0].scheme", str(caught.exception))

    def test_print_config_masks_secrets(self) -> None:
        """--print-config shows the effective configuration without passwords or tokens."""
        path = self.write("registries:\n  - name: quay.io\n    auth: {user: me, password: hunter2}\n"
                          "  - name: ghcr.io\n    auth: {token: tok-secret}\n")
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        with self.assertRaises(SystemExit):
            self.parse("--config-file", path, "--print-config", "--port", "8181")
        printed = out.getvalue()
        self.assertIn("tcp:8181", printed)
        self.assertIn("user: me", printed)
        self.assertNotIn("hunter2", printed)
        self.assertNotIn("tok-secret", printed)

    def test_credentials_environment(self) -> None:
        """$OCIREGISTRY_CREDENTIALS adds credentials; a file's own credentials win; bad JSON is a usage error."""
        path = self.write("registries:\n  - name: quay.io\n    auth: {user: file, password: p}\n")
        self.patch(os, "environ", {"OCIREGISTRY_CREDENTIALS": '{"quay.io": {"user": "env", "password": "e"},'
                                                              ' "ghcr.io": {"token": "t"}}'})
        registries = {r.name: r for r in self.parse("--config-file", path).config.registries}
        self.assertEqual(registries["quay.io"].user, "file")
        self.assertEqual(registries["ghcr.io"].token, "t")
        self.patch(os, "environ", {"OCIREGISTRY_CREDENTIALS": "{not json"})
        with self.assertRaises(usage.UsageError) as caught:
            self.parse()
        self.assertIn("OCIREGISTRY_CREDENTIALS", str(caught.exception))

    def test_example_documents_every_key(self) -> None:
        """The shipped example configuration names every key of the Go server and parses."""
        text = resources.files("ociregistry").joinpath("example-config.yaml").read_text("utf-8")
        for key in GO_SERVER_KEYS:
            self.assertIn(f"{key}:", text)
        directory = self.mktemp()
        os.makedirs(directory)
        for name in ["private-ca.crt", "client.crt", "client.key", "server.crt", "server.key", "clients-ca.crt"]:
            with open(os.path.join(directory, name), "w") as f:
                f.write("placeholder")
        settings = load_config_file(self.write(text.replace("/etc/ociregistry", directory)),
                                    {"PRIVATE_REGISTRY_PASSWORD": "x"})
        self.assertEqual(len(settings.registries), 6)
        self.assertEqual(settings.manifest_ttl, 300.0)
