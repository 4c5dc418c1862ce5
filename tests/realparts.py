"""Real components for integration tests: certificates, CNCF distribution, a token issuer,
test images, skopeo, and the server under test as a twistd process."""

from __future__ import annotations

import atexit
import base64
import datetime
import gzip
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, cast
from urllib.parse import urlencode, urljoin

import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.error import ConnectError, TimeoutError
from twisted.internet.interfaces import IListeningPort, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import (
    Certificate,
    PrivateCertificate,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed
from twisted.web.iweb import IPolicyForHTTPS, IResponse
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MANIFEST_ACCEPT = ", ".join([DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST])
LIST_TYPES = (OCI_INDEX, DOCKER_LIST)
# The only codes an error body may carry (distribution-spec, "Error Codes").
SPEC_ERROR_CODES = frozenset({
    "BLOB_UNKNOWN", "BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN", "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "NAME_INVALID", "NAME_UNKNOWN",
    "SIZE_INVALID", "UNAUTHORIZED", "DENIED", "UNSUPPORTED", "TOOMANYREQUESTS"})

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# OCIREGISTRY_LONG=1 (scripts/soak) asks the fault, crash and load tests for their long variants.
LONG_RUN = os.environ.get("OCIREGISTRY_LONG") == "1"
MIB = 1024 * 1024
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0

_running: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    # Cleanups normally stop everything; this covers an interrupted trial run.
    for process in list(_running):
        if process.poll() is None:
            process.kill()
            process.wait()


async def sleep(seconds: float) -> None:
    """Wait without blocking the reactor."""
    await deferLater(reactor, seconds, lambda: None)


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on at the moment on the given address."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def digest_of(content: bytes) -> str:
    """The sha256 digest of some bytes."""
    return "sha256:" + hashlib.sha256(content).hexdigest()


def _tail(path: str, size: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


# Certificates


def _pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return builder.not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(
        now + datetime.timedelta(days=2))


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


class CA:
    """A certificate authority whose PEM files live in one directory."""

    def __init__(self, directory: str, name: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        builder = _validity(x509.CertificateBuilder())
        self._cert = (
            builder.subject_name(_name(name)).issuer_name(_name(name))
            .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()),
                           critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_path = os.path.join(directory, f"{name}-ca.crt")
        with open(self.cert_path, "wb") as f:
            f.write(self._cert.public_bytes(serialization.Encoding.PEM))
        self._issued = 0

    def _issue(self, common_name: str, usage: x509.ObjectIdentifier,
               names: Sequence[str]) -> tuple[str, str]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            _validity(x509.CertificateBuilder()).subject_name(_name(common_name))
            .issuer_name(self._cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                           critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName([_san(n) for n in names]),
                                            critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        self._issued += 1
        stem = os.path.join(self.directory, f"{self.name}-{self._issued}-{common_name}")
        with open(stem + ".crt", "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(stem + ".key", "wb") as f:
            f.write(_pem_key(key))
        return stem + ".crt", stem + ".key"

    def issue_server(self, *names: str) -> tuple[str, str]:
        """A server certificate for IP addresses and DNS names: (cert_path, key_path)."""
        return self._issue(names[0], ExtendedKeyUsageOID.SERVER_AUTH, names)

    def issue_client(self, common_name: str) -> tuple[str, str]:
        """A client certificate: (cert_path, key_path)."""
        return self._issue(common_name, ExtendedKeyUsageOID.CLIENT_AUTH, ())

    def cert_dir(self, directory: str, client: str | None = None) -> str:
        """A containers-style cert dir: ca.crt, and client.cert/client.key for CN `client`."""
        os.makedirs(directory, exist_ok=True)
        shutil.copyfile(self.cert_path, os.path.join(directory, "ca.crt"))
        if client is not None:
            cert, key = self.issue_client(client)
            shutil.copyfile(cert, os.path.join(directory, "client.cert"))
            shutil.copyfile(key, os.path.join(directory, "client.key"))
        return directory


def make_ca(directory: str, name: str = "test") -> CA:
    """Create a CA whose certificate and issued files are written into `directory`."""
    return CA(directory, name)


# HTTP client side


@implementer(IPolicyForHTTPS)
class _CertDirPolicy:
    """Trust ca.crt and present client.cert/client.key from a cert dir."""

    def __init__(self, cert_dir: str | None) -> None:
        self._trust = None
        self._client = None
        if cert_dir is None:
            return
        ca = os.path.join(cert_dir, "ca.crt")
        if os.path.exists(ca):
            with open(ca, "rb") as f:
                self._trust = trustRootFromCertificates([Certificate.loadPEM(f.read())])
        cert, key = os.path.join(cert_dir, "client.cert"), os.path.join(cert_dir, "client.key")
        if os.path.exists(cert) and os.path.exists(key):
            with open(cert, "rb") as c, open(key, "rb") as k:
                self._client = PrivateCertificate.loadPEM(c.read() + k.read())

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        """TLS options for one server name."""
        return optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._trust,
                                   clientCertificate=self._client)


class WebClient:
    """A treq client with its own connection pool, closed by `close()`."""

    def __init__(self, cert_dir: str | None = None) -> None:
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        agent = Agent(reactor, contextFactory=_CertDirPolicy(cert_dir), pool=self._pool)
        self.client = treq.client.HTTPClient(agent)

    async def close(self) -> None:
        """Close every cached connection and wait until they are gone."""
        await self._pool.closeCachedConnections()


async def http_request(method: str, url: str, *, cert_dir: str | None = None,
                       headers: dict[str | bytes, str | bytes] | None = None,
                       auth: tuple[str, str] | None = None,
                       data: dict[str, str] | None = None) -> tuple[IResponse, bytes]:
    """One request with a fresh client: the response and its whole body."""
    http = WebClient(cert_dir)
    try:
        response = await http.client.request(method, url, headers=headers, auth=auth, data=data)
        body = await treq.content(response)
        return response, body
    finally:
        await http.close()


# Upstream registry (CNCF distribution)


_ACCESS_LINE = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+" (\d{3}) ')


class Registry:
    """A `docker-registry serve` process with its own storage, config and log."""

    def __init__(self, base_dir: str, *, address: str, port: int,
                 tls: tuple[str, str] | None, client_ca: str | None,
                 htpasswd_users: dict[str, str] | None, token: TokenIssuer | None) -> None:
        self.base_dir = os.path.abspath(base_dir)
        self.address = address
        self.port = port
        self.tls = tls
        self.scheme = "https" if tls else "http"
        default = 443 if tls else 80
        self.host = address if port == default else f"{address}:{port}"
        self.url = f"{self.scheme}://{self.host}"
        self.log_path = os.path.join(self.base_dir, "registry.log")
        self.config_path = os.path.join(self.base_dir, "config.yml")
        self._process: subprocess.Popen[bytes] | None = None
        if htpasswd_users and token:
            raise ValueError("distribution takes one auth method: htpasswd or token")
        os.makedirs(self.base_dir, exist_ok=True)
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": os.path.join(self.base_dir, "storage")},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"{address}:{port}", "secret": secrets.token_hex(16)},
        }
        if tls:
            config["http"]["tls"] = {"certificate": os.path.abspath(tls[0]),
                                     "key": os.path.abspath(tls[1])}
            if client_ca:
                config["http"]["tls"]["clientcas"] = [os.path.abspath(client_ca)]
        if htpasswd_users:
            import bcrypt

            htpasswd = os.path.join(self.base_dir, "htpasswd")
            with open(htpasswd, "w") as f:
                for user, password in htpasswd_users.items():
                    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
                    f.write(f"{user}:{hashed}\n")
            config["auth"] = {"htpasswd": {"realm": "test-registry", "path": htpasswd}}
        elif token:
            config["auth"] = {"token": {"realm": token.realm, "service": token.service,
                                        "issuer": token.issuer,
                                        "rootcertbundle": token.cert_path}}
        # JSON is YAML; distribution's parser reads it.
        with open(self.config_path, "w") as f:
            json.dump(config, f, indent=2)

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._process is not None and self._process.poll() is None

    async def start(self) -> None:
        """Start the process (again) on the same storage and wait until it listens."""
        if self.running:
            return
        with open(self.log_path, "ab") as log:
            offset = log.tell()
            env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
            self._process = subprocess.Popen(
                ["docker-registry", "serve", self.config_path], cwd=self.base_dir, env=env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        _running.add(self._process)

        async def listening() -> bool:
            # distribution logs "listening on" after loading TLS files, just before serving.
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return b"listening on" in f.read() and await _accepts(self.address, self.port)

        await _until_ready(self._process, self.log_path, "registry", listening, self.stop)

    async def stop(self) -> None:
        """Terminate the process and wait for it to exit."""
        if self._process is not None:
            await _terminate(self._process, signal.SIGTERM)

    def requests(self) -> list[tuple[str, str, int]]:
        """Every (method, path, status) in the access log, across restarts."""
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return [(m[1], m[2], int(m[3])) for m in map(_ACCESS_LINE.search, f) if m]

    async def settled(self, quiet: float = 0.2, limit: float = 3.0) -> None:
        """Wait until the access log stops growing: distribution writes a line only after
        the response has gone out, so a client can be done before its request is logged."""
        await log_settled(self.log_path, quiet, limit)

    def count_requests(self, method: str, path_substring: str, status: int | None = None) -> int:
        """How many requests with this method had a path containing `path_substring`."""
        return sum(1 for m, path, code in self.requests()
                   if m == method and path_substring in path and status in (None, code))


async def log_settled(path: str, quiet: float = 0.2, limit: float = 3.0) -> None:
    """Wait until a log file stops growing (servers log a request after answering it)."""
    deadline = time.monotonic() + limit
    size = -1
    while time.monotonic() < deadline:
        current = os.path.getsize(path) if os.path.exists(path) else 0
        if current == size:
            return
        size = current
        await sleep(quiet)


async def _until_ready(process: subprocess.Popen[bytes], log_path: str, what: str,
                       ready: Callable[[], Awaitable[bool]], give_up: Callable[[], Awaitable[None]]) -> None:
    """Poll ``ready`` until it says yes; fail with the log's tail if the process exits or takes too long."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{_tail(log_path)}")
        if await ready():
            return
        if time.monotonic() > deadline:
            await give_up()
            raise RuntimeError(f"{what} did not get ready:\n{_tail(log_path)}")
        await sleep(0.05)


async def _accepts(address: str, port: int) -> bool:
    endpoint = TCP4ClientEndpoint(reactor, address, port, timeout=2)
    try:
        protocol = await endpoint.connect(Factory.forProtocol(_Closer))
    except (ConnectError, TimeoutError):
        return False
    await protocol.close()
    return True


class _Closer(Protocol):
    def __init__(self) -> None:
        self._lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._lost.callback(None)

    async def close(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()
        await self._lost


async def _terminate(process: subprocess.Popen[bytes], sig: int) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        deadline = time.monotonic() + STOP_TIMEOUT
        while process.poll() is None and time.monotonic() < deadline:
            await sleep(0.02)
        if process.poll() is None:
            process.kill()
            process.wait()
    _running.discard(process)


def start_process(argv: Sequence[str], log_path: str, *, cwd: str,
                  env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a background process writing to `log_path`, killed at exit if left running."""
    with open(log_path, "ab") as log:
        process = subprocess.Popen(list(argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT)
    _running.add(process)
    return process


async def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM a process from `start_process` and wait for it (SIGKILL if it lingers)."""
    await _terminate(process, signal.SIGTERM)


class WorkspaceTestCase(TestCase):
    """A test with a directory of its own for registries, images, caches and configuration."""

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)

    def path(self, name: str) -> str:
        """A path inside the test's directory."""
        return os.path.join(self.base, name)

    def config(self, registries: list[dict[str, Any]]) -> str:
        """Write a server configuration file naming these registries; returns its path."""
        config = self.path("config.yaml")
        with open(config, "w") as f:
            json.dump({"registries": registries}, f)
        return config


async def start_registry(base_dir: str, *, test: TestCase, address: str = "127.0.0.1",
                         port: int = 0, tls: tuple[str, str] | None = None,
                         client_ca: str | None = None,
                         htpasswd_users: dict[str, str] | None = None,
                         token: TokenIssuer | None = None) -> Registry:
    """Start distribution on `address:port` (0: a free port), stopped at test cleanup."""
    registry = Registry(base_dir, address=address, port=port or free_port(address), tls=tls,
                        client_ca=client_ca, htpasswd_users=htpasswd_users, token=token)
    test.addCleanup(registry.stop)
    await registry.start()
    return registry


# Token issuer


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _parse_scope(scope: str) -> list[dict[str, Any]]:
    access = []
    for item in scope.split():
        kind, _, rest = item.partition(":")
        name, _, actions = rest.rpartition(":")
        access.append({"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]})
    return access


class TokenIssuer(Resource):
    """The Docker token protocol (GET, and POST as an OAuth2 password grant), signing RS256 JWTs."""

    isLeaf = True

    def __init__(self, directory: str, *, users: dict[str, str] | None = None,
                 expires_in: int = 300, service: str = "test-registry",
                 issuer: str = "test-issuer") -> None:
        super().__init__()
        os.makedirs(directory, exist_ok=True)
        self.users = users
        self.expires_in = expires_in
        self.service = service
        self.issuer = issuer
        self.requests: list[tuple[str, str, str | None]] = []
        self.realm = ""
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = (
            _validity(x509.CertificateBuilder()).subject_name(_name(issuer)).issuer_name(_name(issuer))
            .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self._x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self.cert_path = os.path.join(directory, "token-signer.crt")
        with open(self.cert_path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        self._port: IListeningPort | None = None
        self._factory: WrappingFactory | None = None

    def make_token(self, scope: str, subject: str, lifetime: int | None = None) -> str:
        """A signed JWT granting every action that `scope` asks for."""
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {
            "iss": self.issuer, "sub": subject, "aud": self.service,
            "exp": now + (self.expires_in if lifetime is None else lifetime),
            "nbf": now - 1, "iat": now, "jti": uuid.uuid4().hex,
            "access": _parse_scope(scope),
        }
        signing_input = (_b64url(json.dumps(header).encode()) + "."
                         + _b64url(json.dumps(claims).encode()))
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(signature)

    def _arg(self, request: Request, name: str) -> str:
        values = (request.args or {}).get(name.encode(), [])
        return " ".join(v.decode() for v in values)

    def _answer(self, request: Request, scope: str, user: str | None, password: str | None) -> bytes:
        method = request.method.decode()
        self.requests.append((method, scope, user))
        request.setHeader(b"connection", b"close")
        request.setHeader(b"content-type", b"application/json")
        if self.users is not None and (user is None or self.users.get(user) != password):
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Basic realm="token"')
            return b'{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}'
        token = self.make_token(scope, user or "")
        issued = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return json.dumps({"token": token, "access_token": token,
                           "expires_in": self.expires_in, "issued_at": issued}).encode()

    def render_GET(self, request: Request) -> bytes:
        """A token for the query's scope, checking basic credentials."""
        user = request.getUser().decode() or None
        password = request.getPassword().decode() if user else None
        return self._answer(request, self._arg(request, "scope"), user, password)

    def render_POST(self, request: Request) -> bytes:
        """A token for an OAuth2 password (or refresh) grant."""
        user = self._arg(request, "username") or None
        password = self._arg(request, "password") if user else None
        if user is None and request.getUser():
            user, password = request.getUser().decode(), request.getPassword().decode()
        return self._answer(request, self._arg(request, "scope"), user, password)

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1."""
        self._factory = WrappingFactory(Site(self))
        self._port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            self._factory)
        self.realm = f"http://127.0.0.1:{self._port.getHost().port}/token"

    async def stop(self) -> None:
        """Stop listening and close open connections."""
        if self._port is not None:
            port, self._port = self._port, None
            stopped = port.stopListening()
            if stopped is not None:
                await stopped
        if self._factory is not None:
            for protocol in list(self._factory.protocols):
                protocol.transport.loseConnection()
            deadline = time.monotonic() + STOP_TIMEOUT
            while self._factory.protocols and time.monotonic() < deadline:
                await sleep(0.01)


async def start_token_issuer(directory: str, *, test: TestCase,
                             users: dict[str, str] | None = None, expires_in: int = 300,
                             service: str = "test-registry",
                             issuer: str = "test-issuer") -> TokenIssuer:
    """Serve a token issuer in-process on 127.0.0.1, stopped at test cleanup."""
    issuer_ = TokenIssuer(directory, users=users, expires_in=expires_in, service=service,
                          issuer=issuer)
    test.addCleanup(issuer_.stop)
    await issuer_.start()
    return issuer_


# Talking to a registry


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


async def registry_request(registry: Registry | str, method: str, path: str, *,
                           creds: tuple[str, str] | None = None, cert_dir: str | None = None,
                           headers: dict[str | bytes, str | bytes] | None = None) -> tuple[IResponse, bytes]:
    """A request to a registry that answers basic and bearer challenges: response and body."""
    base = registry.url if isinstance(registry, Registry) else registry
    headers = dict(headers or {})
    http = WebClient(cert_dir)
    try:
        response = await http.client.request(method, base + path, headers=headers)
        body = await treq.content(response)
        if response.code == 401:
            challenge = response.headers.getRawHeaders("www-authenticate", [""])[0]
            scheme, params = _challenge(challenge)
            if scheme == "basic" and creds:
                response = await http.client.request(method, base + path, headers=headers,
                                                     auth=creds)
                body = await treq.content(response)
            elif scheme == "bearer":
                query: dict[str, str] = {k: params[k] for k in ("service", "scope") if k in params}
                token_response = await http.client.get(params["realm"], params=query, auth=creds)
                token_body = await treq.content(token_response)
                if token_response.code == 200:
                    token = json.loads(token_body)
                    headers["Authorization"] = "Bearer " + (token.get("token") or token["access_token"])
                    response = await http.client.request(method, base + path, headers=headers)
                    body = await treq.content(response)
        return response, body
    finally:
        await http.close()


async def registry_manifest_digest(registry: Registry | str, repo: str, ref: str, *,
                                   creds: tuple[str, str] | None = None,
                                   cert_dir: str | None = None) -> str:
    """The Docker-Content-Digest a registry gives for a manifest (HEAD, all media types)."""
    response, _ = await registry_request(registry, "HEAD", f"/v2/{repo}/manifests/{ref}",
                                         creds=creds, cert_dir=cert_dir,
                                         headers={"Accept": MANIFEST_ACCEPT})
    if response.code != 200:
        raise RuntimeError(f"HEAD manifest {repo}:{ref} answered {response.code}")
    return str(response.headers.getRawHeaders("docker-content-digest")[0])


# Test images


@dataclass(frozen=True)
class ImageSet:
    """A multi-platform image on disk: what a client should see after a copy."""

    source: str
    directory: str
    digest: str
    media_type: str
    manifests: dict[str, str]
    blobs: dict[str, int] = field(default_factory=dict)
    large_layer: str | None = None

    def blob_path(self, digest: str) -> str:
        """Where a blob (or, in an OCI layout, a manifest) of this image is on disk."""
        algorithm, hex_ = digest.split(":", 1)
        if self.source.startswith("oci:"):
            return os.path.join(self.directory, "blobs", algorithm, hex_)
        return os.path.join(self.directory, hex_)

    def manifest_bytes(self, digest: str) -> bytes:
        """The exact bytes of the top manifest or of one platform's manifest."""
        if self.source.startswith("oci:"):
            path = self.blob_path(digest)
        elif digest == self.digest:
            path = os.path.join(self.directory, "manifest.json")
        else:
            path = os.path.join(self.directory, digest.split(":", 1)[1] + ".manifest.json")
        with open(path, "rb") as f:
            return f.read()


class _HashingWriter:
    def __init__(self, target: IO[bytes] | gzip.GzipFile) -> None:
        self.target = target
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        self.target.write(data)
        return len(data)

    def flush(self) -> None:
        self.target.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


class _RandomReader:
    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return os.urandom(n)


class _Layout:
    def __init__(self, directory: str, oci: bool) -> None:
        self.directory = directory
        self.oci = oci
        self.blobs: dict[str, int] = {}
        os.makedirs(self.blob_dir, exist_ok=True)

    @property
    def blob_dir(self) -> str:
        return os.path.join(self.directory, "blobs", "sha256") if self.oci else self.directory

    def add(self, content: bytes) -> dict[str, Any]:
        digest = digest_of(content)
        with open(os.path.join(self.blob_dir, digest.split(":")[1]), "wb") as f:
            f.write(content)
        self.blobs[digest] = len(content)
        return {"digest": digest, "size": len(content)}

    def add_layer(self, name: str, size: int, compress: bool) -> tuple[dict[str, Any], str]:
        fd, temp = tempfile.mkstemp(dir=self.blob_dir, prefix=".layer-")
        with os.fdopen(fd, "wb") as f:
            outer = _HashingWriter(f)
            zipped = (gzip.GzipFile(fileobj=cast(IO[bytes], outer), mode="wb", mtime=0,
                                    compresslevel=1) if compress else None)
            inner = _HashingWriter(zipped) if zipped else outer
            with tarfile.open(fileobj=cast(IO[bytes], inner), mode="w|",
                              format=tarfile.PAX_FORMAT) as tar:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = size, 0o644, 0
                tar.addfile(info, cast(IO[bytes], _RandomReader(size)))
            if zipped:
                zipped.close()
        os.replace(temp, os.path.join(self.blob_dir, outer.digest.split(":")[1]))
        self.blobs[outer.digest] = outer.size
        return {"digest": outer.digest, "size": outer.size}, inner.digest


def _platform(spec: Sequence[str]) -> dict[str, str]:
    platform = {"architecture": spec[1], "os": spec[0]}
    if len(spec) > 2:
        platform["variant"] = spec[2]
    return platform


def _platform_key(platform: dict[str, str]) -> str:
    return "/".join(filter(None, [platform.get("os"), platform.get("architecture"),
                                  platform.get("variant")]))


def _build(layout: _Layout, docker: bool, platforms: Sequence[Sequence[str]],
           layer_sizes: Sequence[int],
           large_layer: int) -> tuple[bytes, dict[str, str], str | None, dict[str, bytes]]:
    manifests: dict[str, str] = {}
    entries: list[dict[str, Any]] = []
    instances: dict[str, bytes] = {}
    large_digest = None
    for number, spec in enumerate(platforms):
        platform = _platform(spec)
        key = _platform_key(platform)
        sizes = list(layer_sizes) + ([large_layer] if large_layer and number == 0 else [])
        layers, diff_ids = [], []
        for i, size in enumerate(sizes):
            descriptor, diff_id = layout.add_layer(f"data/{key.replace('/', '-')}-{i}.bin", size,
                                                   compress=docker)
            layers.append({"mediaType": DOCKER_LAYER if docker else OCI_LAYER, **descriptor})
            diff_ids.append(diff_id)
            if large_layer and number == 0 and i == len(sizes) - 1:
                large_digest = descriptor["digest"]
        config = json.dumps({
            **platform, "created": "2024-01-01T00:00:00Z",
            "config": {"Labels": {"test.nonce": secrets.token_hex(8)}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "realparts"}] * len(sizes),
        }).encode()
        manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
            "config": {"mediaType": DOCKER_CONFIG if docker else OCI_CONFIG, **layout.add(config)},
            "layers": layers,
        }, indent=3).encode()
        if docker:
            digest = digest_of(manifest)
            instances[digest] = manifest
            entries.append({"mediaType": DOCKER_MANIFEST, "digest": digest,
                            "size": len(manifest), "platform": platform})
        else:
            entries.append({"mediaType": OCI_MANIFEST, **layout.add(manifest), "platform": platform})
        manifests[key] = entries[-1]["digest"]
    top = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_LIST if docker else OCI_INDEX,
                      "manifests": entries}, indent=3).encode()
    return top, manifests, large_digest, instances


PLATFORMS = (("linux", "amd64"), ("linux", "arm64"))


def build_oci_index(directory: str, platforms: Sequence[Sequence[str]] = PLATFORMS,
                    layer_sizes: Sequence[int] = (2048, 1024), large_layer: int = 0) -> ImageSet:
    """An OCI image layout holding one OCI index of tar-layered images, one per platform."""
    layout = _Layout(directory, oci=True)
    top, manifests, large, _ = _build(layout, False, platforms, layer_sizes, large_layer)
    blobs = dict(layout.blobs)
    descriptor = layout.add(top)
    for digest in [descriptor["digest"], *manifests.values()]:
        blobs.pop(digest, None)
    with open(os.path.join(directory, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(os.path.join(directory, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [{
            "mediaType": OCI_INDEX, **descriptor,
            "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}, f)
    return ImageSet(f"oci:{directory}:latest", directory, descriptor["digest"], OCI_INDEX,
                    manifests, blobs, large)


def build_docker_list(directory: str, platforms: Sequence[Sequence[str]] = PLATFORMS,
                      layer_sizes: Sequence[int] = (2048, 1024), large_layer: int = 0) -> ImageSet:
    """A skopeo `dir:` directory holding a Docker manifest list of gzip-layered schema 2 images."""
    layout = _Layout(directory, oci=False)
    top, _, large, instances = _build(layout, True, platforms, layer_sizes, large_layer)
    for digest, manifest in instances.items():
        with open(os.path.join(directory, digest.split(":")[1] + ".manifest.json"), "wb") as f:
            f.write(manifest)
    with open(os.path.join(directory, "manifest.json"), "wb") as f:
        f.write(top)
    with open(os.path.join(directory, "version"), "w") as f:
        f.write("Directory Transport Version: 1.1\n")
    image = read_dir_image(directory)
    return ImageSet(image.source, directory, image.digest, image.media_type, image.manifests,
                    image.blobs, large)


def read_dir_image(directory: str) -> ImageSet:
    """Describe what a skopeo `dir:` directory holds (a list and its instances, or one image)."""
    with open(os.path.join(directory, "manifest.json"), "rb") as f:
        top = f.read()
    parsed = json.loads(top)
    media_type = parsed.get("mediaType", "")
    blobs: dict[str, int] = {}
    manifests: dict[str, str] = {}
    images = [parsed]
    if media_type in LIST_TYPES or "manifests" in parsed:
        images = []
        for entry in parsed["manifests"]:
            manifests[_platform_key(entry.get("platform", {}))] = entry["digest"]
            path = os.path.join(directory, entry["digest"].split(":")[1] + ".manifest.json")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    images.append(json.loads(f.read()))
    for image in images:
        for descriptor in [image["config"], *image["layers"]]:
            blobs[descriptor["digest"]] = descriptor["size"]
    return ImageSet(f"dir:{directory}", directory, digest_of(top), media_type, manifests, blobs)


# skopeo


class SkopeoError(Exception):
    """skopeo exited with an error; the message holds its stderr."""


async def skopeo(*args: str, timeout: float = 120.0) -> str:
    """Run skopeo with a private, empty configuration; its stdout, or SkopeoError."""
    with tempfile.TemporaryDirectory(prefix="skopeo-") as home:
        registries_conf = os.path.join(home, "registries.conf")
        policy = os.path.join(home, "policy.json")
        registries_d = os.path.join(home, "registries.d")
        os.makedirs(registries_d)
        open(registries_conf, "w").close()
        with open(policy, "w") as f:
            json.dump({"default": [{"type": "insecureAcceptAnything"}]}, f)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home,
            "XDG_RUNTIME_DIR": home, "XDG_CONFIG_HOME": os.path.join(home, ".config"),
            "CONTAINERS_REGISTRIES_CONF": registries_conf,
            "REGISTRY_AUTH_FILE": os.path.join(home, "auth.json"),
            "TMPDIR": home,
        }
        argv = ["--policy", policy, "--registries.d", registries_d,
                "--command-timeout", f"{int(timeout)}s", *args]
        out, err, code = await getProcessOutputAndValue(shutil.which("skopeo") or "skopeo",
                                                        argv, env=env, path=home)
    if code != 0:
        shown = " ".join(re.sub(r"^(--\w+-creds=[^:]*):.*", r"\1:***", a) for a in args)
        raise SkopeoError(f"skopeo {shown} exited {code}:\n{err.decode(errors='replace')}")
    return str(out.decode(errors="replace"))


def _tls_flags(side: str, tls: bool, cert_dir: str | None,
               creds: tuple[str, str] | None) -> list[str]:
    flags = [f"--{side}-tls-verify={'true' if tls else 'false'}"]
    if cert_dir:
        flags.append(f"--{side}-cert-dir={cert_dir}")
    if creds:
        flags.append(f"--{side}-creds={creds[0]}:{creds[1]}")
    return flags


async def push(image: ImageSet | str, registry: Registry | str, repo: str, tag: str, *,
               creds: tuple[str, str] | None = None, cert_dir: str | None = None) -> None:
    """Copy every instance of an image into a registry byte for byte (--all --preserve-digests)."""
    source = image.source if isinstance(image, ImageSet) else image
    if isinstance(registry, Registry):
        host, tls = registry.host, registry.tls is not None
    else:
        host, tls = registry, cert_dir is not None
    await skopeo("copy", "--all", "--preserve-digests", "--quiet",
                 *_tls_flags("dest", tls, cert_dir, creds),
                 source, f"docker://{host}/{repo}:{tag}")


async def skopeo_copy_all(src_ref: str, dest_dir: str, *, src_tls_verify: bool = False,
                          cert_dir: str | None = None,
                          creds: tuple[str, str] | None = None) -> ImageSet:
    """Pull every instance of a reference into a `dir:` directory and describe what arrived."""
    if not src_ref.startswith(("docker://", "oci:", "dir:", "oci-archive:", "docker-archive:")):
        src_ref = "docker://" + src_ref
    os.makedirs(dest_dir, exist_ok=True)
    await skopeo("copy", "--all", "--preserve-digests", "--quiet",
                 *_tls_flags("src", src_tls_verify, cert_dir, creds),
                 src_ref, f"dir:{dest_dir}")
    return read_dir_image(dest_dir)


# The server under test


class Server:
    """The ociregistry twistd process, listening on a free port of 127.0.0.1."""

    def __init__(self, image_path: str, args: Sequence[str], port: int, run_dir: str,
                 env: dict[str, str] | None = None) -> None:
        self.image_path = os.path.abspath(image_path)
        self.args = list(args)
        self.env = dict(env or {})
        self.port = port
        self.run_dir = run_dir
        self.host = f"127.0.0.1:{port}"
        self.url = f"http://{self.host}"
        self.log_path = os.path.join(run_dir, "server.log")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The process id, once started."""
        return self._process.pid if self._process else None

    def command(self) -> list[str]:
        """The twistd command line."""
        return twistd_command("ociregistry", "--image-path", self.image_path,
                              "--listen", f"tcp:{self.port}:interface=127.0.0.1", *self.args)

    async def start(self) -> None:
        """Start the process (again) and wait until `GET /v2/` answers."""
        if self.running:
            return
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [PROJECT_ROOT, env.get("PYTHONPATH")]))
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(self.command(), cwd=self.run_dir, env=env,
                                             stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT)
        _running.add(self._process)

        async def answering() -> bool:
            try:
                await http_request("GET", self.url + "/v2/")
                return True
            except (ConnectError, TimeoutError, ResponseFailed):
                return False

        await _until_ready(self._process, self.log_path, "server", answering, self.kill)

    async def stop(self) -> None:
        """SIGTERM, and wait for the exit."""
        if self._process is not None:
            await _terminate(self._process, signal.SIGTERM)

    async def kill(self) -> None:
        """SIGKILL, and wait for the exit."""
        if self._process is not None:
            await _terminate(self._process, signal.SIGKILL)

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has ended."""
        return self._process.poll() if self._process else None

    def log_text(self) -> str:
        """Everything the server wrote, across restarts."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""


def installed_script(name: str) -> str:
    """A console script installed beside the running interpreter (never one found on PATH)."""
    return os.path.join(os.path.dirname(sys.executable), name)


def twistd_command(*args: str) -> list[str]:
    """The twistd installed beside this Python, in the foreground, without a pid file."""
    return [installed_script("twistd"), "--nodaemon", "--pidfile=", *args]


async def start_server(image_path: str, *, test: TestCase, args: Sequence[str] = (),
                       port: int = 0, env: dict[str, str] | None = None) -> Server:
    """Start `twistd -n ociregistry` on 127.0.0.1 (a free port by default), stopped at cleanup."""
    run_dir = os.path.abspath(test.mktemp())
    os.makedirs(run_dir)
    server = Server(image_path, args, port or free_port(), run_dir, env)
    test.addCleanup(server.stop)
    await server.start()
    return server


# A bandwidth-limited relay in front of an upstream


_REQUEST_LINE = re.compile(rb"(GET|HEAD|POST|PUT|PATCH|DELETE) (\S+) HTTP/1\.[01]\r\n")


@dataclass
class RelayedConnection:
    """One connection through a relay: its request lines, its first answer byte, its bytes."""

    requests: list[str] = field(default_factory=list)
    first_byte: float | None = None
    bytes_down: int = 0


class _Pacer:
    """A bucket shared by every connection: upstream bytes leave at `rate` bytes per second."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._free = 0.0

    def delay(self, size: int) -> float:
        """Seconds to hold back the next read after sending `size` bytes now."""
        if not self.rate:
            return 0.0
        now = time.monotonic()
        self._free = max(self._free, now) + size / self.rate
        return self._free - now


@implementer(IPushProducer)
class _Valve:
    """Pauses an upstream transport while any reason holds (client backpressure, the pacer)."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._reasons: set[str] = set()

    def close(self, reason: str) -> None:
        if not self._reasons:
            self._transport.pauseProducing()
        self._reasons.add(reason)

    def open(self, reason: str) -> None:
        self._reasons.discard(reason)
        if not self._reasons:
            self._transport.resumeProducing()

    def pauseProducing(self) -> None:
        self.close("consumer")

    def resumeProducing(self) -> None:
        self.open("consumer")

    def stopProducing(self) -> None:
        self._transport.loseConnection()


class _RelayUp(Protocol):
    """The relay's connection to the upstream: everything it receives goes down, paced."""

    def __init__(self, down: _RelayDown) -> None:
        self.down = down

    def dataReceived(self, data: bytes) -> None:
        self.down.send_down(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.down.transport.loseConnection()


class _RelayDown(Protocol):
    """A client's connection to the relay."""

    def __init__(self, relay: ThrottledRelay) -> None:
        self.relay = relay
        self.record = RelayedConnection()
        self.up: _RelayUp | None = None
        self.valve: _Valve | None = None
        self._reopen: Any = None

    def connectionMade(self) -> None:
        self.relay.connections.append(self.record)
        self.relay.open.add(self)
        self.transport.pauseProducing()
        endpoint = TCP4ClientEndpoint(reactor, self.relay.target[0], self.relay.target[1], timeout=5)
        connecting = endpoint.connect(Factory.forProtocol(lambda: _RelayUp(self)))
        connecting.addCallbacks(self._connected, lambda _: self.transport.loseConnection())

    def _connected(self, up: _RelayUp) -> None:
        self.up = up
        self.valve = _Valve(up.transport)
        self.transport.registerProducer(self.valve, True)
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        assert self.up is not None
        self.record.requests.extend(f"{m[1].decode()} {m[2].decode()}"
                                    for m in _REQUEST_LINE.finditer(data))
        self.up.transport.write(data)

    def send_down(self, data: bytes) -> None:
        """Pass upstream bytes to the client and hold the upstream back to keep the rate."""
        if self.record.first_byte is None:
            self.record.first_byte = time.time()
        self.record.bytes_down += len(data)
        self.transport.write(data)
        wait = self.relay.pacer.delay(len(data))
        if wait > 0.001 and self.valve is not None:
            self.valve.close("pacer")
            self._reopen = reactor.callLater(wait, self.valve.open, "pacer")

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.relay.open.discard(self)
        if self._reopen is not None and self._reopen.active():
            self._reopen.cancel()
        if self.up is not None:
            self.up.transport.loseConnection()


class ThrottledRelay:
    """A TCP relay to `target` that limits upstream-to-client bandwidth (shared) and counts bytes."""

    protocol: type[_RelayDown] = _RelayDown

    def __init__(self, target: tuple[str, int], rate: float | None) -> None:
        self.target = target
        self.pacer = _Pacer(rate)
        self.connections: list[RelayedConnection] = []
        self.open: set[_RelayDown] = set()
        self.host = ""
        self._port: IListeningPort | None = None

    @property
    def bytes_down(self) -> int:
        """Every byte relayed from the upstream so far."""
        return sum(c.bytes_down for c in self.connections)

    def carrying(self, fragment: str) -> list[RelayedConnection]:
        """The connections that carried a request whose line contains `fragment`."""
        return [c for c in self.connections if any(fragment in r for r in c.requests)]

    async def start(self, address: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on `address:port` (0: a free port)."""
        self._port = await serverFromString(reactor, f"tcp:{port}:interface={address}").listen(
            Factory.forProtocol(lambda: self.protocol(self)))
        bound = self._port.getHost().port
        self.host = address if bound == 80 else f"{address}:{bound}"

    async def stop(self) -> None:
        """Stop listening and cut every relayed connection."""
        if self._port is not None:
            port, self._port = self._port, None
            await maybeDeferred(port.stopListening)
        for down in list(self.open):
            down.transport.abortConnection()
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.open and time.monotonic() < deadline:
            await sleep(0.01)


class _FaultyDown(_RelayDown):
    """A client's connection to a faulty relay: while a fault is on, its bytes meet the fault."""

    relay: FaultyRelay

    def dataReceived(self, data: bytes) -> None:
        fault = self.relay.fault
        if fault is None:
            self.relay.bytes_up += len(data)
            super().dataReceived(data)
        elif fault == "reset":
            self.transport.abortConnection()
        elif fault == "slow":
            self.relay.bytes_up += len(data)
            reactor.callLater(self.relay.delay, self._late, data)
        elif fault == "silent":
            pass   # taken, and never answered
        elif self.transport.connected:
            body = (f"<?xml version=\"1.0\"?><Error><Code>{_S3_FAULTS[fault][1]}</Code>"
                    "<Message>injected</Message></Error>").encode()
            self.transport.write(f"HTTP/1.1 {fault} {_S3_FAULTS[fault][0]}\r\nContent-Type: application/xml\r\n"
                                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            self.transport.loseConnection()

    def _late(self, data: bytes) -> None:
        if self.up is not None and self.transport.connected:
            super().dataReceived(data)


# The answers a faulty relay gives in place of an S3 store: status, reason and S3 error code.
_S3_FAULTS = {"500": ("Internal Server Error", "InternalError"), "503": ("Service Unavailable", "SlowDown")}


class FaultyRelay(ThrottledRelay):
    """A relay in front of an S3 store that, while ``fault`` is set, answers every request with
    a 500 or 503 (``"500"``, ``"503"``), resets the connection (``"reset"``, also midway through
    a body), passes the client's bytes on ``delay`` seconds late (``"slow"``), or takes them and
    never answers (``"silent"``)."""

    protocol = _FaultyDown

    def __init__(self, target: tuple[str, int], delay: float = 1.0) -> None:
        super().__init__(target, None)
        self.fault: str | None = None
        self.delay = delay
        self.bytes_up = 0


async def start_relay(registry: Registry, *, test: TestCase, rate: float | None,
                      address: str = "127.0.0.1", port: int = 0) -> ThrottledRelay:
    """A bandwidth-limited relay in front of a registry, stopped at test cleanup."""
    relay = ThrottledRelay((registry.address, registry.port), rate)
    test.addCleanup(relay.stop)
    await relay.start(address, port)
    return relay


# Uploading blobs, and what a registry sent


_ACCESS_BYTES = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+" (\d{3}) (\d+) ')


async def upload_blob(registry: Registry, repository: str, content: bytes,
                      web: WebClient | None = None) -> str:
    """Upload one blob (POST a session, PUT the bytes with their digest): its digest."""
    digest = digest_of(content)
    http = web or WebClient()
    try:
        response = await http.client.post(f"{registry.url}/v2/{repository}/blobs/uploads/")
        await treq.content(response)
        location = response.headers.getRawHeaders("location", [""])[0]
        if response.code != 202 or not location:
            raise RuntimeError(f"upload to {repository} answered {response.code}")
        url = urljoin(registry.url + "/", location)
        url += ("&" if "?" in url else "?") + urlencode({"digest": digest})
        headers: dict[str | bytes, str | bytes] = {"Content-Type": "application/octet-stream"}
        response = await http.client.put(url, data=content, headers=headers)
        await treq.content(response)
        if response.code != 201:
            raise RuntimeError(f"upload of {digest} answered {response.code}")
        return digest
    finally:
        if web is None:
            await http.close()


async def upload_manifest(registry: Registry, repository: str, reference: str, media_type: str,
                          content: bytes) -> str:
    """PUT a manifest under a tag or its digest: its digest."""
    http = WebClient()
    try:
        headers: dict[str | bytes, str | bytes] = {"Content-Type": media_type}
        response = await http.client.put(f"{registry.url}/v2/{repository}/manifests/{reference}",
                                         data=content, headers=headers)
        await treq.content(response)
    finally:
        await http.close()
    if response.code != 201:
        raise RuntimeError(f"PUT manifest {repository}:{reference} answered {response.code}")
    return digest_of(content)


def registry_bytes_sent(registry: Registry, method: str, path_substring: str) -> int:
    """How many body bytes the registry's access log says it sent for matching requests."""
    with open(registry.log_path, encoding="utf-8", errors="replace") as f:
        return sum(int(m[4]) for m in map(_ACCESS_BYTES.search, f)
                   if m and m[1] == method and path_substring in m[2])


# Processes seen from /proc


def _status_bytes(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no {key}")


def rss_bytes(pid: int) -> int:
    """A process's resident set size now."""
    return _status_bytes(pid, "VmRSS")


def peak_rss_bytes(pid: int) -> int:
    """A process's highest resident set size since it started or since `reset_peak_rss`."""
    return _status_bytes(pid, "VmHWM")


def reset_peak_rss(pid: int) -> None:
    """Start measuring a process's peak RSS afresh (Linux clear_refs)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


# A cache on disk, checked from outside


def _file_digest(path: str, algorithm: str) -> str:
    hasher = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            hasher.update(chunk)
    return f"{algorithm}:{hasher.hexdigest()}"


def cache_problems(image_path: str) -> list[str]:
    """Everything wrong with a cache on disk: the sqlite file, tmp/ leftovers, blob files, rows."""
    problems: list[str] = []
    db = sqlite3.connect(f"file:{os.path.join(image_path, 'index.db')}?mode=ro", uri=True)
    try:
        integrity = [row[0] for row in db.execute("PRAGMA integrity_check")]
        if integrity != ["ok"]:
            problems.append(f"integrity_check: {integrity}")
        problems.extend(f"foreign key: {row}" for row in db.execute("PRAGMA foreign_key_check"))
        named = dict(db.execute("SELECT digest, size FROM manifests UNION ALL"
                                " SELECT digest, size FROM blobs").fetchall())
    finally:
        db.close()
    problems.extend(f"left in tmp/: {name}" for name in os.listdir(os.path.join(image_path, "tmp")))
    blobs = os.path.join(image_path, "blobs")
    on_disk: dict[str, int] = {}
    for directory, _, files in os.walk(blobs):
        for name in files:
            path = os.path.join(directory, name)
            algorithm = os.path.basename(os.path.dirname(directory))
            expected = f"{algorithm}:{name}"
            if os.path.relpath(path, blobs) != os.path.join(algorithm, name[:2], name):
                problems.append(f"misplaced file {path}")
            elif _file_digest(path, algorithm) != expected:
                problems.append(f"{path} does not hash to its name")
            on_disk[expected] = os.path.getsize(path)
    for digest, size in named.items():
        if digest not in on_disk:
            problems.append(f"the index names {digest} but no file holds it")
        elif on_disk[digest] != size:
            problems.append(f"{digest} is {on_disk[digest]} bytes on disk, {size} in the index")
    return problems


# Debian's nginx as a reverse proxy in front of an upstream


_NGINX_LINE = re.compile(r'^(\S+) (\S+) (\d{3}) "(.*)"$')


class Nginx:
    """An nginx process of its own (config, pid file, temp paths and logs in ``base_dir``) serving ``locations``.

    ``locations`` maps a location prefix to the ``proxy_pass`` URL it goes to;
    the access log records method, URI, status and User-Agent.
    """

    def __init__(self, base_dir: str, *, address: str, port: int, locations: dict[str, str]) -> None:
        self.base_dir = os.path.abspath(base_dir)
        self.address = address
        self.port = port
        self.host = address if port == 80 else f"{address}:{port}"
        self.url = f"http://{self.host}"
        self.access_log = os.path.join(self.base_dir, "access.log")
        self.log_path = os.path.join(self.base_dir, "error.log")
        self.config_path = os.path.join(self.base_dir, "nginx.conf")
        self._process: subprocess.Popen[bytes] | None = None
        os.makedirs(self.base_dir, exist_ok=True)
        temp = {name: os.path.join(self.base_dir, name) for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
        for path in temp.values():
            os.makedirs(path, exist_ok=True)
        served = "".join(f"        location {prefix} {{ proxy_pass {target}; }}\n"
                         for prefix, target in locations.items())
        with open(self.config_path, "w") as f:
            f.write(
                "daemon off;\n"
                "user root;\n"  # the workers write temp files into the test's directory
                "worker_processes 1;\n"
                f"pid {self.base_dir}/nginx.pid;\n"
                f"error_log {self.log_path} info;\n"
                "events { worker_connections 64; }\n"
                "http {\n"
                "    log_format agents '$request_method $request_uri $status \"$http_user_agent\"';\n"
                f"    access_log {self.access_log} agents;\n"
                + "".join(f"    {name}_temp_path {path};\n" for name, path in temp.items())
                + "    server {\n"
                f"        listen {address}:{port};\n"
                + served
                + "    }\n"
                "}\n"
            )

    async def start(self) -> None:
        """Start nginx and wait until it accepts connections."""
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self._process = start_process([nginx, "-p", self.base_dir, "-e", self.log_path, "-c", self.config_path],
                                      self.log_path, cwd=self.base_dir)

        async def listening() -> bool:
            return await _accepts(self.address, self.port)

        await _until_ready(self._process, self.log_path, "nginx", listening, self.stop)

    async def stop(self) -> None:
        """Stop nginx (SIGTERM is its fast shutdown) and wait for it."""
        if self._process is not None:
            await _terminate(self._process, signal.SIGTERM)

    async def settled(self) -> None:
        """Wait until the access log stops growing."""
        await log_settled(self.access_log)

    def requests(self) -> list[tuple[str, str, int, str]]:
        """Every (method, URI, status, User-Agent) in the access log."""
        try:
            with open(self.access_log, encoding="utf-8", errors="replace") as f:
                lines = [_NGINX_LINE.match(line.rstrip("\n")) for line in f]
        except FileNotFoundError:
            return []
        return [(m[1], m[2], int(m[3]), m[4]) for m in lines if m]


async def start_nginx(base_dir: str, *, test: TestCase, address: str = "127.0.0.1", port: int = 0,
                      locations: dict[str, str]) -> Nginx:
    """Start nginx proxying ``locations`` on ``address:port`` (0: a free port), stopped at test cleanup."""
    nginx = Nginx(base_dir, address=address, port=port or free_port(address), locations=locations)
    test.addCleanup(nginx.stop)
    await nginx.start()
    return nginx
