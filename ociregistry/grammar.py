"""The request grammar: repository names, tags, digests and upstream namespaces."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from ociregistry.errors import ManifestUnknown, digest_invalid, name_invalid, not_found, unsupported

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*\Z")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
_HOST = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::(?P<port>[0-9]{1,5}))?\Z"
)
# A host whose last label is a number is an IPv4 address to URL parsers and
# resolvers, which also read octal (0177), hex (0x7f) and short (127.1) forms.
_NUMERIC_LABEL = re.compile(r"(?:[0-9]+|0[xX][0-9A-Fa-f]*)\Z")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_CANONICAL_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}\Z")
_DIGEST_LENGTHS = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[0-9a-f]+\Z")
_MAX_NAME = 255

DOCKER_HUB = "docker.io"
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

Kind = Literal["manifests", "blobs", "tags"]


@dataclass(frozen=True)
class Route:
    """A parsed pull-API path: what is asked for, by which name, by which reference."""

    kind: Kind
    name: str
    reference: str


@dataclass(frozen=True)
class Upstream:
    """The registry (as clients name it) and the repository inside it."""

    registry: str
    repository: str

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}"


def is_digest(reference: str) -> bool:
    """Whether a manifest reference is a digest rather than a tag."""
    return ":" in reference


def check_digest(digest: str) -> str:
    """Return the digest if it is one we can verify, else raise DIGEST_INVALID."""
    algorithm, _, encoded = digest.partition(":")
    length = _DIGEST_LENGTHS.get(algorithm)
    if length is None:
        raise digest_invalid(f"unsupported digest algorithm in {digest!r}")
    if len(encoded) != length or not _HEX.match(encoded):
        raise digest_invalid(f"malformed {algorithm} digest {digest!r}")
    return digest


def check_tag(tag: str) -> str:
    """Return the tag if it matches the spec's tag grammar (case is kept)."""
    if not _TAG.match(tag):
        raise ManifestUnknown(f"invalid tag {tag!r}", {"reference": tag})
    return tag


def check_reference(reference: str) -> str:
    """Validate a manifest reference, which is a tag or a digest."""
    return check_digest(reference) if is_digest(reference) else check_tag(reference)


def check_repository(name: str) -> str:
    """Return the repository name if every component matches the spec grammar."""
    if not name or len(name) > _MAX_NAME:
        raise name_invalid(f"repository name must have 1 to {_MAX_NAME} characters")
    for component in name.split("/"):
        if not _COMPONENT.match(component):
            raise name_invalid(f"invalid repository name component {component!r}")
    return name


def check_registry(host: str) -> str:
    """Return a registry host[:port], lowercased, or raise NAME_INVALID."""
    match = _HOST.match(host)
    if not match:
        raise name_invalid(f"invalid registry host {host!r}")
    port = match.group("port")
    if port and not 0 < int(port) < 65536:
        raise name_invalid(f"invalid port in registry host {host!r}")
    address = host[: match.start("port") - 1] if port else host
    if address.startswith("["):
        try:
            ipaddress.IPv6Address(address[1:-1])
        except ValueError:
            raise name_invalid(f"invalid IPv6 address in registry host {host!r}") from None
    elif _NUMERIC_LABEL.match(address.rpartition(".")[2]) and not _CANONICAL_IPV4.match(address):
        # Refused rather than normalised: a name a person reads as one address and
        # a resolver as another must not choose where the server connects.
        raise name_invalid(
            f"registry host {host!r} is not a canonical IPv4 address: "
            "write four decimal numbers from 0 to 255 without leading zeros"
        )
    return host.lower()


def parse_path(segments: list[str]) -> Route:
    """Parse the path below /v2/ (already split on '/') into a route.

    The name may contain any number of components, so the endpoint is read
    from the end of the path, as the spec's grammar is anchored there.
    """
    return _parse_path(tuple(segments))


# Clients ask for the same few paths again and again; parsing is pure.
@lru_cache(maxsize=4096)
def _parse_path(segments: tuple[str, ...]) -> Route:
    if "uploads" in segments[-3:] and "blobs" in segments[-4:]:
        raise unsupported("this registry is a pull-only mirror: uploads are not supported")
    if len(segments) >= 3 and segments[-2:] == ("tags", "list"):
        return Route("tags", "/".join(segments[:-2]), "")
    if len(segments) >= 3 and segments[-2] in ("manifests", "blobs"):
        kind: Kind = "manifests" if segments[-2] == "manifests" else "blobs"
        return Route(kind, "/".join(segments[:-2]), segments[-1])
    raise not_found()


def looks_like_host(component: str) -> bool:
    """Whether a first path component names a registry (it has a dot or port, or is localhost)."""
    return "." in component or ":" in component or component == "localhost"


def canonical_registry(host: str) -> str:
    """The name under which a registry is cached: Docker Hub's aliases become docker.io."""
    host = check_registry(host)
    return DOCKER_HUB if host in _DOCKER_HUB_ALIASES else host


@lru_cache(maxsize=4096)
def resolve_upstream(name: str, namespace: str | None, default_ns: str) -> Upstream:
    """Find the upstream registry and repository for a request.

    An explicit namespace (the ``ns`` query or ``X-Registry`` header) wins;
    otherwise a first component that looks like a host names the registry;
    otherwise the default namespace applies.
    """
    if namespace:
        registry = canonical_registry(namespace)
        repository = name
    else:
        first, _, rest = name.partition("/")
        if rest and looks_like_host(first):
            registry, repository = canonical_registry(first), rest
        else:
            registry, repository = canonical_registry(default_ns), name
    check_repository(repository)
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    return Upstream(registry, repository)
