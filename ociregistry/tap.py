"""The twistd plugin's options and service: ``twistd -n ociregistry ...``."""

from __future__ import annotations

import os
import math
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any

import yaml

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.server import Site

from ociregistry import __version__
from ociregistry.allowlist import Allowlist, resolver
from ociregistry.cache import Cache, Freshness
from ociregistry.config import ConfigError, FileSettings, RegistrySettings, load_config_file, parse_duration, parse_size
from ociregistry.credentials import CREDENTIALS_VARIABLE, credentials_from_environment
from ociregistry.downloads import Downloads
from ociregistry.errors import OCIError
from ociregistry.grammar import canonical_registry
from ociregistry.index import Index
from ociregistry.store import BlobStore
from ociregistry.upstream import Upstream
from ociregistry.web import RegistryAPI, Root, plain_http

log = Logger()

_PULL_FLUSH_SECONDS = 10.0


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
    tag_ttl: float = 300.0
    always_pull_latest: bool = False
    air_gapped: bool = False
    allow_upstreams: tuple[str, ...] = ()
    allow_any_upstream: bool = False

    def masked(self) -> dict[str, Any]:
        """The configuration as plain data, secrets masked, for --print-config."""
        shown = asdict(replace(self, registries=tuple(r.masked() for r in self.registries)))
        shown["registries"] = [asdict(r.masked()) for r in self.registries]
        shown["listen"] = list(self.listen)
        shown["allow_upstreams"] = list(self.allow_upstreams)
        return shown


class Options(usage.Options):
    """Command-line options of the ociregistry twistd plugin."""

    synopsis = "[options]"
    longdesc = (
        "A pull-only, pull-through, caching OCI Distribution server. "
        "Clients pull through it; what they pull is cached under --image-path "
        "and served from there, even when the upstream is gone. "
        f"Upstream credentials may also come from ${CREDENTIALS_VARIABLE}, a JSON map "
        "of registry to {user, password} or {token}."
    )
    optParameters: list[list[Any]] = [
        ["image-path", None, None, "Where the cache lives [default: /var/lib/ociregistry]."],
        ["port", "p", None, "TCP port to listen on [default: 8080]."],
        ["host", None, None, "Address to listen on [default: all addresses]."],
        ["listen", None, None, "A Twisted server endpoint string, e.g. tcp:8080:interface=127.0.0.1 "
         "(repeatable; replaces --port/--host)."],
        ["config-file", "c", None, "YAML configuration file (registries, timeouts, ...)."],
        ["default-ns", None, None, "Upstream for names without a registry [default: docker.io]."],
        ["pull-timeout", None, None, "Seconds to wait for an upstream's answer [default: 60]."],
        ["connect-timeout", None, None, "Seconds to wait for a connection to an upstream [default: 30]."],
        ["idle-timeout", None, None, "Seconds an upstream body may stall before it is abandoned [default: 60]."],
        ["tag-ttl", None, None, "How long a cached tag is served before one upstream HEAD rechecks it: "
         "a duration (300s, 5m), 0 to always check, or 'never' [default: 5m]."],
        ["max-manifest-size", None, None, "Largest manifest accepted from upstream [default: 8MiB]."],
    ]
    optFlags: list[list[Any]] = [
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
            raise usage.UsageError(str(e))
        self.config = build_config(self, settings)
        if self["print-config"]:
            print(yaml.safe_dump(self.config.masked(), sort_keys=False), end="")
            raise SystemExit(0)


def _choose(given: str | None, from_file: Any, default: Any) -> Any:
    if given is not None:
        return given
    return from_file if from_file is not None else default


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
            raise usage.UsageError(f"--{option}: {e}")
    if seconds < 0 or (seconds == 0 and not allow_never):
        raise usage.UsageError(f"--{option}: must be a positive duration: {value!r}")
    return seconds


def build_config(options: usage.Options, settings: FileSettings) -> ServerConfig:
    """Combine options and file settings into the server's configuration."""
    image_path = _choose(options["image-path"], settings.image_path, "/var/lib/ociregistry")
    port = _choose(options["port"], settings.port, 8080)
    try:
        port = int(port)
        if not 0 <= port < 65536:
            raise ValueError
    except ValueError:
        raise usage.UsageError(f"--port: not a TCP port number: {port!r}")
    host = _choose(options["host"], settings.host, "")
    listen = tuple(options["listen"])
    if not listen:
        listen = (f"tcp:{port}" + (f":interface={host}" if host else ""),)
    from twisted.internet import reactor

    for description in listen:
        try:
            serverFromString(reactor, description)
        except (ValueError, TypeError, KeyError) as e:
            raise usage.UsageError(f"--listen: invalid endpoint {description!r}: {e}")
    default_ns = _choose(options["default-ns"], settings.default_ns, "docker.io")
    try:
        default_ns = canonical_registry(default_ns)
    except OCIError:
        raise usage.UsageError(f"--default-ns: not a registry host: {default_ns!r}")
    try:
        max_manifest_size = parse_size(options["max-manifest-size"] or "8MiB")
    except ValueError as e:
        raise usage.UsageError(f"--max-manifest-size: {e}")
    if max_manifest_size < 4 * 1024 * 1024:
        raise usage.UsageError("--max-manifest-size: must be at least 4MiB")
    return ServerConfig(
        image_path=os.path.abspath(image_path),
        listen=listen,
        default_ns=default_ns,
        registries=tuple(settings.registries),
        pull_timeout=_seconds("pull-timeout", _choose(options["pull-timeout"], settings.pull_timeout, 60.0)),
        connect_timeout=_seconds("connect-timeout", options["connect-timeout"] or 30.0),
        idle_timeout=_seconds("idle-timeout", options["idle-timeout"] or 60.0),
        tag_ttl=_seconds("tag-ttl", _choose(options["tag-ttl"], settings.manifest_ttl, 300.0), allow_never=True),
        max_manifest_size=max_manifest_size,
        always_pull_latest=bool(options["always-pull-latest"] or settings.always_pull_latest),
        air_gapped=bool(options["air-gapped"] or settings.air_gapped),
        allow_upstreams=tuple(settings.allow_upstreams or ()),
        allow_any_upstream=bool(options["allow-any-upstream"]),
    )


class CacheService(Service):
    """Closes the cache (index and upstream connections) at shutdown."""

    def __init__(self, cache: Cache) -> None:
        self._cache = cache

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._cache.close())


