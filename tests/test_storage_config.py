"""The shared-storage settings: storage.s3 and advertiseUrl, checked like every other key."""

from __future__ import annotations

import io
import os
import sys
from importlib import resources

import yaml
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from ociregistry.config import ConfigError, S3Config, S3Settings, load_config_file
from ociregistry.tap import Options

STORAGE = """\
index:
  postgresql: "postgresql://ociregistry@db.internal:5432/ociregistry"
storage:
  s3:
    endpoint: http://rgw.internal:7480/
    bucket: ociregistry
    region: eu-west-1
    accessKey: OCIREG
    secretKeyFromEnv: OCIREGISTRY_S3_SECRET
    prefix: "cache/"
    redirect: true
    abandonUploadsAfter: 2h
advertiseUrl: http://10.0.0.11:8080
"""


class StorageSettingsTests(SynchronousTestCase):
    """storage.s3 and advertiseUrl in the configuration file."""

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def load(self, text: str, environ: dict[str, str] | None = None) -> object:
        return load_config_file(self.write(text), environ if environ is not None else {})

    def error(self, text: str, environ: dict[str, str] | None = None) -> str:
        with self.assertRaises(ConfigError) as caught:
            self.load(text, environ)
        return str(caught.exception)

    def test_every_key(self) -> None:
        """Every key of the issue's example is read, the secret from the environment."""
        settings = load_config_file(self.write(STORAGE), {"OCIREGISTRY_S3_SECRET": "s3cret"})
        self.assertEqual(settings.storage, S3Settings(
            S3Config("http://rgw.internal:7480", "ociregistry", "OCIREG", "s3cret", "eu-west-1", "cache/"),
            redirect=True, abandon_uploads_after=7200.0))
        self.assertEqual(settings.advertise_url, "http://10.0.0.11:8080")
        self.assertNotIn("s3cret", repr(settings.storage))

    def test_defaults_and_inline_secret(self) -> None:
        """Region, prefix and redirect default; secretKey may be given inline."""
        settings = load_config_file(self.write(
            "storage:\n  s3: {endpoint: 'https://s3.example', bucket: abc, accessKey: A, secretKey: S}\n"), {})
        self.assertEqual(settings.storage, S3Settings(S3Config("https://s3.example", "abc", "A", "S")))

    def test_bad_settings(self) -> None:
        """Unknown keys are named with a suggestion; missing or wrong values say what is expected."""
        base = "storage:\n  s3: {endpoint: 'http://h:1', bucket: abc, accessKey: A, secretKey: S, %s}\n"
        self.assertIn("storage.s3.redirct: unknown key (did you mean 'redirect'?)", self.error(base % "redirct: true"))
        self.assertIn("storage.gcs: unknown key", self.error("storage:\n  gcs: {}\n"))
        self.assertIn("storage: expected 's3'", self.error("storage: {}\n"))
        self.assertIn("missing 'bucket'", self.error("storage:\n  s3: {endpoint: 'http://h:1', accessKey: A, secretKey: S}\n"))
        self.assertIn("missing 'secretKey' or 'secretKeyFromEnv'",
                      self.error("storage:\n  s3: {endpoint: 'http://h:1', bucket: abc, accessKey: A}\n"))
        self.assertIn("expected a bucket name", self.error(base.replace("bucket: abc", "bucket: A_B") % "prefix: ''"))
        self.assertIn("expected a URL like http://10.0.0.11:8080",
                      self.error(base.replace("'http://h:1'", "h:1") % "prefix: ''"))
        self.assertIn("give either secretKey or secretKeyFromEnv", self.error(base % "secretKeyFromEnv: X", {"X": "y"}))
        self.assertIn("environment variable OCIREGISTRY_S3_SECRET is not set", self.error(STORAGE))
        self.assertIn("expected true or false", self.error(base % "redirect: maybe"))
        self.assertIn("advertiseUrl: expected a URL", self.error("advertiseUrl: 10.0.0.11:8080\n"))

    def test_example_documents_storage(self) -> None:
        """The shipped example configuration documents every storage key and advertiseUrl."""
        text = resources.files("ociregistry").joinpath("example-config.yaml").read_text("utf-8")
        for key in ("storage", "s3", "endpoint", "bucket", "region", "accessKey", "secretKeyFromEnv",
                    "secretKey", "prefix", "redirect", "abandonUploadsAfter", "advertiseUrl"):
            self.assertIn(f"{key}:", text)


class StorageOptionsTests(SynchronousTestCase):
    """What the server makes of the storage settings at start."""

    def setUp(self) -> None:
        os.environ["OCIREGISTRY_S3_SECRET"] = "s3cret"
        self.addCleanup(os.environ.pop, "OCIREGISTRY_S3_SECRET", None)

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_needs_the_shared_index(self) -> None:
        """A bucket with the embedded sqlite index is refused: that index cannot be shared."""
        path = self.write(STORAGE.replace('  postgresql: "postgresql://ociregistry@db.internal:5432/ociregistry"\n', "")
                          .replace("index:\n", ""))
        with self.assertRaises(usage.UsageError) as caught:
            Options().parseOptions(["--config-file", path])
        self.assertIn("storage.s3 needs the shared index", str(caught.exception))
        # The index URL on the command line is as good.
        options = Options()
        options.parseOptions(["--config-file", path, "--index-url", "postgresql://db/ociregistry"])
        self.assertEqual(options.config.storage.s3.bucket, "ociregistry")

    def test_print_config_masks_the_secret(self) -> None:
        """--print-config shows the storage settings with the secret masked."""
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        with self.assertRaises(SystemExit):
            Options().parseOptions(["--config-file", self.write(STORAGE), "--print-config"])
        shown = yaml.safe_load(out.getvalue())
        self.assertNotIn("s3cret", out.getvalue())
        self.assertEqual(shown["storage"]["s3"]["secret_key"], "***")
        self.assertEqual((shown["storage"]["s3"]["bucket"], shown["advertise_url"]),
                         ("ociregistry", "http://10.0.0.11:8080"))
