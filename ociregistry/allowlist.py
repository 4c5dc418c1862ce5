"""Which upstream hosts the server may contact.

A pull-through cache reachable by clients must not become a way into the
network it runs in: by default a host that is not a configured registry may
be contacted only when every address it resolves to is public.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import socket
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
    IReactorTime,
    IResolutionReceiver,
)
from zope.interface import implementer

from ociregistry.errors import OCIError

Resolve = Callable[[str], "Deferred[list[str]]"]
_DECISION_TTL = 60.0


def _addresses(host: str) -> list[str]:
    return sorted({info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)})


def is_public(address: str) -> bool:
    """Whether an IP address is globally routable (not loopback, private, link-local, ...)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def host_of(netloc: str) -> str:
    """The host part of host[:port] (brackets of IPv6 removed), lowercased."""
    return (urlsplit(f"//{netloc}").hostname or netloc).lower()


class Allowlist:
    """Decides, before any connection, whether a host may be contacted."""

    def __init__(
        self,
        clock: IReactorTime,
        resolve: Resolve,
        configured: Sequence[str],
        patterns: Sequence[str] = (),
        allow_any: bool = False,
    ) -> None:
        self._clock = clock
        self._resolve = resolve
        self._configured = {name.lower() for name in configured}
        self._patterns = tuple(p.lower() for p in patterns)
        self._allow_any = allow_any
        self._public: dict[str, float] = {}
        self._trusted_hosts = {host_of(name) for name in self._configured}

    def configured(self, netloc: str) -> bool:
        """Whether the host is a configured registry (always allowed)."""
        return netloc.lower() in self._configured

    def trusts(self, host: str) -> bool:
        """Whether connections to this host may go to any address it resolves to.

        Any other host may only be connected to at public addresses; that is
        enforced when the connection is made, so a name cannot resolve to a
        public address for the check and a private one for the connection.
        """
        host = host.lower()
        return (
            self._allow_any
            or host in self._trusted_hosts
            or any(fnmatch.fnmatchcase(host, p) for p in self._patterns)
        )

    async def check(self, netloc: str, via: str | None = None) -> None:
        """Raise DENIED unless ``netloc`` may be contacted.

        ``via`` is the registry on whose behalf it is contacted: a configured
        registry's redirects and token service are trusted as the registry is.
        """
        netloc = netloc.lower()
        if self._allow_any or netloc in self._configured:
            return
        if via and via.lower() in self._configured:
            self._trusted_hosts.add(host_of(netloc))
            return
        if self._patterns:
            if any(fnmatch.fnmatchcase(netloc, p) or fnmatch.fnmatchcase(host_of(netloc), p) for p in self._patterns):
                return
            raise OCIError(403, "DENIED", f"upstream {netloc} is not in the allowed upstreams")
        if self._public.get(netloc, 0.0) > self._clock.seconds():
            return
        host = host_of(netloc)
        try:
            addresses = [host] if _is_address(host) else await self._resolve(host)
        except OSError:
            raise OCIError(502, "UNAVAILABLE", f"upstream {netloc} could not be resolved")
        if not addresses or not all(is_public(a) for a in addresses):
            raise OCIError(
                403, "DENIED",
                f"upstream {netloc} is a private, loopback or link-local address; "
                "configure it as a registry to allow it",
            )
        self._public[netloc] = self._clock.seconds() + _DECISION_TTL


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%")[0])
        return True
    except ValueError:
        return False


def resolver(defer_to_thread: Callable[..., "Deferred[list[str]]"]) -> Resolve:
    """Resolve every address of a host in a worker thread (getaddrinfo blocks)."""
    return lambda host: defer_to_thread(_addresses, host)


@implementer(IResolutionReceiver)
class _PublicAddresses:
    """Passes on only the public addresses of a resolution."""

    def __init__(self, receiver: IResolutionReceiver) -> None:
        self._receiver = receiver

    def resolutionBegan(self, resolution: IHostResolution) -> None:
        self._receiver.resolutionBegan(resolution)

    def addressResolved(self, address: IAddress) -> None:
        host = getattr(address, "host", None)
        if isinstance(host, str) and is_public(host):
            self._receiver.addressResolved(address)

    def resolutionComplete(self) -> None:
        self._receiver.resolutionComplete()


@implementer(IHostnameResolver)
class CheckedResolver:
    """Resolves names for upstream connections, dropping non-public addresses of untrusted hosts."""

    def __init__(self, resolver: IHostnameResolver, allowlist: Allowlist) -> None:
        self._resolver = resolver
        self._allowlist = allowlist

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        receiver = resolutionReceiver
        if not self._allowlist.trusts(hostName):
            receiver = _PublicAddresses(resolutionReceiver)
        return self._resolver.resolveHostName(receiver, hostName, portNumber, addressTypes, transportSemantics)


@implementer(IReactorPluggableNameResolver)
class ReactorWithResolver:
    """A reactor whose name resolver is replaced; everything else is the reactor's own."""

    def __init__(self, reactor: Any, resolver: IHostnameResolver) -> None:
        self._reactor = reactor
        self.nameResolver = resolver

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        previous, self.nameResolver = self.nameResolver, resolver
        return previous

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)