def open_cache(config: ServerConfig, reactor: Any) -> tuple[Cache, Index, int]:
    """Open (or create) the cache under the image path: (cache, index, swept temporaries)."""
    os.makedirs(config.image_path, exist_ok=True)
    to_thread = partial(deferToThreadPool, reactor, reactor.getThreadPool())
    store = BlobStore(config.image_path, to_thread)
    swept = store.prepare()
    index = Index(os.path.join(config.image_path, "index.db"), reactor)
    allowlist = Allowlist(
        reactor, resolver(to_thread), [r.name for r in config.registries],
        config.allow_upstreams, config.allow_any_upstream,
    )
    upstream = Upstream(
        reactor,
        config.registries,
        allowlist,
        connect_timeout=config.connect_timeout,
        response_timeout=config.pull_timeout,
        idle_timeout=config.idle_timeout,
        max_manifest_size=config.max_manifest_size,
    )
    freshness = Freshness(config.tag_ttl, config.always_pull_latest, config.air_gapped)
    cache = Cache(index, store, upstream, Downloads(store, index, upstream), reactor, freshness)
    return cache, index, swept


def make_site(cache: Cache, config: ServerConfig) -> Site:
    """The web site serving the pull API from a cache."""
    site = Site(Root(RegistryAPI(cache, config.default_ns)))
    site.displayTracebacks = False
    return site


def makeService(options: Options) -> IService:
    """Open the cache, and listen where the options say."""
    from twisted.internet import reactor

    config: ServerConfig = options.config
    cache, index, swept = open_cache(config, reactor)
    site = make_site(cache, config)
    service = MultiService()
    CacheService(cache).setServiceParent(service)
    TimerService(_PULL_FLUSH_SECONDS, _flush_pulls, index).setServiceParent(service)
    for description in config.listen:
        factory = site if description.startswith("ssl:") else plain_http(site)
        StreamServerEndpointService(serverFromString(reactor, description), factory).setServiceParent(service)
    log.info(
        "ociregistry {version} serving {image_path} on {listen} (default upstream {default_ns}; "
        "{swept} unfinished downloads swept)",
        version=__version__, image_path=config.image_path, listen=", ".join(config.listen),
        default_ns=config.default_ns, swept=swept,
    )
    return service


def _flush_pulls(index: Index) -> None:
    try:
        index.flush_pulls()
    except Exception:
        log.failure("Could not record pull times")
