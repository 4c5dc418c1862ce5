"""The configuration file: every key, the Go server's spellings and formats, and precise errors."""

from __future__ import annotations

import math
import os
import textwrap

from twisted.trial.unittest import SynchronousTestCase

from ociregistry.config import (
    ConfigError,
    FileSettings,
    PruneSettings,
    RegistrySettings,
    ServerTLSSettings,
    TLSSettings,
    load_config_file,
    parse_duration,
    parse_size,
    registry_settings,
)

SECRET = "hunter2-Zq9"
TOKEN = "tok-7Yx3"

FULL_EXAMPLE = """\
imagePath: /srv/ociregistry
logLevel: debug
logFile: /var/log/ociregistry.log
port: 8443
host: 127.0.0.1
os: linux
arch: arm64
pullTimeout: 60000
health: 8081
metrics: 2112
alwaysPullLatest: true
airGapped: false
defaultNs: Docker.io
preloadImages: /etc/ociregistry/images.txt
allowUpstreams:
  - "*.example.com"
  - Quay.io
manifestInvalidation: 12h
registries:
  - name: quay.io
    description: Red Hat's registry
    scheme: https
    manifestInvalidation: never
    auth:
      user: robot
      password: {secret}
    tls:
      ca: {dir}/ca.crt
      cert: {dir}/client.crt
      key: {dir}/client.key
      insecureSkipVerify: false
  - name: 127.0.0.1:5000
    scheme: http
    manifestInvalidation: 0
    auth:
      user: admin
      passwordFromEnv: REGISTRY_PASSWORD
  - name: localhost:5000
    auth:
      token: {token}
    tls:
      insecureSkipVerify: true
  - name: "[::1]:5000"
    auth:
      credentialHelper: ecr-login
pruneConfig:
  enabled: true
  type: size
  duration: 30d
  frequency: 1h30m
  count: 25
  expr: "nginx,alpine"
  maxSize: 50GiB
  dryRun: false
serverTlsConfig:
  cert: {dir}/server.crt
  key: {dir}/server.key
  ca: {dir}/ca.crt
  clientAuth: verify
"""

# The defaults file from the Go server's documentation, verbatim.
GO_DEFAULTS = """\
imagePath: /var/lib/ociregistry
logLevel: error
logFile:
preloadImages:
imageFile:
port: 8080
#os: omit to use the server OS
#arch: omit to use the server architecture
pullTimeout: 60000
alwaysPullLatest: false
airGapped: false
helloWorld: false
health:
registries: []
pruneConfig:
  enabled: false
serverTlsConfig: {}
"""


class _Files(SynchronousTestCase):
    """Writes configuration files and certificate stand-ins into a fresh directory."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        for name in ["ca.crt", "client.crt", "client.key", "server.crt", "server.key"]:
            with open(os.path.join(self.dir, name), "w") as f:
                f.write("-----BEGIN PLACEHOLDER-----\n")
        self.path = os.path.join(self.dir, "config.yaml")

    def write(self, text: str) -> str:
        """Write a configuration file; ``{dir}`` stands for the certificates' directory."""
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(textwrap.dedent(text).replace("{dir}", self.dir))
        return self.path

    def load(self, text: str, environ: dict[str, str] | None = None) -> FileSettings:
        """Load a configuration file with these contents."""
        return load_config_file(self.write(text), environ or {})

    def error(self, text: str, environ: dict[str, str] | None = None) -> str:
        """The message of the ConfigError that loading these contents raises."""
        with self.assertRaises(ConfigError) as caught:
            self.load(text, environ)
        return str(caught.exception)

    def file(self, name: str) -> str:
        """The absolute path of a certificate stand-in."""
        return os.path.join(self.dir, name)


