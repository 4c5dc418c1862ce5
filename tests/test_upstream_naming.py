"""Where a registry really is: an upstream under another host and path, its User-Agent, the Rust server's spellings."""

from __future__ import annotations

import io
import json
import os
import re
import sys
import textwrap
from importlib import resources

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.ssl import PrivateCertificate
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from ociregistry import __version__
from ociregistry import config as config_module
from ociregistry.config import ConfigError, RegistrySettings, TLSSettings, load_config_file
from ociregistry.credentials import credentials_from_environment
from ociregistry.tap import Options
from tests.fakes import FakeRegistry, TokenRealm, listen, make_image
from tests.realparts import PROJECT_ROOT, free_port, make_ca
from tests.test_pull import ServerTestCase

SECRET = "s3cret-Qw8"
IMAGE = make_image(b"layer one", b"layer two")


class ConfigTests(SynchronousTestCase):
    """The upstream, userAgent and the Rust server's keys in the configuration file."""

    def load(self, text: str, environ: dict[str, str] | None = None) -> tuple[RegistrySettings, ...]:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))
        return load_config_file(path, environ or {}).registries

    def error(self, text: str) -> str:
        with self.assertRaises(ConfigError) as caught:
            self.load(text)
        return str(caught.exception)

    def test_upstream_url(self) -> None:
        """An upstream URL gives the scheme, the real host and the path prefix; the name stays the cache's."""
        cases = [
            ("https://harbor.corp/dockerhub-proxy", ("https", "harbor.corp", "dockerhub-proxy")),
            ("http://Nexus.corp:8081/repository/docker-remote/", ("http", "nexus.corp:8081", "repository/docker-remote")),
            ("harbor.corp", ("https", "harbor.corp", "")),
            ("registry-1.docker.io", ("https", "registry-1.docker.io", "")),
        ]
        for given, (scheme, host, prefix) in cases:
            registry, = self.load(f"registries: [{{name: docker.io, upstream: '{given}'}}]")
            self.assertEqual((registry.name, registry.scheme, registry.upstream, registry.prefix),
                             ("docker.io", scheme, host, prefix), given)
        registry, = self.load("registries: [{name: docker.io, scheme: http, upstream: mirror.corp/hub}]")
        self.assertEqual((registry.scheme, registry.api_host), ("http", "mirror.corp"))
        self.assertEqual(registry.upstream_repository("library/nginx"), "hub/library/nginx")

    def test_without_upstream(self) -> None:
        """Without an upstream a registry is reached at its name (Docker Hub at its API host), under no prefix."""
        registry = RegistrySettings(name="docker.io")
        self.assertEqual((registry.api_host, registry.upstream_repository("library/nginx")),
                         ("registry-1.docker.io", "library/nginx"))
        self.assertEqual(RegistrySettings(name="quay.io").api_host, "quay.io")

    def test_user_agent(self) -> None:
        """userAgent is the registry's own; the default names this server and its version."""
        custom, default = self.load("""\
            registries:
              - {name: quay.io, userAgent: "containerd/1.6.8 (corp)"}
              - {name: ghcr.io}
            """)
        self.assertEqual(custom.user_agent, "containerd/1.6.8 (corp)")
        self.assertEqual(default.user_agent, f"ociregistry/{__version__}")

    def test_rust_server_file(self) -> None:
        """The Rust oci-registry's file loads as it is, each key meaning what it meant there."""
        first, second = self.load(f"""\
            - namespace: example.com
              host: registry.example.com
              tls: true
              accept_invalid_certs: true
              user_agent: "containerd/1.6.8"
              username: example
              password: {SECRET}
              manifest_invalidation_time: 0s
              blob_invalidation_time: 30d
            - namespace: docker.io
              host: "127.0.0.1:5000"
              tls: false
            """)
        self.assertEqual(first, RegistrySettings(
            name="example.com", scheme="https", upstream="registry.example.com", user_agent="containerd/1.6.8",
            user="example", password=SECRET, tls=TLSSettings(insecure_skip_verify=True), manifest_ttl=0.0))
        self.assertEqual((second.name, second.scheme, second.api_host), ("docker.io", "http", "127.0.0.1:5000"))

    def test_errors(self) -> None:
        """Each mistake names the key and what is wrong, never a password."""
        cases = [
            ("registries: [{name: docker.io, upstream: 'ftp://harbor.corp'}]", "registries[0].upstream", "'ftp'"),
            ("registries: [{name: docker.io, upstream: 'https://'}]", "registries[0].upstream", "is not a host"),
            ("registries: [{name: docker.io, upstream: 'https://0x7f.1/p'}]", "registries[0].upstream", "'0x7f.1'"),
            ("registries: [{name: docker.io, upstream: 'https://harbor.corp/Proxy'}]", "registries[0].upstream",
             "'Proxy' is not a repository path"),
            ("registries: [{name: docker.io, upstream: 'https://harbor.corp/p?x=1'}]", "registries[0].upstream",
             "without a query"),
            (f"registries: [{{name: docker.io, upstream: 'https://me:{SECRET}@harbor.corp/p'}}]",
             "registries[0].upstream", "give them in 'auth'"),
            ("registries: [{name: docker.io, scheme: http, upstream: 'https://harbor.corp'}]",
             "registries[0].upstream", "says https, the registry http"),
            ('registries: [{name: quay.io, userAgent: "a\\nb"}]', "registries[0].userAgent", "printable ASCII"),
            ('registries: [{name: quay.io, userAgent: "caf\u00e9"}]', "registries[0].userAgent", "printable ASCII"),
            ("registries: [{name: quay.io, usrAgent: x}]", "registries[0].usrAgent", "did you mean 'userAgent'"),
            ("registries: [{name: quay.io, upstrem: x}]", "registries[0].upstrem", "did you mean 'upstream'"),
            ("[{namespace: quay.io, name: quay.io}]", "[0].name", "duplicate key (also given as 'namespace')"),
            ("[{namespace: quay.io, tls: maybe}]", "[0].tls", "'maybe'"),
            ("[{namespace: quay.io, tls: false, scheme: http}]", "[0].tls", "not both"),
            (f"[{{namespace: quay.io, password: {SECRET}}}]", "[0]", "a password needs a 'user'"),
            (f"[{{namespace: quay.io, username: u, password: {SECRET}, auth: {{token: t}}}}]", "[0].auth",
             "not both"),
            ("[{namespace: quay.io, accept_invalid_certs: true, tls: {insecureSkipVerify: true}}]",
             "[0].accept_invalid_certs", "inside 'tls'"),
            ("[{namespace: quay.io, blob_invalidation_time: often}]", "[0].blob_invalidation_time", "'often'"),
        ]
        for text, key, shown in cases:
            message = self.error(text)
            self.assertIn(f": {key}: ", message, text)
            self.assertIn(shown, message, text)
            self.assertNotIn(SECRET, message, text)

    def test_example_documents_every_registry_key(self) -> None:
        """The shipped example names every registry key, in both spellings."""
        text = resources.files("ociregistry").joinpath("example-config.yaml").read_text("utf-8")
        rust = {"namespace", "host", "accept_invalid_certs", "user_agent", "username", "password",
                "manifest_invalidation_time", "blob_invalidation_time"}
        for key in [*config_module._REGISTRY_KEYS, *config_module._REGISTRY_ALIASES, *rust]:
            spelled = {key, re.sub(r"(?<!^)([A-Z])", r"_\1", key).lower()}
            self.assertTrue(any(f"{k}:" in text for k in spelled), key)
        self.assertIn("UPSTREAM_CREDENTIALS", text)

    def test_readme_example(self) -> None:
        """The README's Harbor and Artifactory example loads and means what the README says."""
        with open(os.path.join(PROJECT_ROOT, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        section = readme[readme.index("### A registry that lives somewhere else"):]
        example = section[section.index("```yaml\n") + 8:section.index("```\n", section.index("```yaml"))]
        hub, quay = self.load(example, {"HARBOR_PASSWORD": SECRET})
        self.assertEqual((hub.name, hub.scheme, hub.api_host, hub.upstream_repository("library/nginx"),
                          hub.user_agent, hub.user, hub.password),
                         ("docker.io", "https", "harbor.corp", "dockerhub-proxy/library/nginx", "corp-mirror/1.0",
                          "robot$puller", SECRET))
        self.assertEqual((quay.api_host, quay.prefix), ("artifactory.corp", "artifactory/api/docker/quay-remote"))

    def test_print_config_masks_secrets(self) -> None:
        """--print-config shows the upstream and User-Agent, and no password from any source."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f"- {{namespace: docker.io, host: 'harbor.corp/hub', username: u, password: {SECRET}}}\n")
        self.patch(os, "environ", {"UPSTREAM_CREDENTIALS": json.dumps({"quay.io": {"username": "v",
                                                                                    "password": SECRET}})})
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        with self.assertRaises(SystemExit):
            Options().parseOptions(["--config-file", path, "--print-config"])
        printed = out.getvalue()
        self.assertIn("upstream: harbor.corp", printed)
        self.assertIn("prefix: hub", printed)
        self.assertIn(f"user_agent: ociregistry/{__version__}", printed)
        self.assertIn("user: v", printed)
        self.assertNotIn(SECRET, printed)


class CredentialsTests(SynchronousTestCase):
    """$UPSTREAM_CREDENTIALS in the Rust server's format, beside $OCIREGISTRY_CREDENTIALS."""

    def test_rust_format(self) -> None:
        """{"host": {"username", "password"}} gives a registry its login, Docker Hub's aliases included."""
        environ = {"UPSTREAM_CREDENTIALS": json.dumps({
            "example.com": {"username": "example", "password": "hunter2"},
            "index.docker.io": {"username": "aaa", "password": "bbb"},
        })}
        registries = {r.name: r for r in credentials_from_environment((), environ)}
        self.assertEqual((registries["example.com"].user, registries["example.com"].password), ("example", "hunter2"))
        self.assertEqual((registries["docker.io"].user, registries["docker.io"].password), ("aaa", "bbb"))

    def test_precedence(self) -> None:
        """The configuration file wins over $OCIREGISTRY_CREDENTIALS, which wins over $UPSTREAM_CREDENTIALS."""
        environ = {
            "OCIREGISTRY_CREDENTIALS": json.dumps({"b.io": {"user": "ours", "password": "p"},
                                                   "c.io": {"token": "tok"}}),
            "UPSTREAM_CREDENTIALS": json.dumps({name: {"username": "rust", "password": "p"}
                                                for name in ("a.io", "b.io", "c.io", "d.io")}),
        }
        configured = RegistrySettings(name="a.io", user="file", password="p", upstream="harbor.corp", prefix="x")
        registries = {r.name: r for r in credentials_from_environment((configured,), environ)}
        self.assertEqual({name: (r.user, r.token) for name, r in registries.items()}, {
            "a.io": ("file", None), "b.io": ("ours", None), "c.io": (None, "tok"), "d.io": ("rust", None)})
        self.assertEqual((registries["a.io"].upstream, registries["a.io"].prefix), ("harbor.corp", "x"))

    def test_malformed(self) -> None:
        """Bad JSON or entries are errors naming the variable, never showing a secret."""
        cases = [
            '{"example.com": {"username": "u", "password": "' + SECRET,
            json.dumps({"example.com": {"user": "u", "password": SECRET}}),
            json.dumps({"example.com": {"token": SECRET}}),
            json.dumps([SECRET]),
            json.dumps({"not a host": {"username": "u", "password": SECRET}}),
        ]
        for text in cases:
            with self.assertRaises(ConfigError) as caught:
                credentials_from_environment((), {"UPSTREAM_CREDENTIALS": text})
            message = str(caught.exception)
            self.assertIn("$UPSTREAM_CREDENTIALS", message, text)
            self.assertNotIn(SECRET, message, text)

    def test_usage_error(self) -> None:
        """twistd refuses to start with a malformed $UPSTREAM_CREDENTIALS, naming it."""
        self.patch(os, "environ", {"UPSTREAM_CREDENTIALS": "{" + SECRET})
        with self.assertRaises(usage.UsageError) as caught:
            Options().parseOptions([])
        self.assertIn("UPSTREAM_CREDENTIALS", str(caught.exception))
        self.assertNotIn(SECRET, str(caught.exception))


class AliasTests(ServerTestCase):
    """A registry whose upstream is another host under a path: what goes over the wire."""

    async def proxy(self, **settings: object) -> FakeRegistry:
        """A fake upstream serving Docker Hub's library/app under /v2/hub-proxy/, configured as docker.io's."""
        fake = FakeRegistry()
        fake.add_image("hub-proxy/library/app", "v1", IMAGE)
        port, listening = await listen(fake)
        self.addCleanup(listening.stopListening)
        registry = RegistrySettings(**{"name": "docker.io", "scheme": "http", "upstream": f"127.0.0.1:{port}",
                                       "prefix": "hub-proxy", **settings})  # type: ignore[arg-type]
        await self.start(registries=(registry,))
        return fake

    async def pull(self) -> None:
        for path in ["/v2/library/app/tags/list", "/v2/library/app/manifests/v1",
                     f"/v2/library/app/manifests/{IMAGE.digest}",
                     *(f"/v2/library/app/blobs/{digest}" for digest in IMAGE.blobs)]:
            response, _ = await self.get(path + "?ns=docker.io")
            self.assertEqual(response.code, 200, path)

    async def test_requests_go_under_the_prefix(self) -> None:
        """docker.io/library/app is asked for as hub-proxy/library/app, with the registry's User-Agent."""
        fake = await self.proxy(user_agent="corp-mirror/2.0")
        await self.pull()
        self.assertTrue(fake.requests)
        for _, path in fake.requests:
            self.assertTrue(path.startswith("/v2/hub-proxy/library/app/"), path)
        self.assertEqual(set(fake.user_agents), {"corp-mirror/2.0"})
        self.assertEqual(self.upstream.requests, [])

    async def test_default_user_agent(self) -> None:
        """Without userAgent the requests say ociregistry/<version>."""
        fake = await self.proxy()
        await self.pull()
        self.assertEqual(set(fake.user_agents), {f"ociregistry/{__version__}"})

    async def test_token_scoped_to_upstream_repository(self) -> None:
        """The token is asked for the repository as the upstream names it, with the User-Agent and login."""
        fake = FakeRegistry()
        fake.add_image("hub-proxy/library/app", "v1", IMAGE)
        realm = TokenRealm(fake)
        realm_port, realm_listening = await listen(realm)
        self.addCleanup(realm_listening.stopListening)
        fake.auth = ("bearer", f"http://127.0.0.1:{realm_port}/token")
        port, listening = await listen(fake)
        self.addCleanup(listening.stopListening)
        await self.start(registries=(RegistrySettings(
            name="docker.io", scheme="http", upstream=f"127.0.0.1:{port}", prefix="hub-proxy",
            user="robot", password=SECRET, user_agent="corp-mirror/2.0"),))
        await self.pull()
        self.assertEqual({scope for scope, _ in realm.requests}, {"repository:hub-proxy/library/app:pull"})
        self.assertTrue(all(authorization and authorization.startswith("Basic ") for _, authorization in realm.requests))
        self.assertEqual(set(realm.user_agents), {"corp-mirror/2.0"})

    async def test_redirect_followed_with_user_agent(self) -> None:
        """A blob redirect of the real upstream is followed, saying the same User-Agent."""
        storage = FakeRegistry()
        storage.blobs.update(IMAGE.blobs)
        storage_port, storage_listening = await listen(storage)
        self.addCleanup(storage_listening.stopListening)
        fake = await self.proxy(user_agent="corp-mirror/2.0")
        fake.redirect_blobs = f"http://127.0.0.1:{storage_port}"
        await self.pull()
        self.assertEqual(len(storage.requests), len(IMAGE.blobs))
        self.assertEqual(set(storage.user_agents), {"corp-mirror/2.0"})

    async def tls_proxy(self, fake: FakeRegistry) -> tuple[str, str]:
        """Serve ``fake`` over HTTPS on loopback: (its host:port, the CA that signed it)."""
        ca = make_ca(self.mktemp(), "harbor")
        cert, key = ca.issue_server("127.0.0.1")
        with open(cert, "rb") as c, open(key, "rb") as k:
            options = PrivateCertificate.loadPEM(c.read() + b"\n" + k.read()).options()
        fake.add_image("hub-proxy/library/app", "v1", IMAGE)
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            TLSMemoryBIOFactory(options, False, Site(fake)))
        self.addCleanup(port.stopListening)
        return f"127.0.0.1:{port.getHost().port}", ca.cert_path

    async def test_tls_and_basic_auth_apply_to_the_real_host(self) -> None:
        """The entry's CA and login are used for the host it points at, not for docker.io's."""
        fake = FakeRegistry()
        fake.auth = ("basic", "robot", SECRET)
        host, ca = await self.tls_proxy(fake)
        await self.start(registries=(RegistrySettings(
            name="docker.io", upstream=host, prefix="hub-proxy", user="robot", password=SECRET,
            tls=TLSSettings(ca=ca)),))
        await self.pull()
        self.assertTrue(fake.authorizations[-1].startswith("Basic "))

    async def test_plain_http_realm_of_the_real_host_gets_no_credentials(self) -> None:
        """An HTTPS upstream naming an http:// token realm gets no credentials, as any registry would."""
        fake = FakeRegistry()
        realm = TokenRealm(fake)
        realm_port, listening = await listen(realm)
        self.addCleanup(listening.stopListening)
        fake.auth = ("bearer", f"http://127.0.0.1:{realm_port}/token")
        host, ca = await self.tls_proxy(fake)
        await self.start(registries=(RegistrySettings(
            name="docker.io", upstream=host, prefix="hub-proxy", user="robot", password=SECRET,
            tls=TLSSettings(ca=ca)),))
        response, body = await self.get("/v2/library/app/manifests/v1?ns=docker.io")
        self.assertEqual(response.code, 502)
        self.assertIn("is plain HTTP", json.loads(body)["errors"][0]["message"])
        self.assertEqual(realm.requests, [])

    async def test_errors_name_the_real_host(self) -> None:
        """When the real upstream is down, the error names it beside the registry clients asked for."""
        closed = free_port()
        await self.start(registries=(RegistrySettings(
            name="docker.io", scheme="http", upstream=f"127.0.0.1:{closed}", prefix="hub-proxy"),))
        response, body = await self.get("/v2/library/app/manifests/v1?ns=docker.io")
        self.assertEqual(response.code, 502)
        self.assertIn(f"upstream docker.io (at 127.0.0.1:{closed}) unreachable", json.loads(body)["errors"][0]["message"])
