"""Credentials and tokens: bounded token caches, expiry on the clock, no credentials in clear text."""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from ociregistry.auth import Authenticator, TokenCache
from ociregistry.config import RegistrySettings, TLSSettings
from ociregistry.credentials import Credentials
from ociregistry.errors import OCIError
from tests.fakes import FakeRegistry, TokenRealm, digest_of, listen, make_image
from tests.realparts import make_ca
from tests.test_pull import ServerTestCase

REGISTRY = "registry.test"
CHALLENGE = 'Bearer realm="https://auth.test/token",service="registry.test"'


class TokenCacheTests(SynchronousTestCase):
    """Tokens are kept until they expire, and no more of them than the limit."""

    def test_expired_tokens_are_dropped(self) -> None:
        """A token is given out until its expiry, and forgotten then."""
        clock = Clock()
        tokens = TokenCache(clock)
        tokens.put(("r", "s"), "t", 100.0)
        clock.advance(99)
        self.assertEqual(tokens.get(("r", "s")), "t")
        clock.advance(1)
        self.assertIsNone(tokens.get(("r", "s")))
        self.assertEqual(len(tokens), 0)

    def test_bounded_least_recently_used(self) -> None:
        """Beyond the limit, expired tokens go first, then the least recently used."""
        clock = Clock()
        tokens = TokenCache(clock, limit=3)
        tokens.put(("r", "short"), "1", 10.0)
        tokens.put(("r", "a"), "2", 1000.0)
        tokens.put(("r", "b"), "3", 1000.0)
        clock.advance(20)
        tokens.put(("r", "c"), "4", 1000.0)
        self.assertEqual(len(tokens), 3)
        self.assertEqual(tokens.get(("r", "a")), "2")
        tokens.put(("r", "d"), "5", 1000.0)
        self.assertEqual(len(tokens), 3)
        self.assertIsNone(tokens.get(("r", "b")))
        self.assertEqual([tokens.get(("r", k)) for k in "acd"], ["2", "4", "5"])

    def test_many_scopes_stay_bounded(self) -> None:
        """Ten thousand repositories named by clients leave at most the limit of tokens."""
        clock = Clock()
        tokens = TokenCache(clock, limit=100)
        for number in range(10_000):
            tokens.put((REGISTRY, f"repository:r{number}:pull"), "t", 1000.0)
        self.assertEqual(len(tokens), 100)


class _Answer:
    """A canned token-service response."""

    def __init__(self, code: int, body: bytes) -> None:
        self.code = code
        self.body = body


class _Realm:
    """Stands in for the transport: answers token fetches, recording what they carried."""

    def __init__(self, clock: Clock, expires_in: int) -> None:
        self.clock = clock
        self.expires_in = expires_in
        self.fetches: list[tuple[str, TLSSettings, str | None]] = []

    async def send_to_realm(self, registry: str, tls: TLSSettings, url: str, headers: Headers) -> _Answer:
        authorization = headers.getRawHeaders(b"authorization")
        self.fetches.append((url, tls, authorization[0].decode() if authorization else None))
        token = f"token-{len(self.fetches)}"
        return _Answer(200, json.dumps({"token": token, "expires_in": self.expires_in}).encode())

    async def content(self, response: _Answer, source: str, limit: int) -> bytes:
        return response.body


class AuthenticatorTests(SynchronousTestCase):
    """Bearer tokens per scope, refreshed before expiry, with credentials only where they are safe."""

    def authenticator(self, settings: RegistrySettings, expires_in: int = 120) -> tuple[Clock, _Realm, Authenticator]:
        clock = Clock()
        realm = _Realm(clock, expires_in)

        def lookup(registry: str) -> RegistrySettings:
            return settings

        auth = Authenticator(clock, realm, Credentials(clock, lookup), lookup)  # type: ignore[arg-type]
        return clock, realm, auth

    def test_token_refreshed_before_expiry(self) -> None:
        """A 120 s token is used for 90 s (a quarter, at most 30 s, is kept in hand), then fetched again."""
        settings = RegistrySettings(name=REGISTRY, user="u", password="p", tls=TLSSettings(ca="/ca.pem"))
        clock, realm, auth = self.authenticator(settings)
        scope = "repository:app:pull"
        self.assertIsNone(self.successResultOf(Deferred.fromCoroutine(auth.authorization(REGISTRY, scope))))
        self.assertTrue(self.successResultOf(Deferred.fromCoroutine(auth.answer(REGISTRY, scope, CHALLENGE))))
        url, tls, authorization = realm.fetches[0]
        self.assertEqual(url, "https://auth.test/token?scope=repository%3Aapp%3Apull&service=registry.test")
        self.assertEqual(tls, settings.tls)
        self.assertTrue(authorization and authorization.startswith("Basic "))
        clock.advance(89.9)
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(auth.authorization(REGISTRY, scope))),
                         b"Bearer token-1")
        clock.advance(0.1)
        self.assertIsNone(self.successResultOf(Deferred.fromCoroutine(auth.authorization(REGISTRY, scope))))

    def test_no_credentials_to_plain_http_realm(self) -> None:
        """An HTTPS registry's credentials never go to a plain-HTTP realm: the fetch fails, saying why."""
        settings = RegistrySettings(name=REGISTRY, user="u", password="p")
        _, realm, auth = self.authenticator(settings)
        failure = self.failureResultOf(Deferred.fromCoroutine(
            auth.answer(REGISTRY, "repository:app:pull", 'Bearer realm="http://auth.test/token"')), OCIError)
        self.assertIn("plain HTTP", failure.value.message)
        self.assertEqual(realm.fetches, [])

    def test_anonymous_plain_http_realm(self) -> None:
        """Without credentials there is nothing to protect: a plain-HTTP realm gives an anonymous token."""
        _, realm, auth = self.authenticator(RegistrySettings(name=REGISTRY))
        self.successResultOf(Deferred.fromCoroutine(
            auth.answer(REGISTRY, "repository:app:pull", 'Bearer realm="http://auth.test/token"')))
        self.assertEqual(realm.fetches[0][2], None)

    def test_plain_http_registry_keeps_its_realm(self) -> None:
        """A registry configured as plain HTTP sends its credentials in clear anyway: its realm may be HTTP."""
        settings = RegistrySettings(name=REGISTRY, scheme="http", user="u", password="p")
        _, realm, auth = self.authenticator(settings)
        self.successResultOf(Deferred.fromCoroutine(
            auth.answer(REGISTRY, "repository:app:pull", 'Bearer realm="http://auth.test/token"')))
        authorization = realm.fetches[0][2]
        self.assertTrue(authorization and authorization.startswith("Basic "))