class FullExampleTests(_Files):
    """A file using every key loads into exactly the expected settings."""

    def test_every_key(self) -> None:
        """Each key lands in its field, converted to seconds, bytes, ports and flags."""
        text = FULL_EXAMPLE.replace("{secret}", SECRET).replace("{token}", TOKEN)
        settings = self.load(text, {"REGISTRY_PASSWORD": "from-the-environment"})
        self.assertEqual(settings, FileSettings(
            image_path="/srv/ociregistry",
            log_level="debug",
            log_file="/var/log/ociregistry.log",
            port=8443,
            host="127.0.0.1",
            os="linux",
            arch="arm64",
            pull_timeout=60.0,
            health=8081,
            metrics=2112,
            always_pull_latest=True,
            air_gapped=False,
            default_ns="docker.io",
            preload_images="/etc/ociregistry/images.txt",
            registries=(
                RegistrySettings(
                    name="quay.io", scheme="https", description="Red Hat's registry",
                    user="robot", password=SECRET,
                    tls=TLSSettings(ca=self.file("ca.crt"), cert=self.file("client.crt"),
                                    key=self.file("client.key"), insecure_skip_verify=False),
                    manifest_ttl=math.inf,
                ),
                RegistrySettings(name="127.0.0.1:5000", scheme="http", user="admin",
                                 password="from-the-environment", manifest_ttl=0.0),
                RegistrySettings(name="localhost:5000", token=TOKEN,
                                 tls=TLSSettings(insecure_skip_verify=True)),
                RegistrySettings(name="[::1]:5000", credential_helper="ecr-login"),
            ),
            prune=PruneSettings(enabled=True, type="size", duration=30 * 86400.0, frequency=5400.0,
                                count=25, expr="nginx,alpine", max_size=50 * 2**30, dry_run=False),
            server_tls=ServerTLSSettings(cert=self.file("server.crt"), key=self.file("server.key"),
                                         ca=self.file("ca.crt"), client_auth="verify"),
            allow_upstreams=("*.example.com", "quay.io"),
            manifest_ttl=12 * 3600.0,
        ))

    def test_pull_timeout_units(self) -> None:
        """pullTimeout is milliseconds as in the Go server, unless a unit says otherwise."""
        self.assertEqual(self.load("pullTimeout: 1500").pull_timeout, 1.5)
        self.assertEqual(self.load("pullTimeout: 90s").pull_timeout, 90.0)
        self.assertEqual(self.load("pullTimeout: 2m").pull_timeout, 120.0)
        self.assertIn("expected milliseconds or a duration", self.error("pullTimeout: soon"))

    def test_log_level_spellings(self) -> None:
        """Log levels are case-insensitive, and logrus's "warning" means warn."""
        self.assertEqual(self.load("logLevel: WARNING").log_level, "warn")
        self.assertEqual(self.load("logLevel: Info").log_level, "info")
        self.assertIn("expected one of error, warn, info, debug, got 'loud'", self.error("logLevel: loud"))

    def test_anchors_and_merge_keys(self) -> None:
        """Shared settings written once with an anchor and merged with '<<' apply to each registry."""
        settings = self.load("""\
            registries:
              - &common
                name: a.example.com
                scheme: http
                description: shared
              - <<: *common
                name: b.example.com
            """)
        self.assertEqual([(r.name, r.scheme, r.description) for r in settings.registries],
                         [("a.example.com", "http", "shared"), ("b.example.com", "http", "shared")])

    def test_registry_names(self) -> None:
        """Hosts, IPv4 and IPv6 with ports, and localhost are valid names, kept in lowercase."""
        names = ["quay.io", "127.0.0.1:5000", "localhost:5000", "[::1]:5000", "Registry.Example.COM:443", "testme"]
        text = "registries:\n" + "".join(f"  - name: \"{name}\"\n" for name in names)
        self.assertEqual([r.name for r in self.load(text).registries], [name.lower() for name in names])


