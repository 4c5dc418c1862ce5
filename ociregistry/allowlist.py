"""Which upstream hosts the server may contact, and the name lookups that decide it.

A pull-through cache reachable by clients must not become a way into the
network it runs in: by default a host that is not a configured registry may
be contacted only when every address it resolves to is public.

Clients choose the names looked up, so lookups are bounded: they run on
threads of their own, identical ones are coalesced, answers are cached for a
while in a cache of bounded size, each lookup has a deadline, clients take
turns for the threads, and a client may have only so many lookups under way.
getaddrinfo is used rather than a
DNS client because it honours /etc/hosts and nsswitch, as users expect.
"""

from __future__ import annotations

import collections
import fnmatch
import ipaddress
import socket
from collections.abc import Callable, Collection, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
    IReactorTime,
    IResolutionReceiver,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ociregistry.errors import Denied, RateLimited, ServiceUnavailable, TimedOut, Unavailable

log = Logger()

Resolve = Callable[[str], "Deferred[list[str]]"]
RunInThread = Callable[..., "Deferred[Any]"]

_client: ContextVar[str | None] = ContextVar("lookup_client", default=None)


def lookups_on_behalf_of(client: IAddress) -> None:
    """Count the name lookups the current request causes against this client's address."""
    _client.set(client.host if isinstance(client, (IPv4Address, IPv6Address)) else None)


def _shutting_down(host: str) -> ServiceUnavailable:
    return ServiceUnavailable(f"the server is shutting down; {host} was not looked up")


