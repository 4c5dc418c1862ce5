"""The twistd plugin's options and service: ``twistd -n ociregistry ...``."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any, ClassVar, cast

import yaml
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IProtocolFactory, IReactorTime, IStreamServerEndpoint
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import ILogObserver, Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.components import Componentized
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource

from ociregistry import __version__, logs
from ociregistry.admin import DEFAULT_LISTEN, make_admin_service, read_token
from ociregistry.allowlist import Allowlist, HostLookups, host_of
from ociregistry.bucket import BucketStore
from ociregistry.cache import Cache, Freshness
from ociregistry.cluster import LEASE_SECONDS, Cluster
from ociregistry.config import (
    ConfigError,
    FileSettings,
    PruneSettings,
    RegistrySettings,
    S3Settings,
    ServerTLSSettings,
    api_host,
    http_url,
    load_config_file,
    parse_duration,
    parse_size,
)
from ociregistry.content import ContentStore
from ociregistry.credentials import CREDENTIALS_VARIABLE, RUST_CREDENTIALS_VARIABLE, credentials_from_environment
from ociregistry.downloads import Downloads
from ociregistry.errors import OCIError, StorageUnavailable
from ociregistry.grammar import canonical_registry
from ociregistry.index import Index, index_engine, masked_url
from ociregistry.load import host_platform, make_preload_service
from ociregistry.logs import LEVELS
from ociregistry.metrics import Metrics
from ociregistry.prune import make_prune_service, unindexed
from ociregistry.s3 import S3Store
from ociregistry.site import ClientLimits, LimitedSite
from ociregistry.store import BlobStore, CacheUnusable
from ociregistry.threads import WorkerThreads
from ociregistry.tls import ServerTLS
from ociregistry.transport import DEFAULT_MIN_RATE, DEFAULT_MIN_RATE_TEXT, DEFAULT_RATE_WINDOW, parse_rate
from ociregistry.upstream import Upstream
from ociregistry.web import Health, RegistryAPI, Root, plain_http

log = Logger()

_PULL_FLUSH_SECONDS = 10.0
# The reactor's writes wait this long for another process's write lock (a prune's
# transactions are much shorter), then the request gets a 503 instead of a stall.
_INDEX_BUSY_SECONDS = 0.25
_METRICS_REFRESH_SECONDS = 15.0
_DISK_THREADS = 4
# How often /health asks the shared bucket whether it answers.
_BUCKET_CHECK_SECONDS = 5.0
# The longest time between two sweeps of stale multipart uploads.
_SWEEP_SECONDS = 300.0


@dataclass(frozen=True)
class ServerConfig:
    """The effective configuration: command line over config file over defaults."""

    image_path: str
    listen: tuple[str, ...]
    default_ns: str
    registries: tuple[RegistrySettings, ...]
    pull_timeout: float
    max_manifest_size: int
    connect_timeout: float = 30.0
    idle_timeout: float = 60.0
    min_rate: float = DEFAULT_MIN_RATE
    rate_window: float = DEFAULT_RATE_WINDOW
    tag_ttl: float = 300.0
    always_pull_latest: bool = False
    air_gapped: bool = False
    allow_upstreams: tuple[str, ...] = ()
    allow_any_upstream: bool = False
    tls_listen: tuple[str, ...] = ()
    server_tls: ServerTLSSettings | None = None
    health_listen: str | None = None
    metrics_listen: str | None = None
    log_level: str = "info"
    log_file: str | None = None
    log_json: bool = False
    shutdown_grace: float = 10.0
    admin_listen: str = DEFAULT_LISTEN
    admin_token: str | None = None
    preload_images: str | None = None
    os: str | None = None
    arch: str | None = None
    prune: PruneSettings | None = None
    dns_threads: int = 8
    dns_timeout: float = 10.0
    client_header_timeout: float = 30.0
    client_idle_timeout: float = 60.0
    client_max_connections: int = 256
    # The shared index in PostgreSQL (index.postgresql); None: index.db under the image path.
    index_url: str | None = None
    # Manifests and blobs in a bucket shared by replicas (storage.s3); None: files under the image path.
    storage: S3Settings | None = None
    # How the other replicas reach this one (advertiseUrl).
    advertise_url: str | None = None
    # How long a replica's lease of a download lasts unless it renews it.
    lease_seconds: float = LEASE_SECONDS

    def client_limits(self) -> ClientLimits:
        """What each client connection may take."""
        return ClientLimits(self.client_header_timeout, self.client_idle_timeout, self.client_max_connections)

    def masked(self) -> dict[str, Any]:
        """The configuration as plain data, secrets masked, for --print-config."""
        shown = asdict(replace(self, registries=tuple(r.masked() for r in self.registries)))
        shown["registries"] = [asdict(r.masked()) for r in self.registries]
        shown["listen"] = list(self.listen)
        shown["allow_upstreams"] = list(self.allow_upstreams)
        shown["tls_listen"] = list(self.tls_listen)
        shown["admin_token"] = None if self.admin_token is None else "***"
        shown["index_url"] = None if self.index_url is None else masked_url(self.index_url)
        shown["storage"] = None if self.storage is None else asdict(self.storage.masked())
        return shown


class Options(usage.Options):
    """Command-line options of the ociregistry twistd plugin."""

    synopsis = "[options]"
    longdesc = (
        "A pull-only, pull-through, caching OCI Distribution server. "
        "Clients pull through it; what they pull is cached under --image-path "
        "and served from there, even when the upstream is gone. "
        f"Upstream credentials may also come from ${CREDENTIALS_VARIABLE}, a JSON map "
        "of registry to {user, password} or {token}, or "
        f"${RUST_CREDENTIALS_VARIABLE}, the Rust oci-registry's map of registry to {{username, password}}; "
        f"the configuration file wins over ${CREDENTIALS_VARIABLE}, which wins over ${RUST_CREDENTIALS_VARIABLE}."
    )
    optParameters: ClassVar[list[list[Any]]] = [
        ["image-path", None, None, "Where the cache lives [default: /var/lib/ociregistry]."],
        ["port", "p", None, "TCP port to listen on [default: 8080]."],
        ["host", None, None, "Address to listen on [default: all addresses]."],
        ["listen", None, None, "A Twisted server endpoint string, e.g. tcp:8080:interface=127.0.0.1 "
         "(repeatable; --port/--host on the command line add a listener beside these)."],
        ["config-file", "c", None, "YAML configuration file (registries, timeouts, ...)."],
        ["default-ns", None, None, "Upstream for names without a registry [default: docker.io]."],
        ["pull-timeout", None, None, "Seconds to wait for an upstream's answer [default: 60]."],
        ["connect-timeout", None, None, "Seconds to wait for a connection to an upstream [default: 30]."],
        ["idle-timeout", None, None, "Seconds an upstream body may stall before it is abandoned [default: 60]."],
        ["min-rate", None, None, "Slowest upstream body kept, as SIZE/DURATION: a download averaging less "
         f"over a window is abandoned; 0 turns it off [default: {DEFAULT_MIN_RATE_TEXT}]."],
        ["tag-ttl", None, None, "How long a cached tag is served before one upstream HEAD rechecks it: "
         "a duration (300s, 5m), 0 to always check, or 'never' [default: 5m]."],
        ["max-manifest-size", None, None, "Largest manifest accepted from upstream [default: 8MiB]."],
        ["admin-listen", None, None, "Where the admin API (/cmd/...) listens: a Twisted endpoint string, or "
         f"'none' [default: {DEFAULT_LISTEN}]."],
        ["admin-token-file", None, None, "A file whose first line admin API requests must send as "
         "'Authorization: Bearer <token>'."],
        ["preload-images", None, None, "An image list or tarball to load into the cache before listening."],
        ["os", None, None, "Operating system of the images --preload-images takes from indexes [default: linux]."],
        ["arch", None, None, "Architecture of the images --preload-images takes [default: this machine's]."],
        ["tls-cert", None, None, "Serve HTTPS with this certificate (PEM) [serverTlsConfig.cert]."],
        ["tls-key", None, None, "The certificate's private key (PEM) [serverTlsConfig.key]."],
        ["tls-ca", None, None, "CA for client certificates [serverTlsConfig.ca]."],
        ["tls-client-auth", None, None, "none, or verify: require client certificates signed by --tls-ca."],
        ["tls-port", None, None, "Serve HTTPS on this port too, keeping plain HTTP on --port "
         "[default: HTTPS on --port when TLS is configured]."],
        ["health", None, None, "Also serve /health on this port."],
        ["index-url", None, None, "Keep the index in PostgreSQL, shared by replicas: postgresql://user@host:port/db "
         "[index.postgresql; default: index.db under the image path]."],
        ["advertise-url", None, None, "How the other replicas reach this one, http(s)://host:port; with "
         "index.postgresql and storage.s3 the replicas download each blob once between them [advertiseUrl]."],
        ["lease-seconds", None, str(int(LEASE_SECONDS)), "How long a replica's claim to download a blob lasts "
         "unless it renews it: another replica takes over this long after the owner died."],
        ["metrics", None, None, "Serve /metrics on this port instead of the main listener."],
        ["log-level", None, None, "error, warn, info or debug [default: info]."],
        ["log-file", None, None, "Write the log here instead of standard output."],
        ["log-format", None, "text", "text, or json for log shippers."],
        ["shutdown-grace", None, "10", "Seconds to let responses and downloads finish at shutdown."],
        ["dns-threads", None, "8", "Threads looking up upstream host names (getaddrinfo)."],
        ["dns-timeout", None, "10s", "How long a lookup of an upstream host name may take before it is a 504."],
        ["client-header-timeout", None, "30", "Seconds a client has to send a whole request."],
        ["client-idle-timeout", None, "60", "Seconds a client connection may idle, or leave a response unread."],
        ["client-max-connections", None, "256", "Connections one client address may hold open at once."],
    ]
    optFlags: ClassVar[list[list[Any]]] = [
        ["always-pull-latest", None, "Recheck tag 'latest' upstream on every request."],
        ["air-gapped", None, "Never contact an upstream: serve only what is cached."],
        ["allow-any-upstream", None, "Let clients name any upstream host, even private or loopback addresses."],
        ["print-config", None, "Print the effective configuration (secrets masked) and exit."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """A Twisted server endpoint string (repeatable)."""
        self["listen"].append(description)

    def opt_version(self) -> None:
        """Show the version and exit."""
        print(f"ociregistry {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        """Merge the config file and validate everything, naming what is wrong."""
        settings = FileSettings()
        try:
            if self["config-file"]:
                settings = load_config_file(self["config-file"])
            settings = replace(settings, registries=credentials_from_environment(settings.registries, os.environ))
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        self.config = build_config(self, settings)
        if self["print-config"]:
            print(yaml.safe_dump(self.config.masked(), sort_keys=False), end="")
            raise SystemExit(0)


def _choose(given: str | None, from_file: Any, default: Any) -> Any:
    if given is not None:
        return given
    return from_file if from_file is not None else default


def _advertise_url(given: str | None, from_file: str | None) -> str | None:
    """The advertised URL, the command line's first, checked as the advertiseUrl key is."""
    if given is None:
        return from_file
    try:
        return http_url(given)
    except ValueError as e:
        raise usage.UsageError(f"--advertise-url: {e}") from None