class DefaultTests(_Files):
    """What absent keys and empty files mean."""

    def test_empty_file(self) -> None:
        """An empty file, or one with only comments, sets nothing."""
        self.assertEqual(self.load(""), FileSettings())
        self.assertEqual(self.load("# nothing here\n---\n"), FileSettings())

    def test_go_defaults_file(self) -> None:
        """The defaults file from the Go server's documentation loads, empty values meaning unset."""
        settings = self.load(GO_DEFAULTS)
        self.assertEqual(settings, FileSettings(
            image_path="/var/lib/ociregistry", log_level="error", port=8080, pull_timeout=60.0,
            always_pull_latest=False, air_gapped=False, prune=PruneSettings(enabled=False),
        ))

    def test_dataclass_defaults(self) -> None:
        """A registry defaults to anonymous https with system trust; pruning to off and dry-run."""
        registry = RegistrySettings(name="quay.io")
        self.assertEqual((registry.scheme, registry.user, registry.password, registry.token,
                          registry.credential_helper, registry.tls, registry.manifest_ttl),
                         ("https", None, None, None, None, TLSSettings(), None))
        self.assertEqual(TLSSettings(), TLSSettings(None, None, None, False))
        self.assertEqual(PruneSettings(), PruneSettings(False, "accessed", None, None, None, None, None, True))
        self.assertEqual(FileSettings().registries, ())

    def test_registry_defaults(self) -> None:
        """A registry entry with only a name has the default settings."""
        self.assertEqual(self.load("registries: [{name: quay.io}]").registries, (RegistrySettings("quay.io"),))

    def test_prune_count_no_limit(self) -> None:
        """count: -1 is the Go server's "no limit", stored as None."""
        settings = self.load("pruneConfig: {enabled: true, type: accessed, duration: 30d, count: -1}")
        self.assertEqual(settings.prune, PruneSettings(enabled=True, duration=30 * 86400.0, count=None))


class OldFormatTests(_Files):
    """The Go server's original file: a bare list of registries."""

    def test_bare_list(self) -> None:
        """A top-level list is the registries, with the old insecure_skip_verify spelling."""
        settings = self.load("""\
            - name: quay.io
              description: foo
              auth: {}
              tls: {}
            - name: my.registry:8443
              scheme: https
              auth:
                user: foo
                password: bar
              tls:
                ca: {dir}/ca.crt
                insecure_skip_verify: true
            """)
        self.assertEqual(settings, FileSettings(registries=(
            RegistrySettings(name="quay.io", description="foo"),
            RegistrySettings(name="my.registry:8443", user="foo", password="bar",
                             tls=TLSSettings(ca=self.file("ca.crt"), insecure_skip_verify=True)),
        )))

    def test_bare_list_errors(self) -> None:
        """Errors in the old format name the entry by its index."""
        message = self.error("- name: quay.io\n- name: ghcr.io\n  scheme: ftp\n")
        self.assertIn(": [1].scheme: ", message)


class KeySpellingTests(_Files):
    """Keys match whatever case the Go server's users wrote them in."""

    def test_case_insensitive(self) -> None:
        """dryrun, dryRun, DRYRUN, dry_run and ImagePath all match their key."""
        for spelling in ["dryrun", "dryRun", "DRYRUN", "dry_run"]:
            settings = self.load(f"pruneConfig:\n  {spelling}: false\n")
            self.assertEqual(settings.prune, PruneSettings(dry_run=False), spelling)
        self.assertEqual(self.load("ImagePath: /x\nPORT: 1").image_path, "/x")

    def test_same_key_twice(self) -> None:
        """Two spellings of one key in the same mapping are an error naming both."""
        message = self.error("pruneConfig:\n  dryrun: true\n  dryRun: false\n")
        self.assertIn(": pruneConfig.dryRun: duplicate key (also given as 'dryrun')", message)

    def test_unknown_key_suggestion(self) -> None:
        """A misspelt key is named with its full path and the closest known key."""
        message = self.error("port: 8080\npruneConfig:\n  dryrn: true\n")
        self.assertEqual(message, f"{self.path}: pruneConfig.dryrn: unknown key (did you mean 'dryRun'?) (line 3)")
        message = self.error("registries:\n  - name: quay.io\n    tls:\n      insecureSkipVerfy: true\n")
        self.assertIn(": registries[0].tls.insecureSkipVerfy: unknown key (did you mean 'insecureSkipVerify'?)",
                      message)

    def test_unknown_key_without_suggestion(self) -> None:
        """A key like nothing known lists the keys that are."""
        message = self.error("registries:\n  - name: quay.io\n    zzz: 1\n")
        self.assertIn("registries[0].zzz: unknown key (expected one of: name, description, scheme", message)


