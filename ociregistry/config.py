"""The YAML configuration file, in the format the Go ociregistry server's users already have."""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from decimal import Decimal
from typing import NamedTuple, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ociregistry import __version__
from ociregistry.errors import OCIError
from ociregistry.grammar import DOCKER_HUB, canonical_registry, check_registry, check_repository

_T = TypeVar("_T")

_MASK = "***"
_NULL_TAG = "tag:yaml.org,2002:null"
_MERGE_TAG = "tag:yaml.org,2002:merge"

_TOP_KEYS = (
    "imagePath", "logLevel", "logFile", "port", "host", "os", "arch", "pullTimeout", "health",
    "metrics", "alwaysPullLatest", "airGapped", "defaultNs", "preloadImages", "registries",
    "pruneConfig", "serverTlsConfig", "allowUpstreams", "manifestInvalidation", "index", "storage",
    "advertiseUrl",
    # Written by the Go server's documented examples; accepted so those files load unchanged.
    "imageFile", "helloWorld", "listConfig", "configFile",
)
_REGISTRY_KEYS = (
    "name", "description", "scheme", "upstream", "userAgent", "auth", "tls", "manifestInvalidation",
    # The Rust oci-registry's spelling of settings that ours keep elsewhere.
    "username", "password", "acceptInvalidCerts", "blobInvalidationTime",
)
# The Rust oci-registry's names for our registry keys.
_REGISTRY_ALIASES = {"namespace": "name", "host": "upstream", "manifestInvalidationTime": "manifestInvalidation"}
_AUTH_KEYS = ("user", "password", "passwordFromEnv", "token", "credentialHelper")
_TLS_KEYS = ("ca", "cert", "key", "insecureSkipVerify")
_PRUNE_KEYS = ("enabled", "type", "duration", "frequency", "count", "expr", "maxSize", "dryRun")
_SERVER_TLS_KEYS = ("cert", "key", "ca", "clientAuth")
_INDEX_KEYS = ("postgresql",)
_STORAGE_KEYS = ("s3",)
_S3_KEYS = ("endpoint", "bucket", "region", "accessKey", "secretKey", "secretKeyFromEnv", "prefix", "redirect",
            "abandonUploadsAfter", "timeout")
# How long the store may take to answer a request, all its retries included, before clients get a 503.
S3_TIMEOUT = 10.0
# A bucket name as S3 (and Ceph RGW) accepts it.
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_HTTP_URL = re.compile(r"https?://[^/\s?#]+/?")

_LOG_LEVELS = ("error", "warn", "info", "debug")
_PRUNE_TYPES = ("accessed", "created", "pattern", "size")
# The key each prune type cannot do without, and the field it fills.
_PRUNE_NEEDS = {
    "accessed": ("duration", "duration"), "created": ("duration", "duration"),
    "pattern": ("expr", "expr"), "size": ("maxSize", "max_size"),
}

USER_AGENT = f"ociregistry/{__version__}"
_USER_AGENT = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")

_TRUE = frozenset({"true", "yes", "on"})
_FALSE = frozenset({"false", "no", "off"})
_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_PLAIN_NUMBER = re.compile(_NUMBER)
# Go's time.ParseDuration units, plus days as the Go server's prune settings use them.
_DURATION_UNITS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
    "d": 86400.0,
}
_DURATION_PART = re.compile(rf"({_NUMBER})(ns|us|µs|μs|ms|s|m|h|d)")
_DURATION = re.compile(rf"(?:{_NUMBER}(?:ns|us|µs|μs|ms|s|m|h|d))+")
_SIZE = re.compile(rf"({_NUMBER})\s*([a-z]*)")
# GNU coreutils convention: K/Ki/KiB are powers of 1024, KB is a power of 1000.
_SIZE_UNITS: dict[str, int] = {"": 1, "b": 1}
for _power, _letter in enumerate("kmgtpe", start=1):
    _SIZE_UNITS[_letter] = _SIZE_UNITS[_letter + "i"] = _SIZE_UNITS[_letter + "ib"] = 1024**_power
    _SIZE_UNITS[_letter + "b"] = 1000**_power


class ConfigError(Exception):
    """A problem in a configuration file; the message names the file and the key path."""

    def __init__(self, file: str, key: str, problem: str, line: int | None = None,
                 column: int | None = None) -> None:
        where = f"{file}: {key}: " if key else f"{file}: "
        at = ""
        if line is not None:
            at = f" (line {line}, column {column})" if column is not None else f" (line {line})"
        super().__init__(f"{where}{problem}{at}")
        self.filename = file
        self.key = key
        self.problem = problem
        self.line = line