def _seconds(option: str, value: Any, allow_never: bool = False) -> float:
    """A number of seconds from an option or file value: a number or a duration."""
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif allow_never and str(value).lower() == "never":
        return math.inf
    else:
        try:
            seconds = parse_duration(str(value))
        except ValueError as e:
            raise usage.UsageError(f"--{option}: {e}") from None
    if seconds < 0 or (seconds == 0 and not allow_never):
        raise usage.UsageError(f"--{option}: must be a positive duration: {value!r}")
    return seconds


def _count(option: str, value: Any) -> int:
    """A positive whole number from an option."""
    try:
        number = int(value)
        if number < 1:
            raise ValueError
    except ValueError:
        raise usage.UsageError(f"--{option}: must be a positive whole number: {value!r}") from None
    return number


def _tcp(option: str, port: Any, host: str) -> str:
    """A TCP endpoint description for a port option, on the listen address."""
    try:
        number = int(port)
        if not 0 <= number < 65536:
            raise ValueError
    except ValueError:
        raise usage.UsageError(f"{option}: not a TCP port number: {port!r}") from None
    return f"tcp:{number}" + (f":interface={host}" if host else "")


def _server_tls(options: usage.Options, settings: FileSettings) -> ServerTLSSettings | None:
    """TLS towards clients, from the options over serverTlsConfig."""
    file = settings.server_tls
    cert = _choose(options["tls-cert"], file and file.cert, None)
    key = _choose(options["tls-key"], file and file.key, None)
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise usage.UsageError("--tls-cert and --tls-key: give both")
    ca = _choose(options["tls-ca"], file and file.ca, None)
    client_auth = _choose(options["tls-client-auth"], file and file.client_auth, "none")
    if client_auth not in ("none", "verify"):
        raise usage.UsageError(f"--tls-client-auth: none or verify, not {client_auth!r}")
    if client_auth == "verify" and not ca:
        raise usage.UsageError("--tls-client-auth verify: needs --tls-ca")
    for option, path in [("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)]:
        if path and not os.path.isfile(path):
            raise usage.UsageError(f"{option}: file not found: {path}")
    settings_tls = ServerTLSSettings(os.path.abspath(cert), os.path.abspath(key),
                                     os.path.abspath(ca) if ca else None, client_auth)
    try:
        ServerTLS(settings_tls)
    except Exception as e:
        raise usage.UsageError(f"--tls-cert/--tls-key: cannot be used: {e}") from None
    return settings_tls


def build_config(options: usage.Options, settings: FileSettings) -> ServerConfig:
    """Combine options and file settings into the server's configuration."""
    image_path = _choose(options["image-path"], settings.image_path, "/var/lib/ociregistry")
    host = _choose(options["host"], settings.host, "")
    # As in twistd's web plugin, --port adds to --listen; only the config file's port gives way to --listen.
    on_port: tuple[str, ...] = ()
    if not options["listen"] or options["port"] is not None or options["host"] is not None:
        on_port = (_tcp("--port", _choose(options["port"], settings.port, 8080), host),)
    listen = tuple(options["listen"])
    from twisted.internet import reactor

    for description in listen:
        try:
            serverFromString(reactor, description)
        except (ValueError, TypeError, KeyError) as e:
            raise usage.UsageError(f"--listen: invalid endpoint {description!r}: {e}") from None
    default_ns = _choose(options["default-ns"], settings.default_ns, "docker.io")
    try:
        default_ns = canonical_registry(default_ns)
    except OCIError:
        raise usage.UsageError(f"--default-ns: not a registry host: {default_ns!r}") from None
    try:
        max_manifest_size = parse_size(options["max-manifest-size"] or "8MiB")
    except ValueError as e:
        raise usage.UsageError(f"--max-manifest-size: {e}") from None
    if max_manifest_size < 4 * 1024 * 1024:
        raise usage.UsageError("--max-manifest-size: must be at least 4MiB")
    try:
        min_rate, rate_window = parse_rate(options["min-rate"] or DEFAULT_MIN_RATE_TEXT)
    except ValueError as e:
        raise usage.UsageError(f"--min-rate: {e}") from None
    admin_listen = options["admin-listen"] or DEFAULT_LISTEN
    if admin_listen != "none":
        try:
            serverFromString(reactor, admin_listen)
        except (ValueError, TypeError, KeyError) as e:
            raise usage.UsageError(f"--admin-listen: invalid endpoint {admin_listen!r}: {e}") from None
    admin_token = None
    if options["admin-token-file"]:
        try:
            admin_token = read_token(options["admin-token-file"])
        except (OSError, ValueError) as e:
            raise usage.UsageError(f"--admin-token-file: {e}") from None
    server_tls = _server_tls(options, settings)
    tls_port = options["tls-port"]
    tls_listen: tuple[str, ...] = ()
    if tls_port is not None and server_tls is None:
        raise usage.UsageError("--tls-port: needs --tls-cert and --tls-key (or serverTlsConfig)")
    if server_tls is not None and tls_port is None:
        tls_listen = on_port  # HTTPS on --port
    else:
        listen += on_port
        if tls_port is not None:
            tls_listen = (_tcp("--tls-port", tls_port, host),)
    health = _choose(options["health"], settings.health, None)
    metrics = _choose(options["metrics"], settings.metrics, None)
    log_level = _choose(options["log-level"], settings.log_level, "info")
    if log_level not in LEVELS:
        raise usage.UsageError(f"--log-level: one of {', '.join(LEVELS)}, not {log_level!r}")
    if options["log-format"] not in ("text", "json"):
        raise usage.UsageError(f"--log-format: text or json, not {options['log-format']!r}")
    index_url = _choose(options["index-url"], settings.index_url, None)
    if settings.storage is not None and index_url is None:
        raise usage.UsageError("storage.s3 needs the shared index (index.postgresql or --index-url): "
                               "the embedded sqlite index cannot be shared by replicas")
    return ServerConfig(
        image_path=os.path.abspath(image_path),
        index_url=index_url,
        storage=settings.storage,
        advertise_url=_advertise_url(options["advertise-url"], settings.advertise_url),
        lease_seconds=_seconds("lease-seconds", options["lease-seconds"]),
        tls_listen=tls_listen,
        server_tls=server_tls,
        health_listen=None if health is None else _tcp("--health", health, host),
        metrics_listen=None if metrics is None else _tcp("--metrics", metrics, host),
        log_level=log_level,
        log_file=_choose(options["log-file"], settings.log_file, None),
        log_json=options["log-format"] == "json",
        shutdown_grace=_seconds("shutdown-grace", options["shutdown-grace"]),
        dns_threads=_count("dns-threads", options["dns-threads"]),
        dns_timeout=_seconds("dns-timeout", options["dns-timeout"]),
        listen=listen,
        default_ns=default_ns,
        registries=tuple(settings.registries),
        pull_timeout=_seconds("pull-timeout", _choose(options["pull-timeout"], settings.pull_timeout, 60.0)),
        connect_timeout=_seconds("connect-timeout", options["connect-timeout"] or 30.0),
        idle_timeout=_seconds("idle-timeout", options["idle-timeout"] or 60.0),
        min_rate=min_rate,
        rate_window=rate_window,
        tag_ttl=_seconds("tag-ttl", _choose(options["tag-ttl"], settings.manifest_ttl, 300.0), allow_never=True),
        max_manifest_size=max_manifest_size,
        always_pull_latest=bool(options["always-pull-latest"] or settings.always_pull_latest),
        air_gapped=bool(options["air-gapped"] or settings.air_gapped),
        allow_upstreams=tuple(settings.allow_upstreams or ()),
        allow_any_upstream=bool(options["allow-any-upstream"]),
        admin_listen=admin_listen,
        admin_token=admin_token,
        preload_images=_choose(options["preload-images"], settings.preload_images, None),
        os=_choose(options["os"], settings.os, None),
        arch=_choose(options["arch"], settings.arch, None),
        prune=settings.prune,
        client_header_timeout=_seconds("client-header-timeout", options["client-header-timeout"]),
        client_idle_timeout=_seconds("client-idle-timeout", options["client-idle-timeout"]),
        client_max_connections=_count("client-max-connections", options["client-max-connections"]),
    )


class CacheService(Service):
    """Logs the start-up banner; at shutdown lets work finish for a grace period, then closes the cache."""

    def __init__(self, cache: Cache, api: RegistryAPI, config: ServerConfig, reactor: Any) -> None:
        self._cache = cache
        self._api = api
        self._config = config
        self._reactor = reactor

    def startService(self) -> None:
        super().startService()
        log_banner(self._config, self._cache)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        deadline = self._reactor.seconds() + self._config.shutdown_grace
        while (self._api.active or self._cache.downloading()) and self._reactor.seconds() < deadline:
            await deferLater(self._reactor, 0.1, lambda: None)
        if self._api.active or self._cache.downloading():
            log.warn("Shutting down with {responses} responses and {downloads} downloads unfinished",
                     responses=self._api.active, downloads=self._cache.downloading())
        await self._cache.close()


class OCIRegistryService(MultiService):
    """The whole server; under twistd it also chooses the log observer.

    While it runs, SIGHUP re-reads the HTTPS certificates (if any) and reopens the
    log file, and SIGUSR1 reopens the log file only; neither ends the server.
    """

    def __init__(self, config: ServerConfig, reactor: Any, tls: ServerTLS | None = None) -> None:
        super().__init__()
        self._config = config
        self._reactor = reactor
        self._tls = tls
        self._log_file: logs.LogFile | None = None
        self._previous_handlers: dict[int, Any] = {}

    def setServiceParent(self, parent: Any) -> None:
        # twistd logs through an application's ILogObserver component, if it has one.
        if isinstance(parent, Componentized):
            config = self._config
            self._log_file = logs.LogFile(config.log_file) if config.log_file else None
            parent.setComponent(ILogObserver, logs.observer(config.log_level, self._log_file, config.log_json))
        super().setServiceParent(parent)

    def startService(self) -> None:
        super().startService()
        for number in (signal.SIGHUP, signal.SIGUSR1):
            self._previous_handlers[number] = signal.signal(number, self._on_signal)

    def stopService(self) -> Deferred[None]:
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        self._previous_handlers.clear()
        return cast("Deferred[None]", super().stopService())

    def _on_signal(self, number: int, frame: Any) -> None:
        # A signal handler may interrupt the reactor anywhere; the work waits for the reactor's next turn.
        self._reactor.callFromThread(self.reload if number == signal.SIGHUP else self.reopen_log)

    def reload(self) -> None:
        """Re-read the HTTPS certificates, and reopen the log file."""
        log.info("Reloading on SIGHUP")
        if self._tls is not None:
            self._tls.reload()
        self.reopen_log()

    def reopen_log(self) -> None:
        """Reopen the log file (logrotate moved it); nothing to do when logging to standard output."""
        if self._log_file is not None:
            self._log_file.reopen()


def log_banner(config: ServerConfig, cache: Cache) -> None:
    """What users of the Go server look for at start: who, where, what, how."""
    manifests, blobs, size = cache.totals()
    tls = "none"
    if config.server_tls is not None:
        tls = "verify client certificates" if config.server_tls.client_auth == "verify" else "server certificate"
    log.info(
        "ociregistry {version}: pull-only, pull-through, caching OCI Distribution server\n"
        "  started {started} as uid:gid {uid}:{gid}, pid {pid}\n"
        "  listening on {listen}; TLS: {tls}\n"
        "  image path {image_path}: {manifests} manifests, {blobs} blobs, {size} bytes\n"
        "  content: {content}\n"
        "  command line: {command}",
        version=__version__, started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), uid=os.getuid(), gid=os.getgid(),
        pid=os.getpid(), listen=", ".join([*config.listen, *(f"{d} (TLS)" for d in config.tls_listen)]),
        tls=tls, image_path=config.image_path, manifests=manifests, blobs=blobs, size=size,
        content=_content(config), command=" ".join(sys.argv),
    )


def _content(config: ServerConfig) -> str:
    """Where manifests and blobs live, for the banner."""
    storage = config.storage
    if storage is None:
        return "files under the image path"
    shared = f"bucket {storage.s3.bucket} at {storage.s3.endpoint}"
    if storage.s3.prefix:
        shared += f", keys under {storage.s3.prefix}"
    if storage.redirect:
        shared += ", blob GETs redirected there"
    return shared + f"; this replica is {config.advertise_url or 'not advertised'}"


def open_cache(config: ServerConfig, reactor: Any, metrics: Metrics) -> tuple[Cache, Index, int]:
    """Open (or create) the cache under the image path: (cache, index, swept temporaries).

    Raises CacheUnusable, saying why in one line, when it cannot be used.
    """
    try:
        os.makedirs(config.image_path, exist_ok=True)
    except OSError as e:
        raise CacheUnusable(f"cannot create the image path {config.image_path}: {e.strerror}") from None
    # Blocking work gets threads of its own, not the reactor's (/metrics renders there):
    # name lookups chosen by clients must never delay a commit's fsync, nor the reverse.
    disk = WorkerThreads(reactor, "disk", _DISK_THREADS)
    names = WorkerThreads(reactor, "dns", config.dns_threads)
    store = content_store(config, BlobStore(config.image_path, disk.run), reactor)
    swept = store.prepare()
    index_path = os.path.join(config.image_path, "index.db")
    new_index = config.index_url is None and not os.path.exists(index_path)
    index = Index(index_engine(config.index_url, index_path, reactor, busy_timeout=_INDEX_BUSY_SECONDS))
    if new_index and isinstance(store, BlobStore):
        _warn_unindexed(index, store, index_path)
    registries = [host_of(host) for host in [api_host(config.default_ns), *(r.api_host for r in config.registries)]]
    lookups = HostLookups(reactor, names.run, threads=names.size, preferred=registries,
                          timeout=config.dns_timeout)
    # Lookups still queued fail as shutdown begins, so their responses need not use up the grace.
    reactor.addSystemEventTrigger("before", "shutdown", lookups.close)
    allowlist = Allowlist(
        reactor, lookups.addresses, [r.name for r in config.registries],
        config.allow_upstreams, config.allow_any_upstream,
    )
    upstream = Upstream(
        reactor,
        config.registries,
        allowlist,
        connect_timeout=config.connect_timeout,
        response_timeout=config.pull_timeout,
        idle_timeout=config.idle_timeout,
        min_rate=config.min_rate,
        rate_window=config.rate_window,
        max_manifest_size=config.max_manifest_size,
        metrics=metrics,
        name_resolver=lookups,
    )
    freshness = Freshness(config.tag_ttl, config.always_pull_latest, config.air_gapped)
    cluster = None
    peers = None
    if isinstance(store, BucketStore) and config.advertise_url is not None:
        # Shared index and bucket, and a URL the others reach this one at: one download per blob between them.
        cluster = Cluster(index, config.advertise_url, reactor, config.lease_seconds, store)
        peers = Agent(reactor, connectTimeout=config.connect_timeout, pool=HTTPConnectionPool(reactor))
    downloads = Downloads(store, index, upstream, metrics, cluster=cluster, peers=peers)
    metrics.track_downloads(lambda: len(downloads))
    cache = Cache(index, store, upstream, downloads, reactor, freshness)
    return cache, index, swept


def content_store(config: ServerConfig, files: BlobStore, reactor: Any) -> ContentStore:
    """The files under the image path, or the shared bucket (checked now) with its spool there."""
    if config.storage is None:
        return files
    settings = config.storage
    s3 = S3Store(settings.s3, reactor=reactor)
    try:
        log.info("{bucket}", bucket=s3.check_bucket_now())
    except StorageUnavailable as e:
        raise CacheUnusable(e.message) from None
    return BucketStore(s3, files, settings.redirect, settings.abandon_uploads_after)


def _warn_unindexed(index: Index, store: BlobStore, index_path: str) -> None:
    """A new index over files left by an old one (index.db deleted): say how to recover the space."""
    orphans = len(index.run_blocking(unindexed, store, settle=0.0))
    if orphans:
        log.warn("The index {index_path} is new, but {orphans} files under blobs/ are named by no row "
                 "(was index.db deleted?). They are never served; 'ociregistry check --repair --image-path "
                 "{image_path}' removes them, and pulls fetch the images again",
                 index_path=index_path, orphans=orphans, image_path=store.root)


def make_site(cache: Cache, config: ServerConfig, metrics: Metrics) -> tuple[LimitedSite, RegistryAPI]:
    """The web site serving the pull API (and /health, and /metrics unless it has its own port)."""
    api = RegistryAPI(cache, config.default_ns, metrics)
    children: dict[bytes, Resource] = {b"v2": api, b"health": Health(cache.health)}
    if config.metrics_listen is None:
        children[b"metrics"] = metrics.resource()
    return LimitedSite(Root(children), config.client_limits(), logFormatter=logs.access_line), api


def makeService(options: Options) -> IService:
    """Open the cache, and listen where the options say."""
    from twisted.internet import reactor as installed

    # The installed reactor provides every reactor interface the services use.
    reactor: Any = installed

    config: ServerConfig = options.config
    metrics = Metrics([config.default_ns, *(r.name for r in config.registries)])
    try:
        cache, index, swept = open_cache(config, reactor, metrics)
    except CacheUnusable as e:
        raise SystemExit(f"ociregistry: {e}") from None
    _hand_over(config.image_path, options.parent)
    site, api = make_site(cache, config, metrics)
    tls = None if config.server_tls is None else ServerTLS(config.server_tls)
    service = OCIRegistryService(config, reactor, tls)
    CacheService(cache, api, config, reactor).setServiceParent(service)
    TimerService(_PULL_FLUSH_SECONDS, _flush_pulls, index).setServiceParent(service)
    TimerService(_METRICS_REFRESH_SECONDS, _refresh_metrics, metrics, index).setServiceParent(service)
    listeners: MultiService = service
    preload = None
    if config.preload_images:
        preload = make_preload_service(cache, index, [config.preload_images],
                                       host_platform(config.os, config.arch), config.default_ns, reactor)
        preload.setServiceParent(service)
        listeners = preload

    def endpoint(description: str) -> IStreamServerEndpoint:
        # With a preload, the port is bound before twistd drops privileges, and accepts once it is done.
        found = serverFromString(reactor, description)
        return found if preload is None else preload.hold(found)

    for description in config.listen:
        factory: IProtocolFactory = site if description.startswith("ssl:") else plain_http(site)
        StreamServerEndpointService(endpoint(description), factory).setServiceParent(listeners)
    if config.admin_listen != "none":
        make_admin_service(index, config.image_path, config.admin_listen, reactor, reactor.stop,
                           config.admin_token, config.client_limits(), cache.bucket).setServiceParent(service)
    if config.prune is not None and config.prune.enabled:
        make_prune_service(config.prune, index, config.image_path, reactor,
                           partial(deferToThreadPool, reactor, reactor.getThreadPool()),
                           cache.bucket).setServiceParent(service)
    if tls is not None:
        for description in config.tls_listen:
            factory = TLSMemoryBIOFactory(tls, False, site)
            StreamServerEndpointService(endpoint(description), factory).setServiceParent(listeners)
    for own_listen, name, resource in [(config.health_listen, b"health", Health(cache.health)),
                                       (config.metrics_listen, b"metrics", metrics.resource())]:
        if own_listen is not None:
            own = plain_http(LimitedSite(Root({name: resource}), config.client_limits()))
            StreamServerEndpointService(serverFromString(reactor, own_listen), own).setServiceParent(service)
    store = cache.store
    if isinstance(store, BucketStore):
        BucketService(store, reactor, cache.cluster).setServiceParent(service)
    cluster = cache.cluster
    if cluster is not None:
        cluster.start_blocking()
        # Renews the leases while downloads run; at shutdown releases them, so others take over at once.
        cluster.service().setServiceParent(service)
    if swept:
        log.info("Removed {swept} unfinished downloads left by the last run", swept=swept)
    return service


class BucketService(TimerService):
    """Checks the bucket for /health; retries failed aborts, and sweeps the uploads crashed replicas left, at
    start and then every so often (at most every ``_SWEEP_SECONDS``, and as often as uploads grow stale)."""

    def __init__(self, store: BucketStore, clock: IReactorTime, cluster: Cluster | None = None) -> None:
        super().__init__(_BUCKET_CHECK_SECONDS, self._check)
        self.clock = self._clock = clock
        self._store = store
        # Whose leases name the uploads that downloads in progress on other replicas write to.
        self._cluster = cluster
        self._next_sweep: float | None = None

    def _check(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._run())

    async def _run(self) -> None:
        now = self._clock.seconds()
        stale = self._next_sweep is None or now >= self._next_sweep
        keep: set[str] = set()
        if stale and self._cluster is not None:
            try:
                keep = await self._cluster.leased_uploads()
            except CancelledError:
                raise
            except Exception as e:
                # Without the leases, another replica's upload in progress cannot be told from a stale one.
                log.warn("Not sweeping stale uploads: the download leases could not be read ({why})",
                         why=str(e) or type(e).__name__)
                stale = False
        if stale:
            self._next_sweep = now + min(self._store.abandon_uploads_after, _SWEEP_SECONDS)
        await self._store.sweep(stale, keep)
        await self._store.check()


def _hand_over(image_path: str, twistd_options: usage.Options | None) -> None:
    """Give what start-up created under the image path to the user twistd is about to switch to (--uid/--gid)."""
    if twistd_options is None or os.getuid() != 0:
        return
    uid, gid = twistd_options.get("uid"), twistd_options.get("gid")
    if uid is None and gid is None:
        return
    uid, gid = -1 if uid is None else uid, -1 if gid is None else gid
    for path in [image_path, *(os.path.join(image_path, name) for name in os.listdir(image_path))]:
        os.chown(path, uid, gid, follow_symlinks=False)


def _flush_pulls(index: Index) -> Deferred[object]:
    return index.flush_pulls().addErrback(lambda failure: log.failure("Could not record pull times", failure))


def _refresh_metrics(metrics: Metrics, index: Index) -> Deferred[object]:
    return Deferred.fromCoroutine(metrics.refresh(index)).addErrback(
        lambda failure: log.failure("Could not refresh the cache size metrics", failure))