class BadValueTests(_Files):
    """Every kind of wrong value is an error naming its key and the value."""

    def test_table(self) -> None:
        """Wrong types, choices, ports, durations, sizes and hosts name key and value."""
        cases = [
            ("port: abc", "port", "'abc'"),
            ("port: 70000", "port", "70000"),
            ("health: 0", "health", "0"),
            ("metrics: 80.5", "metrics", "'80.5'"),
            ("logLevel: loud", "logLevel", "'loud'"),
            ("airGapped: maybe", "airGapped", "'maybe'"),
            ("alwaysPullLatest: 2", "alwaysPullLatest", "'2'"),
            ("pullTimeout: soon", "pullTimeout", "'soon'"),
            ("pullTimeout: 0", "pullTimeout", "'0'"),
            ("manifestInvalidation: forever", "manifestInvalidation", "'forever'"),
            ("defaultNs: not a host", "defaultNs", "'not a host'"),
            ("imagePath: [a, b]", "imagePath", "a list"),
            ("allowUpstreams: quay.io", "allowUpstreams", "a single value"),
            ("allowUpstreams: [quay.io, 'a/b']", "allowUpstreams[1]", "'a/b'"),
            ("registries: {name: quay.io}", "registries", "a mapping"),
            ("registries: [{name: quay.io, scheme: ftp}]", "registries[0].scheme", "'ftp'"),
            ("registries: [{name: 'https://quay.io'}]", "registries[0].name", "'https://quay.io'"),
            ("registries: [{name: quay.io/org}]", "registries[0].name", "'quay.io/org'"),
            ("registries: [{name: 'quay.io:99999'}]", "registries[0].name", "'quay.io:99999'"),
            ("registries: [{name: quay.io, manifestInvalidation: soon}]",
             "registries[0].manifestInvalidation", "'soon'"),
            ("registries: [{name: quay.io, tls: {insecureSkipVerify: sure}}]",
             "registries[0].tls.insecureSkipVerify", "'sure'"),
            ("registries: [{name: quay.io, tls: maybe}]", "registries[0].tls", "'maybe'"),
            ("pruneConfig: {type: random}", "pruneConfig.type", "'random'"),
            ("pruneConfig: {duration: 3 weeks}", "pruneConfig.duration", "'3 weeks'"),
            ("pruneConfig: {frequency: 0}", "pruneConfig.frequency", "longer than zero"),
            ("pruneConfig: {count: 0}", "pruneConfig.count", "0"),
            ("pruneConfig: {count: many}", "pruneConfig.count", "'many'"),
            ("pruneConfig: {maxSize: lots}", "pruneConfig.maxSize", "'lots'"),
            ("pruneConfig: {enabled: 1}", "pruneConfig.enabled", "'1'"),
            ("serverTlsConfig: {clientAuth: maybe}", "serverTlsConfig.clientAuth", "'maybe'"),
            ("helloWorld: true", "helloWorld", "not supported"),
        ]
        for text, key, shown in cases:
            message = self.error(text)
            self.assertIn(f"{self.path}: {key}: ", message, text)
            self.assertIn(shown, message, text)
            self.assertIn("(line 1)", message, text)

    def test_missing_name(self) -> None:
        """A registry without a name says so, naming the entry."""
        self.assertIn(": registries[1]: missing 'name'", self.error("registries: [{name: a.io}, {scheme: http}]"))

    def test_duplicate_registries(self) -> None:
        """Two entries for one registry, however spelt, are an error naming both."""
        message = self.error("registries: [{name: Quay.io}, {name: ghcr.io}, {name: QUAY.IO}]")
        self.assertIn(": registries[2]: duplicate registry 'quay.io' (also at registries[0])", message)
        message = self.error("registries: [{name: docker.io}, {name: index.docker.io}]")
        self.assertIn(": registries[1]: duplicate registry 'docker.io'", message)

    def test_prune_type_needs(self) -> None:
        """Enabled pruning of each type needs the key that type works from."""
        for kind, needed in [("accessed", "duration"), ("created", "duration"), ("pattern", "expr"),
                             ("size", "maxSize")]:
            message = self.error(f"pruneConfig:\n  enabled: true\n  type: {kind}\n  {needed}:\n")
            self.assertIn(f": pruneConfig: pruning of type '{kind}' needs '{needed}'", message)

    def test_top_level_scalar(self) -> None:
        """A file that is neither a mapping nor a list is refused."""
        self.assertIn("top level must be a mapping", self.error("just words\n"))

    def test_yaml_syntax_error(self) -> None:
        """A YAML syntax error is reported with its line number."""
        message = self.error("port: 8080\nregistries:\n  - name: a.io\n   scheme: http\n")
        self.assertTrue(message.startswith(f"{self.path}: invalid YAML: "), message)
        self.assertIn("(line 4, column", message)

    def test_unreadable_config_file(self) -> None:
        """A missing configuration file, or a directory, is a ConfigError naming it."""
        missing = os.path.join(self.dir, "nope.yaml")
        with self.assertRaises(ConfigError) as caught:
            load_config_file(missing, {})
        self.assertEqual(str(caught.exception), f"{missing}: file not found")
        with self.assertRaises(ConfigError) as caught:
            load_config_file(self.dir, {})
        self.assertIn(self.dir, str(caught.exception))