def parse_duration(text: str) -> float:
    """Seconds in ``30d``, ``12h``, ``15m``, ``10s``, ``500ms``, ``1h30m``, or a plain number of seconds."""
    value = text.strip().lower()
    if _PLAIN_NUMBER.fullmatch(value):
        return float(value)
    if not _DURATION.fullmatch(value):
        raise ValueError(
            f"invalid duration {text!r}: expected a number of seconds or amounts with units "
            "(d, h, m, s, ms, us, ns) such as 30d, 12h, 1h30m or 500ms"
        )
    return sum(float(amount) * _DURATION_UNITS[unit] for amount, unit in _DURATION_PART.findall(value))


def parse_size(text: str) -> int:
    """Bytes in ``1024``, ``4M``, ``500MiB``, ``1GB``, ``50GiB`` (K, M, G count in 1024s; KB, MB, GB in 1000s)."""
    match = _SIZE.fullmatch(text.strip().lower())
    if match is None or match.group(2) not in _SIZE_UNITS:
        raise ValueError(
            f"invalid size {text!r}: expected a number of bytes with an optional unit "
            "such as 1024, 4M, 500MiB, 1GB or 50GiB"
        )
    return int(Decimal(match.group(1)) * _SIZE_UNITS[match.group(2)])


@dataclass(frozen=True)
class TLSSettings:
    """How to talk TLS to one upstream: its CA, our client certificate, or no verification."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    insecure_skip_verify: bool = False


def api_host(registry: str) -> str:
    """The host that serves a registry's API: Docker Hub's is not docker.io."""
    return "registry-1.docker.io" if registry == DOCKER_HUB else registry


@dataclass(frozen=True)
class RegistrySettings:
    """How to reach one upstream registry, named by host[:port] as clients name it.

    ``upstream`` and ``prefix`` say where it really is when that is not at its
    name: a pull-through project of another registry, such as Harbor's
    ``harbor.corp/dockerhub-proxy``.  Only requests change; the cache knows
    the registry by its name.
    """

    name: str
    scheme: str = "https"
    description: str = ""
    upstream: str | None = None
    prefix: str = ""
    user_agent: str = USER_AGENT
    user: str | None = None
    password: str | None = None
    token: str | None = None
    credential_helper: str | None = None
    tls: TLSSettings = TLSSettings()
    manifest_ttl: float | None = None

    @property
    def api_host(self) -> str:
        """The host[:port] requests for this registry go to."""
        return self.upstream or api_host(self.name)

    def upstream_repository(self, repository: str) -> str:
        """A repository as the upstream names it: under its path prefix, if any."""
        return f"{self.prefix}/{repository}" if self.prefix else repository

    def masked(self) -> RegistrySettings:
        """A copy whose password and token, when set, read ``***``."""
        return replace(
            self,
            password=None if self.password is None else _MASK,
            token=None if self.token is None else _MASK,
        )

    def __repr__(self) -> str:
        """The usual dataclass repr, but never showing a secret."""
        shown = self.masked()
        return "RegistrySettings(" + ", ".join(
            f"{field.name}={getattr(shown, field.name)!r}" for field in fields(self)
        ) + ")"


@dataclass(frozen=True)
class S3Config:
    """Where the objects live and who we are there."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str = field(repr=False)
    region: str = "us-east-1"
    prefix: str = ""
    timeout: float = S3_TIMEOUT


@dataclass(frozen=True)
class S3Settings:
    """Manifests and blobs in an S3-compatible bucket shared by replicas (``storage.s3``)."""

    s3: S3Config
    redirect: bool = False
    # Multipart uploads begun longer ago than this are a crashed replica's, aborted at start.
    abandon_uploads_after: float = 3600.0

    def masked(self) -> S3Settings:
        """A copy whose secret key reads ``***``."""
        return replace(self, s3=replace(self.s3, secret_key=_MASK))


@dataclass(frozen=True)
class PruneSettings:
    """Background pruning of the cache (``pruneConfig``)."""

    enabled: bool = False
    type: str = "accessed"
    duration: float | None = None
    frequency: float | None = None
    count: int | None = None
    expr: str | None = None
    max_size: int | None = None
    dry_run: bool = True