def _addresses(host: str) -> list[str]:
    try:
        found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except UnicodeError as e:
        # A label the IDNA codec refuses (too long, empty) names no host.
        raise OSError(f"not a host name: {e}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in found))


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
            raise Denied(f"upstream {netloc} is not in the allowed upstreams")
        host = host_of(netloc)
        try:
            addresses = [host] if _is_address(host) else await self._resolve(host)
        except OSError:
            raise Unavailable(f"upstream {netloc} could not be resolved") from None
        if not addresses or not all(is_public(a) for a in addresses):
            raise Denied(
                f"upstream {netloc} is a private, loopback or link-local address; "
                "configure it as a registry to allow it",
            )


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%")[0])
        return True
    except ValueError:
        return False


@dataclass
class _Lookup:
    """A lookup wanted, and the callers waiting for it."""

    client: str | None
    preferred: bool
    waiters: list[Deferred[list[str]]] = field(default_factory=list)
    deadline: IDelayedCall | None = None
    started: bool = False


@implementer(IHostnameResolver)
class HostLookups:
    """Resolves host names on worker threads: coalesced, cached, and bounded in time and number.

    Clients take turns for the threads, and one client may use only half of
    them, so names that hang hold up only the client that sent them.  The
    ``preferred`` hosts (the configured registries) are looked up before any
    other and are counted against nobody.  Also the name resolver of upstream
    connections, so they share the cache and the limits.
    """

    def __init__(
        self,
        clock: IReactorTime,
        run_in_thread: RunInThread,
        *,
        threads: int = 8,
        preferred: Collection[str] = (),
        timeout: float = 10.0,
        max_pending: int = 256,
        max_per_client: int = 32,
        max_answers: int = 4096,
        ttl: float = 60.0,
        failure_ttl: float = 5.0,
        lookup: Callable[[str], list[str]] = _addresses,
    ) -> None:
        self._clock = clock
        self._run = run_in_thread
        self._threads = threads
        self._threads_per_client = max(1, threads // 2)
        self._preferred = {host.lower() for host in preferred}
        self._timeout = timeout
        self._max_pending = max_pending
        self._max_per_client = max_per_client
        self._max_answers = max_answers
        self._ttl = ttl
        self._failure_ttl = failure_ttl
        self._lookup = lookup
        self._closed = False
        self._pending: dict[str, _Lookup] = {}
        self._per_client: collections.Counter[str] = collections.Counter()
        # Lookups waiting for a thread: the preferred first, then each client's in turn.
        self._first: collections.deque[str] = collections.deque()
        self._queued: collections.OrderedDict[str | None, collections.deque[str]] = collections.OrderedDict()
        # Threads in use, in total and by client, counting lookups nobody waits for any more.
        self._busy = 0
        self._busy_for: collections.Counter[str | None] = collections.Counter()
        self._answers: collections.OrderedDict[str, tuple[float, list[str] | BaseException]] = (
            collections.OrderedDict())

    @property
    def pending(self) -> int:
        """How many lookups are wanted (queued or running)."""
        return len(self._pending)

    def addresses(self, host: str) -> Deferred[list[str]]:
        """Every address of a host; fails with OSError if it has none, or a ServiceUnavailable or RateLimited past a limit."""
        host = host.lower()
        if _is_address(host):
            return succeed([host])
        answer = self._cached(host)
        if answer is not None:
            if isinstance(answer, BaseException):
                # The same error is raised again and again: drop the traceback it gathered last time.
                return fail(answer.with_traceback(None))
            return succeed(list(answer))
        lookup = self._pending.get(host)
        if lookup is not None:
            return self._wait(host, lookup)
        if self._closed:
            return fail(_shutting_down(host))
        preferred = host in self._preferred
        client = None if preferred else _client.get()
        if not preferred and len(self._pending) >= self._max_pending:
            return fail(ServiceUnavailable(f"too many name lookups under way; {host} was not looked up",
                                           retry_after=1))
        if client is not None and self._per_client[client] >= self._max_per_client:
            return fail(RateLimited(f"too many name lookups under way for {client}; {host} was not looked up",
                                    retry_after=1))
        lookup = _Lookup(client, preferred)
        self._pending[host] = lookup
        if client is not None:
            self._per_client[client] += 1
        waiter = self._wait(host, lookup)
        lookup.deadline = self._clock.callLater(self._timeout, self._expired, host, lookup)
        if preferred:
            self._first.append(host)
        else:
            self._queued.setdefault(client, collections.deque()).append(host)
        self._dispatch()
        return waiter

    def close(self) -> None:
        """Shutdown: lookups still queued fail at once, and no new ones start."""
        self._closed = True
        for host, lookup in list(self._pending.items()):
            if not lookup.started:
                self._unqueue(host, lookup)
                self._fail(host, lookup, _shutting_down(host), remember=False)

    def _dispatch(self) -> None:
        """Start queued lookups while threads are free: preferred first, then clients in turn."""
        while self._busy < self._threads:
            if self._first:
                host = self._first.popleft()
            else:
                ready = [c for c in self._queued if self._busy_for[c] < self._threads_per_client]
                if not ready:
                    return
                hosts = self._queued[ready[0]]
                host = hosts.popleft()
                if hosts:
                    self._queued.move_to_end(ready[0])
                else:
                    del self._queued[ready[0]]
            lookup = self._pending[host]
            lookup.started = True
            self._busy += 1
            if not lookup.preferred:
                self._busy_for[lookup.client] += 1
            self._run(self._lookup, host).addBoth(self._returned, host, lookup)

    def _unqueue(self, host: str, lookup: _Lookup) -> None:
        if lookup.preferred:
            self._first.remove(host)
            return
        hosts = self._queued[lookup.client]
        hosts.remove(host)
        if not hosts:
            del self._queued[lookup.client]

    def _returned(self, outcome: list[str] | Failure, host: str, lookup: _Lookup) -> None:
        self._busy -= 1
        if not lookup.preferred:
            self._busy_for[lookup.client] -= 1
            if not self._busy_for[lookup.client]:
                del self._busy_for[lookup.client]
        current = self._pending.get(host) is lookup
        if not isinstance(outcome, Failure):
            # Even an answer that came too late serves the next caller.
            self._remember(host, outcome)
            if current:
                for waiter in self._end(host, lookup):
                    waiter.callback(list(outcome))
        elif current:
            error = outcome.value
            if not isinstance(error, OSError):
                log.failure("Looking up {host} failed", outcome, host=host)
                error = OSError(f"looking up {host} failed")
            self._fail(host, lookup, error, remember=True)
        self._dispatch()

    def _cached(self, host: str) -> list[str] | BaseException | None:
        entry = self._answers.get(host)
        if entry is None:
            return None
        expires, answer = entry
        if expires <= self._clock.seconds():
            del self._answers[host]
            return None
        self._answers.move_to_end(host)
        return answer

    def _remember(self, host: str, answer: list[str] | BaseException) -> None:
        ttl = self._failure_ttl if isinstance(answer, BaseException) else self._ttl
        self._answers[host] = (self._clock.seconds() + ttl, answer)
        self._answers.move_to_end(host)
        while len(self._answers) > self._max_answers:
            self._answers.popitem(last=False)

    def _wait(self, host: str, lookup: _Lookup) -> Deferred[list[str]]:
        """A Deferred of the lookup's answer of its own: cancelling it only stops waiting."""
        waiter: Deferred[list[str]] = Deferred(lambda d: self._leave(host, lookup, d))
        lookup.waiters.append(waiter)
        return waiter

    def _leave(self, host: str, lookup: _Lookup, waiter: Deferred[list[str]]) -> None:
        lookup.waiters.remove(waiter)
        if not lookup.waiters and self._pending.get(host) is lookup:
            # Nobody waits any more: a queued lookup is dropped; a running one runs on.
            if not lookup.started:
                self._unqueue(host, lookup)
            self._end(host, lookup)

    def _end(self, host: str, lookup: _Lookup) -> list[Deferred[list[str]]]:
        """Forget a wanted lookup; returns its waiters."""
        del self._pending[host]
        if lookup.client is not None:
            self._per_client[lookup.client] -= 1
            if not self._per_client[lookup.client]:
                del self._per_client[lookup.client]
        if lookup.deadline is not None and lookup.deadline.active():
            lookup.deadline.cancel()
        waiters, lookup.waiters = lookup.waiters, []
        return waiters

    def _expired(self, host: str, lookup: _Lookup) -> None:
        log.warn("Looking up {host} took longer than {timeout} s", host=host, timeout=self._timeout)
        if not lookup.started:
            self._unqueue(host, lookup)
        self._fail(host, lookup, TimedOut(
            f"the name lookup of {host} took longer than {self._timeout:g} s"), remember=True)

    def _fail(self, host: str, lookup: _Lookup, error: BaseException, remember: bool) -> None:
        if remember:
            self._remember(host, error)
        for waiter in self._end(host, lookup):
            waiter.errback(error)

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        """Resolve for a connection; a name that fails or is refused resolves to nothing."""
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        found = resolution.lookup = self.addresses(hostName)

        def deliver(addresses: list[str]) -> None:
            for address in addresses:
                kind = IPv6Address if ":" in address else IPv4Address
                if addressTypes is None or kind in addressTypes:
                    resolutionReceiver.addressResolved(kind("TCP", address, portNumber))

        def unresolved(failure: Failure) -> None:
            if not failure.check(CancelledError):
                log.info("No address for {host}: {why}", host=hostName, why=failure.getErrorMessage())

        def complete(_: object) -> None:
            resolutionReceiver.resolutionComplete()

        found.addCallbacks(deliver, unresolved)
        found.addBoth(complete)
        return resolution


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name
        self.lookup: Deferred[list[str]] | None = None

    def cancel(self) -> None:
        if self.lookup is not None:
            self.lookup.cancel()


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