class PasswordFromEnvTests(_Files):
    """The password of a registry can come from the environment."""

    TEXT = "registries:\n  - name: quay.io\n    auth:\n      user: robot\n      passwordFromEnv: QUAY_PASSWORD\n"

    def test_set(self) -> None:
        """The variable's value becomes the password."""
        settings = self.load(self.TEXT, {"QUAY_PASSWORD": SECRET})
        self.assertEqual((settings.registries[0].user, settings.registries[0].password), ("robot", SECRET))

    def test_unset(self) -> None:
        """An unset variable is an error naming the key and the variable."""
        message = self.error(self.TEXT, {"OTHER": "x"})
        self.assertIn(": registries[0].auth.passwordFromEnv: environment variable QUAY_PASSWORD is not set", message)

    def test_empty(self) -> None:
        """A variable set to nothing is an error too."""
        self.assertIn("QUAY_PASSWORD is empty", self.error(self.TEXT, {"QUAY_PASSWORD": ""}))

    def test_both(self) -> None:
        """A password and passwordFromEnv together are ambiguous."""
        message = self.error(self.TEXT + "      password: x\n", {"QUAY_PASSWORD": SECRET})
        self.assertIn("registries[0].auth.passwordFromEnv: give either password or passwordFromEnv", message)

    def test_reads_environ_argument(self) -> None:
        """The environment is the one passed in, so tests and callers control it."""
        self.assertEqual(self.load(self.TEXT, {"QUAY_PASSWORD": "p"}).registries[0].password, "p")