@dataclass(frozen=True)
class ServerTLSSettings:
    """TLS towards our own clients (``serverTlsConfig``)."""

    cert: str
    key: str
    ca: str | None = None
    client_auth: str = "none"


@dataclass(frozen=True)
class FileSettings:
    """Everything a configuration file says; None where it says nothing, so the command line can win."""

    image_path: str | None = None
    log_level: str | None = None
    log_file: str | None = None
    port: int | None = None
    host: str | None = None
    os: str | None = None
    arch: str | None = None
    pull_timeout: float | None = None
    health: int | None = None
    metrics: int | None = None
    always_pull_latest: bool | None = None
    air_gapped: bool | None = None
    default_ns: str | None = None
    preload_images: str | None = None
    registries: tuple[RegistrySettings, ...] = ()
    prune: PruneSettings | None = None
    server_tls: ServerTLSSettings | None = None
    allow_upstreams: tuple[str, ...] | None = None
    manifest_ttl: float | None = None
    index_url: str | None = None
    storage: S3Settings | None = None
    advertise_url: str | None = None


def http_url(url: str) -> str:
    """An http:// or https:// URL of a host[:port] (no path), without its trailing slash; ValueError if not."""
    if not _HTTP_URL.fullmatch(url):
        raise ValueError(f"expected a URL like http://10.0.0.11:8080, got {_show(url)}")
    return url.rstrip("/")