class _Sniffing(Protocol):
    """One port speaking TLS and plain HTTP, told apart by the first byte, as a misconfigured registry might."""

    def __init__(self, tls: Factory, plain: Factory) -> None:
        self._tls = tls
        self._plain = plain
        self._inner: Protocol | None = None

    def dataReceived(self, data: bytes) -> None:
        if self._inner is None:
            factory = self._tls if data[:1] == b"\x16" else self._plain
            self._inner = factory.buildProtocol(self.transport.getPeer())
            self._inner.makeConnection(self.transport)
        self._inner.dataReceived(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._inner is not None:
            self._inner.connectionLost(reason)


class DowngradeTests(ServerTestCase):
    """Credentials for a registry reached over HTTPS never travel over plain HTTP."""

    def tls_options(self) -> tuple[str, Any]:
        ca = make_ca(self.mktemp(), "upstream")
        cert, key = ca.issue_server("127.0.0.1")
        with open(cert, "rb") as c, open(key, "rb") as k:
            options = PrivateCertificate.loadPEM(c.read() + b"\n" + k.read()).options()
        return ca.cert_path, options

    async def test_redirect_to_http_on_same_port_drops_credentials(self) -> None:
        """A 307 from https://host:port to http://host:port is followed without the Authorization header."""
        ca, options = self.tls_options()
        secure, plain = FakeRegistry(), FakeRegistry()
        factory = Factory.forProtocol(lambda: _Sniffing(TLSMemoryBIOFactory(options, False, Site(secure)),
                                                        Site(plain)))
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        name = f"127.0.0.1:{port.getHost().port}"
        content = os.urandom(1000)
        digest = digest_of(content)
        secure.auth = ("basic", "u", "p")
        secure.blobs[digest] = plain.blobs[digest] = content
        secure.redirect_blobs = f"http://{name}"
        await self.start(registries=(RegistrySettings(name=name, user="u", password="p", tls=TLSSettings(ca=ca)),))
        response, body = await self.get(f"/v2/app/blobs/{digest}?ns={name}")
        self.assertEqual((response.code, body), (200, content))
        self.assertTrue(secure.authorizations[-1].startswith("Basic "))
        self.assertEqual(plain.requests, [("GET", f"/v2/storage/blobs/{digest}")])
        self.assertEqual(plain.authorizations, [None])

    async def test_plain_http_realm_gets_no_credentials(self) -> None:
        """A bearer challenge from an HTTPS registry naming an http:// realm gets no credentials; the error says why."""
        ca, options = self.tls_options()
        secure = FakeRegistry()
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            TLSMemoryBIOFactory(options, False, Site(secure)))
        self.addCleanup(port.stopListening)
        name = f"127.0.0.1:{port.getHost().port}"
        realm = TokenRealm(secure)
        realm_port, listening = await listen(realm)
        self.addCleanup(listening.stopListening)
        secure.auth = ("bearer", f"http://127.0.0.1:{realm_port}/token")
        secure.add_image("app", "v1", make_image(b"private"))
        await self.start(registries=(RegistrySettings(name=name, user="u", password="p", tls=TLSSettings(ca=ca)),))
        response, body = await self.get(f"/v2/app/manifests/v1?ns={name}")
        self.assertEqual(response.code, 502)
        message = json.loads(body)["errors"][0]["message"]
        self.assertIn(f"token realm http://127.0.0.1:{realm_port}/token of {name} is plain HTTP", message)
        self.assertEqual([authorization for _, authorization in realm.requests if authorization], [])