class SecretTests(_Files):
    """Passwords and tokens never show in a repr or an error message."""

    def test_repr(self) -> None:
        """A registry's repr, and that of whole file settings, masks the password and token."""
        registry = RegistrySettings(name="quay.io", user="robot", password=SECRET, token=TOKEN)
        self.assertNotIn(SECRET, repr(registry))
        self.assertNotIn(TOKEN, str(registry))
        self.assertIn("password='***'", repr(registry))
        self.assertIn("token='***'", repr(registry))
        self.assertIn("user='robot'", repr(registry))
        self.assertIn("password=None", repr(RegistrySettings(name="quay.io")))
        settings = self.load(f"registries: [{{name: quay.io, auth: {{user: u, password: {SECRET}}}}}]")
        self.assertNotIn(SECRET, repr(settings))
        self.assertEqual(settings.registries[0].password, SECRET)

    def test_masked(self) -> None:
        """masked() replaces only secrets that are set."""
        registry = RegistrySettings(name="quay.io", user="robot", password=SECRET)
        self.assertEqual(registry.masked(), RegistrySettings(name="quay.io", user="robot", password="***"))
        self.assertEqual(RegistrySettings(name="quay.io").masked(), RegistrySettings(name="quay.io"))

    def test_errors(self) -> None:
        """No error message repeats a password or token, whatever is wrong around it."""
        texts = [
            f"registries: [{{name: quay.io, scheme: ftp, auth: {{user: u, password: {SECRET}}}}}]",
            f"registries: [{{name: quay.io, auth: {{password: {SECRET}}}}}]",
            f"registries: [{{name: quay.io, auth: {{user: u, password: [{SECRET}]}}}}]",
            f"registries: [{{name: quay.io, auth: {{user: u, password: {{{SECRET}: 1}}}}}}]",
            f"registries: [{{name: quay.io, auth: {{user: u, token: {TOKEN}}}}}]",
            f"registries: [{{name: quay.io, auth: {{token: [{TOKEN}]}}}}]",
            f"registries: [{{name: quay.io, auth: {{token: {TOKEN}, credentialHelper: x}}}}]",
            f'registries:\n  - name: quay.io\n    auth:\n      user: u\n      password: "{SECRET}\n',
            f"registries:\n  - name: quay.io\n    auth:\n      user: u\n      password: {SECRET}\n     bad: x\n",
        ]
        for text in texts:
            message = self.error(text)
            self.assertNotIn(SECRET, message, text)
            self.assertNotIn(TOKEN, message, text)


class FileTests(_Files):
    """Certificate and key files must exist, and come in pairs."""

    def test_cert_without_key(self) -> None:
        """A client certificate without its key, or the reverse, is an error on the tls section."""
        message = self.error("registries: [{name: quay.io, tls: {cert: {dir}/client.crt}}]")
        self.assertIn(": registries[0].tls: cert and key must be given together (key is missing)", message)
        message = self.error("registries: [{name: quay.io, tls: {key: {dir}/client.key}}]")
        self.assertIn("(cert is missing)", message)
        message = self.error("serverTlsConfig: {cert: {dir}/server.crt}")
        self.assertIn(": serverTlsConfig: cert and key must be given together (key is missing)", message)

    def test_missing_files(self) -> None:
        """A file that does not exist is named with the key that names it."""
        message = self.error("registries: [{name: a.io}, {name: b.io, tls: {ca: /x/ca.crt}}]")
        self.assertEqual(message, f"{self.path}: registries[1].tls.ca: file not found: /x/ca.crt (line 1)")
        message = self.error("serverTlsConfig: {cert: {dir}/nope.crt, key: {dir}/server.key}")
        self.assertIn(f": serverTlsConfig.cert: file not found: {self.dir}/nope.crt", message)
        message = self.error("registries: [{name: a.io, tls: {ca: {dir}}}]")
        self.assertIn(f": registries[0].tls.ca: not a file: {self.dir}", message)

    def test_relative_paths(self) -> None:
        """Relative paths are taken from the working directory, as the Go server did, and stored absolute."""
        cwd = os.getcwd()
        os.chdir(self.dir)
        self.addCleanup(os.chdir, cwd)
        settings = self.load("registries: [{name: quay.io, tls: {ca: ca.crt}}]")
        self.assertEqual(settings.registries[0].tls.ca, self.file("ca.crt"))

    def test_server_tls(self) -> None:
        """Server TLS needs cert and key; verify needs a CA; an empty section means plain HTTP."""
        self.assertIsNone(self.load("serverTlsConfig: {}").server_tls)
        self.assertIsNone(self.load("serverTlsConfig: {clientAuth: none}").server_tls)
        settings = self.load("serverTlsConfig: {cert: {dir}/server.crt, key: {dir}/server.key}")
        self.assertEqual(settings.server_tls, ServerTLSSettings(self.file("server.crt"), self.file("server.key")))
        message = self.error("serverTlsConfig: {cert: {dir}/server.crt, key: {dir}/server.key, clientAuth: verify}")
        self.assertIn(": serverTlsConfig: clientAuth: verify needs 'ca'", message)
        message = self.error("serverTlsConfig: {ca: {dir}/ca.crt}")
        self.assertIn(": serverTlsConfig: serving TLS needs 'cert' and 'key'", message)