def load_config_file(path: str, environ: Mapping[str, str] = os.environ) -> FileSettings:
    """Read and check a YAML configuration file (the Go server's current or original format)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except IsADirectoryError:
        raise ConfigError(path, "", "is a directory, not a file") from None
    except PermissionError:
        raise ConfigError(path, "", "permission denied") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "", "not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror}") from None
    return _Reader(path, environ).file_settings(_compose(path, text))


def registry_settings(registries: Sequence[RegistrySettings], host: str) -> RegistrySettings:
    """The settings of the registry clients call ``host``, else defaults: https, anonymous, system trust."""
    wanted = _registry_key(host)
    for settings in registries:
        if _registry_key(settings.name) == wanted:
            return settings
    return RegistrySettings(name=host)


def _registry_key(host: str) -> str:
    try:
        return canonical_registry(host)
    except OCIError:
        return host.lower()


def _compose(path: str, text: str) -> Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        # The offending line is left out: it may hold a password.
        problem = e.problem or "syntax error"
        if e.context:
            problem = f"{e.context}, {problem}"
        mark = e.problem_mark or e.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
        raise ConfigError(path, "", f"invalid YAML: {problem}", line, column) from None
    except yaml.reader.ReaderError as e:
        raise ConfigError(path, "", f"invalid YAML: special character at position {e.position}") from None
    except yaml.YAMLError as e:
        raise ConfigError(path, "", f"invalid YAML: {e}") from None


def _default(value: _T | None, default: _T) -> _T:
    return default if value is None else value


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _NULL_TAG


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return "a single value"


def _show(value: str) -> str:
    return repr(value if len(value) <= 60 else value[:57] + "...")


def _norm(key: str) -> str:
    # The Go server's keys were spelled several ways (dryrun, dryRun, insecure_skip_verify).
    return key.replace("_", "").replace("-", "").lower()


_Pair = tuple[Node, Node]


class _Entry(NamedTuple):
    path: str
    node: Node


class _Auth(NamedTuple):
    user: str | None = None
    password: str | None = None
    token: str | None = None
    credential_helper: str | None = None


class _Reader:
    """Turns a composed YAML document into settings, failing with the file, key path and line."""

    def __init__(self, file: str, environ: Mapping[str, str]) -> None:
        self.filename = file
        self.environ = environ

    def fail(self, path: str, problem: str, node: Node | None = None) -> ConfigError:
        line = node.start_mark.line + 1 if node is not None else None
        return ConfigError(self.filename, path, problem, line)

    def bad(self, entry: _Entry, problem: str) -> ConfigError:
        return self.fail(entry.path, problem, entry.node)

    # Structure

    def mapping(self, entry: _Entry, keys: Sequence[str],
                aliases: Mapping[str, str] | None = None) -> dict[str, _Entry]:
        """The entries of a mapping by canonical key (``aliases`` are other names of keys); unknown and repeated keys fail."""
        if _is_null(entry.node):
            return {}
        if not isinstance(entry.node, MappingNode):
            raise self.bad(entry, f"expected a mapping of keys, got {_kind(entry.node)}")
        by_norm = {_norm(key): key for key in keys}
        by_norm.update({_norm(alias): key for alias, key in (aliases or {}).items()})
        explicit, merged = self.pairs(entry.node, entry.path, set())
        found: dict[str, _Entry] = {}
        spelled: dict[str, str] = {}
        for index, (key_node, value) in enumerate(explicit + merged):
            if not isinstance(key_node, ScalarNode):
                raise self.fail(entry.path, "keys must be plain names", key_node)
            raw = str(key_node.value)
            path = f"{entry.path}.{raw}" if entry.path else raw
            canonical = by_norm.get(_norm(raw))
            if canonical is None:
                raise self.fail(path, "unknown key" + self.suggest(raw, by_norm), key_node)
            if canonical in found:
                if index < len(explicit):
                    raise self.fail(path, f"duplicate key (also given as '{spelled[canonical]}')", key_node)
                continue  # a key written out beats one merged in with '<<'
            found[canonical] = _Entry(path, value)
            spelled[canonical] = raw
        return found

    def pairs(self, node: MappingNode, path: str, seen: set[int]) -> tuple[list[_Pair], list[_Pair]]:
        """A mapping's own key/value pairs, and those merged in with ``<<``."""
        seen.add(id(node))
        explicit: list[_Pair] = []
        merged: list[_Pair] = []
        for key_node, value in node.value:
            if key_node.tag != _MERGE_TAG:
                explicit.append((key_node, value))
                continue
            for source in value.value if isinstance(value, SequenceNode) else [value]:
                if not isinstance(source, MappingNode) or id(source) in seen:
                    raise self.fail(path, "'<<' must merge a mapping or a list of mappings", source)
                inner, inner_merged = self.pairs(source, path, seen)
                merged.extend(inner + inner_merged)
        return explicit, merged

    def suggest(self, raw: str, by_norm: Mapping[str, str]) -> str:
        close = difflib.get_close_matches(_norm(raw), list(by_norm), n=1, cutoff=0.6)
        if close:
            return f" (did you mean '{by_norm[close[0]]}'?)"
        return f" (expected one of: {', '.join(dict.fromkeys(by_norm.values()))})"

    def sequence(self, entry: _Entry, expected: str) -> list[_Entry] | None:
        if _is_null(entry.node):
            return None
        if not isinstance(entry.node, SequenceNode):
            raise self.bad(entry, f"expected a list of {expected}, got {_kind(entry.node)}")
        return [_Entry(f"{entry.path}[{i}]", item) for i, item in enumerate(entry.node.value)]

    # Values; each takes None for an absent key and returns None for an absent or empty value.

    def scalar(self, entry: _Entry | None) -> str | None:
        if entry is None or _is_null(entry.node):
            return None
        if not isinstance(entry.node, ScalarNode):
            # Never the value itself: it may be a password.
            raise self.bad(entry, f"expected a single value, got {_kind(entry.node)}")
        return str(entry.node.value)

    def text(self, entry: _Entry | None) -> str | None:
        return self.scalar(entry) or None

    def boolean(self, entry: _Entry | None) -> bool | None:
        value = self.scalar(entry)
        if value is None or entry is None:
            return None
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise self.bad(entry, f"expected true or false, got {_show(value)}")

    def integer(self, entry: _Entry | None) -> int | None:
        value = self.scalar(entry)
        if value is None or entry is None:
            return None
        if not _INTEGER.fullmatch(value.strip()):
            raise self.bad(entry, f"expected a whole number, got {_show(value)}")
        return int(value)

    def port(self, entry: _Entry | None) -> int | None:
        number = self.integer(entry)
        if number is not None and entry is not None and not 0 < number < 65536:
            raise self.bad(entry, f"expected a TCP port from 1 to 65535, got {number}")
        return number

    def choice(self, entry: _Entry | None, options: Sequence[str]) -> str | None:
        value = self.scalar(entry)
        if value is None or entry is None:
            return None
        if value.lower() not in options:
            raise self.bad(entry, f"expected one of {', '.join(options)}, got {_show(value)}")
        return value.lower()

    def duration(self, entry: _Entry | None, *, never: bool = False) -> float | None:
        value = self.scalar(entry)
        if value is None or entry is None:
            return None
        if never and value.strip().lower() == "never":
            return math.inf
        try:
            return parse_duration(value)
        except ValueError as e:
            raise self.bad(entry, str(e) + (" or never" if never else "")) from None

    def milliseconds(self, entry: _Entry | None) -> float | None:
        value = self.scalar(entry)
        if value is None or entry is None:
            return None
        # The Go server's pullTimeout is a number of milliseconds; a unit makes it explicit.
        try:
            if _PLAIN_NUMBER.fullmatch(value.strip()):
                seconds = float(value) / 1000
            else:
                seconds = parse_duration(value)
        except ValueError:
            raise self.bad(entry, f"expected milliseconds or a duration such as 90s, got {_show(value)}") from None
        if seconds <= 0:
            raise self.bad(entry, f"must be longer than zero, got {_show(value)}")
        return seconds

    def size(self, entry: _Entry | None) -> int | None:
        value = self.scalar(entry)
        if value is None or entry is None:
            return None
        try:
            return parse_size(value)
        except ValueError as e:
            raise self.bad(entry, str(e)) from None

    def file(self, entry: _Entry | None) -> str | None:
        value = self.text(entry)
        if value is None or entry is None:
            return None
        where = "" if os.path.isabs(value) else f" (relative to {os.getcwd()})"
        if not os.path.exists(value):
            raise self.bad(entry, f"file not found: {value}{where}")
        if not os.path.isfile(value):
            raise self.bad(entry, f"not a file: {value}{where}")
        if not os.access(value, os.R_OK):
            raise self.bad(entry, f"cannot read file: {value}{where}")
        return os.path.abspath(value)

    def registry_host(self, entry: _Entry | None) -> str | None:
        value = self.text(entry)
        if value is None or entry is None:
            return None
        if "://" in value:
            raise self.bad(entry, f"expected a host[:port] without a scheme (see 'scheme'), got {_show(value)}")
        if "/" in value:
            raise self.bad(entry, f"expected a host[:port] without a path, got {_show(value)}")
        try:
            return canonical_registry(value)
        except OCIError:
            pass
        raise self.bad(entry, f"expected a host[:port] like quay.io or 127.0.0.1:5000, got {_show(value)}")

    # Sections

    def file_settings(self, node: Node | None) -> FileSettings:
        if node is None or _is_null(node):
            return FileSettings()
        if isinstance(node, SequenceNode):
            # The Go server's original format: the whole file is the list of registries.
            return FileSettings(registries=self.registries(_Entry("", node)))
        if not isinstance(node, MappingNode):
            raise self.fail("", "the top level must be a mapping of settings (or a list of registries)", node)
        items = self.mapping(_Entry("", node), _TOP_KEYS)
        hello = items.get("helloWorld")
        if self.boolean(hello) and hello is not None:
            raise self.bad(hello, "the Go server's hello-world test mode is not supported")
        log_entry = items.get("logLevel")
        # logrus's "warning", which the Go server accepted, is our "warn".
        if (self.scalar(log_entry) or "").lower() == "warning":
            log_level: str | None = "warn"
        else:
            log_level = self.choice(log_entry, _LOG_LEVELS)
        registries = items.get("registries")
        return FileSettings(
            image_path=self.text(items.get("imagePath")),
            log_level=log_level,
            log_file=self.text(items.get("logFile")),
            port=self.port(items.get("port")),
            host=self.text(items.get("host")),
            os=self.text(items.get("os")),
            arch=self.text(items.get("arch")),
            pull_timeout=self.milliseconds(items.get("pullTimeout")),
            health=self.port(items.get("health")),
            metrics=self.port(items.get("metrics")),
            always_pull_latest=self.boolean(items.get("alwaysPullLatest")),
            air_gapped=self.boolean(items.get("airGapped")),
            default_ns=self.registry_host(items.get("defaultNs")),
            preload_images=self.text(items.get("preloadImages")),
            registries=() if registries is None else self.registries(registries),
            prune=self.prune(items.get("pruneConfig")),
            server_tls=self.server_tls(items.get("serverTlsConfig")),
            allow_upstreams=self.patterns(items.get("allowUpstreams")),
            manifest_ttl=self.duration(items.get("manifestInvalidation"), never=True),
            index_url=self.index_url(items.get("index")),
            storage=self.storage(items.get("storage")),
            advertise_url=self.http_url(items.get("advertiseUrl")),
        )

    def http_url(self, entry: _Entry | None) -> str | None:
        """An http:// or https:// URL of a host[:port] (no path), without its trailing slash."""
        url = self.text(entry)
        if url is None or entry is None:
            return None
        try:
            return http_url(url)
        except ValueError as e:
            raise self.bad(entry, str(e)) from None

    def storage(self, entry: _Entry | None) -> S3Settings | None:
        """``storage.s3``: the shared bucket; None keeps the files under the image path."""
        if entry is None or _is_null(entry.node):
            return None
        s3 = self.mapping(entry, _STORAGE_KEYS).get("s3")
        if s3 is None or _is_null(s3.node):
            raise self.bad(entry, "expected 's3' with the bucket's settings")
        items = self.mapping(s3, _S3_KEYS)
        for key in ("endpoint", "bucket", "accessKey"):
            if self.text(items.get(key)) is None:
                raise self.bad(s3, f"missing '{key}'")
        bucket = self.text(items["bucket"]) or ""
        if not BUCKET_NAME.fullmatch(bucket):
            raise self.bad(items["bucket"], f"expected a bucket name (3 to 63 lowercase letters, digits, "
                                            f"dots and hyphens), got {_show(bucket)}")
        secret = self.text(items.get("secretKey"))
        from_env = items.get("secretKeyFromEnv")
        variable = self.text(from_env)
        if variable is not None and from_env is not None:
            if secret is not None:
                raise self.bad(from_env, "give either secretKey or secretKeyFromEnv, not both")
            secret = self.environ.get(variable)
            if not secret:
                raise self.bad(from_env, f"environment variable {variable} is {'empty' if secret == '' else 'not set'}")
        if secret is None:
            raise self.bad(s3, "missing 'secretKey' or 'secretKeyFromEnv'")
        timeout = self.duration(items.get("timeout"))
        if timeout is not None and timeout <= 0:
            raise self.bad(items["timeout"], f"must be longer than zero, got {_show(self.scalar(items['timeout']) or '')}")
        return S3Settings(
            S3Config(
                endpoint=self.http_url(items["endpoint"]) or "",
                bucket=bucket,
                access_key=self.text(items["accessKey"]) or "",
                secret_key=secret,
                region=_default(self.text(items.get("region")), "us-east-1"),
                prefix=_default(self.scalar(items.get("prefix")), ""),
                timeout=_default(timeout, S3_TIMEOUT),
            ),
            redirect=bool(self.boolean(items.get("redirect"))),
            abandon_uploads_after=_default(self.duration(items.get("abandonUploadsAfter")), 3600.0),
        )

    def index_url(self, entry: _Entry | None) -> str | None:
        """``index.postgresql``: a PostgreSQL connection URL, or None for the embedded sqlite index."""
        if entry is None or _is_null(entry.node):
            return None
        url_entry = self.mapping(entry, _INDEX_KEYS).get("postgresql")
        url = self.text(url_entry)
        if url_entry is not None and url is not None and not re.match(r"postgres(ql)?://", url):
            raise self.bad(url_entry, f"expected a URL like postgresql://user@host:5432/db, got {url!r}")
        return url

    def registries(self, entry: _Entry) -> tuple[RegistrySettings, ...]:
        found: dict[str, str] = {}
        result = []
        for item in self.sequence(entry, "registries") or []:
            settings = self.registry(item)
            if settings.name in found:
                raise self.bad(item, f"duplicate registry {settings.name!r} (also at {found[settings.name]})")
            found[settings.name] = item.path
            result.append(settings)
        return tuple(result)

    def registry(self, entry: _Entry) -> RegistrySettings:
        if _is_null(entry.node):
            raise self.bad(entry, "expected a registry mapping with at least 'name', got nothing")
        items = self.mapping(entry, _REGISTRY_KEYS, _REGISTRY_ALIASES)
        name = self.registry_host(items.get("name"))
        if name is None:
            raise self.bad(entry, "missing 'name' (the registry's host[:port], e.g. quay.io)")
        scheme, tls = self.scheme_and_tls(items)
        upstream_scheme, upstream, prefix = self.upstream(items.get("upstream"))
        if upstream_scheme is not None:
            if scheme is not None and scheme != upstream_scheme:
                raise self.bad(items["upstream"], f"the upstream URL says {upstream_scheme}, the registry {scheme}")
            scheme = upstream_scheme
        self.duration(items.get("blobInvalidationTime"))  # checked, but blobs never change under a digest
        flat = {key: items[spelled] for key, spelled in (("user", "username"), ("password", "password"))
                if spelled in items}
        auth = self.auth(items.get("auth"), flat, entry)
        return RegistrySettings(
            name=name,
            scheme=_default(scheme, "https"),
            description=_default(self.text(items.get("description")), ""),
            upstream=upstream,
            prefix=prefix,
            user_agent=_default(self.user_agent(items.get("userAgent")), USER_AGENT),
            user=auth.user,
            password=auth.password,
            token=auth.token,
            credential_helper=auth.credential_helper,
            tls=tls,
            manifest_ttl=self.duration(items.get("manifestInvalidation"), never=True),
        )

    def scheme_and_tls(self, items: Mapping[str, _Entry]) -> tuple[str | None, TLSSettings]:
        """A registry's scheme (if given) and TLS settings, in our spelling or the Rust server's."""
        scheme_entry = items.get("scheme")
        scheme = self.choice(scheme_entry, ("http", "https"))
        tls_entry = items.get("tls")
        if tls_entry is not None and isinstance(tls_entry.node, ScalarNode) and not _is_null(tls_entry.node):
            # The Rust server's tls: true/false chooses the scheme.
            if scheme_entry is not None:
                raise self.bad(tls_entry, "give either 'scheme' or a true/false 'tls', not both")
            value = str(tls_entry.node.value).lower()
            if value not in _TRUE | _FALSE:
                raise self.bad(tls_entry, f"expected a mapping of TLS settings, or true/false, got {_show(value)}")
            scheme = "https" if value in _TRUE else "http"
            tls = TLSSettings()
        else:
            tls = self.tls(tls_entry)
        skip_entry = items.get("acceptInvalidCerts")
        if skip_entry is not None:
            if tls != TLSSettings():
                raise self.bad(skip_entry, "give insecureSkipVerify inside 'tls' instead")
            tls = TLSSettings(insecure_skip_verify=_default(self.boolean(skip_entry), False))
        return scheme, tls

    def upstream(self, entry: _Entry | None) -> tuple[str | None, str | None, str]:
        """(scheme if given, host[:port], path prefix) from ``[scheme://]host[:port][/prefix]``."""
        value = self.text(entry)
        if value is None or entry is None:
            return None, None, ""
        expected = "expected [https://]host[:port][/path], such as https://harbor.corp/dockerhub-proxy"
        scheme: str | None = None
        rest = value
        if "://" in value:
            scheme, _, rest = value.partition("://")
            scheme = scheme.lower()
            if scheme not in ("http", "https"):
                raise self.bad(entry, f"{expected}: the scheme must be http or https, got {_show(scheme)}")
        netloc, _, path = rest.partition("/")
        if "@" in netloc:
            # Never shown: it holds a password.
            raise self.bad(entry, "credentials do not belong in the upstream URL: give them in 'auth'")
        if any(c in rest for c in "?#"):
            raise self.bad(entry, f"{expected}, without a query or fragment")
        try:
            host = check_registry(netloc)
        except OCIError:
            raise self.bad(entry, f"{expected}: {_show(netloc)} is not a host[:port]") from None
        prefix = path.strip("/")
        if prefix:
            try:
                check_repository(prefix)
            except OCIError:
                raise self.bad(entry, f"{expected}: the path {_show(prefix)} is not a repository path "
                                      "(lowercase letters, digits and separators)") from None
        return scheme, host, prefix

    def user_agent(self, entry: _Entry | None) -> str | None:
        value = self.text(entry)
        if value is None or entry is None:
            return None
        if not _USER_AGENT.fullmatch(value):
            raise self.bad(entry, f"expected printable ASCII on one line, got {_show(value)}")
        return value

    def auth(self, entry: _Entry | None, flat: dict[str, _Entry], registry: _Entry) -> _Auth:
        """Credentials from an ``auth`` mapping, or the Rust server's ``username`` and ``password`` beside ``name``."""
        if entry is not None and flat:
            raise self.bad(entry, "give credentials either in 'auth' or as username/password, not both")
        if entry is None and not flat:
            return _Auth()
        items = self.mapping(entry, _AUTH_KEYS) if entry is not None else flat
        where = entry if entry is not None else registry
        user = self.text(items.get("user"))
        password = self.text(items.get("password"))
        from_env = items.get("passwordFromEnv")
        variable = self.text(from_env)
        if variable is not None and from_env is not None:
            if password is not None:
                raise self.bad(from_env, "give either password or passwordFromEnv, not both")
            password = self.environ.get(variable)
            if password is None:
                raise self.bad(from_env, f"environment variable {variable} is not set")
            if not password:
                raise self.bad(from_env, f"environment variable {variable} is empty")
        token = self.text(items.get("token"))
        helper = self.text(items.get("credentialHelper"))
        if password is not None and user is None:
            raise self.bad(where, "a password needs a 'user'")
        if user is not None and password is None:
            raise self.bad(where, f"user {user!r} needs a 'password' or 'passwordFromEnv'")
        if token is not None and user is not None:
            raise self.bad(where, "give either user and password or a token, not both")
        if helper is not None and (user is not None or token is not None):
            raise self.bad(where, "credentialHelper cannot be combined with user/password or token")
        return _Auth(user, password, token, helper)

    def tls(self, entry: _Entry | None) -> TLSSettings:
        if entry is None:
            return TLSSettings()
        items = self.mapping(entry, _TLS_KEYS)
        settings = TLSSettings(
            ca=self.file(items.get("ca")),
            cert=self.file(items.get("cert")),
            key=self.file(items.get("key")),
            insecure_skip_verify=_default(self.boolean(items.get("insecureSkipVerify")), False),
        )
        self.check_pair(entry, settings.cert, settings.key)
        return settings

    def check_pair(self, entry: _Entry, cert: str | None, key: str | None) -> None:
        if (cert is None) != (key is None):
            missing = "key" if key is None else "cert"
            raise self.bad(entry, f"cert and key must be given together ({missing} is missing)")

    def prune(self, entry: _Entry | None) -> PruneSettings | None:
        if entry is None or _is_null(entry.node):
            return None
        items = self.mapping(entry, _PRUNE_KEYS)
        count_entry = items.get("count")
        count = self.integer(count_entry)
        if count == -1:
            count = None  # the Go server's "no limit"
        elif count is not None and count < 1 and count_entry is not None:
            raise self.bad(count_entry, f"expected a number of images, or -1 for no limit, got {count}")
        frequency_entry = items.get("frequency")
        frequency = self.duration(frequency_entry)
        if frequency is not None and frequency <= 0 and frequency_entry is not None:
            raise self.bad(frequency_entry, "must be longer than zero")
        settings = PruneSettings(
            enabled=_default(self.boolean(items.get("enabled")), False),
            type=_default(self.choice(items.get("type"), _PRUNE_TYPES), "accessed"),
            duration=self.duration(items.get("duration")),
            frequency=frequency,
            count=count,
            expr=self.text(items.get("expr")),
            max_size=self.size(items.get("maxSize")),
            dry_run=_default(self.boolean(items.get("dryRun")), True),
        )
        key, field = _PRUNE_NEEDS[settings.type]
        if settings.enabled and getattr(settings, field) is None:
            raise self.bad(entry, f"pruning of type {settings.type!r} needs '{key}'")
        return settings

    def server_tls(self, entry: _Entry | None) -> ServerTLSSettings | None:
        if entry is None:
            return None
        items = self.mapping(entry, _SERVER_TLS_KEYS)
        cert = self.file(items.get("cert"))
        key = self.file(items.get("key"))
        ca = self.file(items.get("ca"))
        client_auth = _default(self.choice(items.get("clientAuth"), ("none", "verify")), "none")
        if cert is None and key is None and ca is None and client_auth == "none":
            return None  # the Go server's documented default, serverTlsConfig: {}, means plain HTTP
        self.check_pair(entry, cert, key)
        if cert is None or key is None:
            raise self.bad(entry, "serving TLS needs 'cert' and 'key'")
        if client_auth == "verify" and ca is None:
            raise self.bad(entry, "clientAuth: verify needs 'ca' to check client certificates against")
        return ServerTLSSettings(cert=cert, key=key, ca=ca, client_auth=client_auth)

    def patterns(self, entry: _Entry | None) -> tuple[str, ...] | None:
        if entry is None:
            return None
        items = self.sequence(entry, "registry host patterns")
        if items is None:
            return None
        patterns = []
        for item in items:
            value = self.text(item)
            if value is None or "/" in value or any(c.isspace() for c in value):
                got = "nothing" if value is None else _show(value)
                raise self.bad(item, f"expected a host pattern like *.example.com or 127.0.0.1:*, got {got}")
            patterns.append(value.lower())
        return tuple(patterns)