class DurationTests(SynchronousTestCase):
    """parse_duration, used by the file and the command line."""

    def test_valid(self) -> None:
        """Units, combinations, fractions and plain numbers become seconds."""
        cases = [("30d", 2592000.0), ("12h", 43200.0), ("15m", 900.0), ("10s", 10.0), ("500ms", 0.5),
                 ("1h30m", 5400.0), ("1d12h", 129600.0), ("90", 90.0), ("2.5", 2.5), ("1.5h", 5400.0),
                 ("100us", 1e-4), ("250µs", 2.5e-4), ("1000ns", 1e-6), (" 10S ", 10.0), ("0", 0.0), ("0s", 0.0)]
        for text, seconds in cases:
            self.assertAlmostEqual(parse_duration(text), seconds, msg=text)

    def test_invalid(self) -> None:
        """Anything else is a ValueError that quotes the text and shows the accepted form."""
        for text in ["", "abc", "10x", "-5s", "1h-30m", "h", "1h30", "1h 30m", "nan", "inf", "1e3", "10 s", "1,5h"]:
            with self.assertRaises(ValueError) as caught:
                parse_duration(text)
            self.assertIn(repr(text), str(caught.exception))
            self.assertIn("30d", str(caught.exception))


class SizeTests(SynchronousTestCase):
    """parse_size, used by the file and the command line."""

    def test_valid(self) -> None:
        """Binary and decimal units, bare numbers and fractions become bytes."""
        cases = [("50GiB", 50 * 2**30), ("500MiB", 500 * 2**20), ("1GB", 10**9), ("1024", 1024), ("4M", 4 * 2**20),
                 ("10KB", 10_000), ("10k", 10_240), ("1.5KiB", 1536), ("2TiB", 2 * 2**40), ("2Ti", 2 * 2**40),
                 ("0", 0), ("7B", 7), ("8 MiB", 8 * 2**20), ("1gb", 10**9)]
        for text, size in cases:
            self.assertEqual(parse_size(text), size, text)

    def test_invalid(self) -> None:
        """Anything else is a ValueError that quotes the text."""
        for text in ["", "abc", "-1GB", "10XB", "1.2.3", "GiB", "1 2", "nan"]:
            with self.assertRaises(ValueError) as caught:
                parse_size(text)
            self.assertIn(repr(text), str(caught.exception))


class RegistryLookupTests(SynchronousTestCase):
    """registry_settings finds the entry for the registry a request names."""

    REGISTRIES = (
        RegistrySettings(name="quay.io", user="u", password="p"),
        RegistrySettings(name="127.0.0.1:5000", scheme="http"),
        RegistrySettings(name="docker.io", token="t"),
    )

    def test_match(self) -> None:
        """The entry with the same host, compared without regard to case, is found."""
        self.assertIs(registry_settings(self.REGISTRIES, "quay.io"), self.REGISTRIES[0])
        self.assertIs(registry_settings(self.REGISTRIES, "QUAY.IO"), self.REGISTRIES[0])
        self.assertIs(registry_settings(self.REGISTRIES, "127.0.0.1:5000"), self.REGISTRIES[1])

    def test_docker_hub_aliases(self) -> None:
        """Docker Hub's names all find its one entry."""
        for host in ["docker.io", "index.docker.io", "registry-1.docker.io"]:
            self.assertIs(registry_settings(self.REGISTRIES, host), self.REGISTRIES[2], host)

    def test_default(self) -> None:
        """A registry without an entry gets https, no credentials and system trust."""
        self.assertEqual(registry_settings(self.REGISTRIES, "ghcr.io"), RegistrySettings(name="ghcr.io"))
        self.assertEqual(registry_settings(self.REGISTRIES, "127.0.0.1:5001"), RegistrySettings("127.0.0.1:5001"))
        self.assertEqual(registry_settings((), "quay.io"), RegistrySettings(name="quay.io"))
