"""Replicas sharing one index: which replica downloads each blob, and how the others stream it from that one.

A download is owned by one replica at a time across the cluster: a lease row
in the index's ``downloads`` table names the owner by its advertise URL and
ends at an expiry that the owner pushes forward every third of the lease
while it downloads.  Every other replica that wants the blob meanwhile
streams it from the owner through the owner's ordinary
``/v2/<repository>/blobs/<digest>?ns=<registry>`` API: the owner is then a
chained mirror, which streams its in-flight download to any client already.

Takeover: when the owner cannot be reached, or its stream breaks, the
follower claims again.  It gets the download only once the lease has expired
unrenewed (a live owner renews it, and the follower streams from it again),
so that a replica that only one peer cannot reach never ends up with a twin.
A dead owner stops renewing and is replaced within one lease.

The claimant's clock sets and judges expiries: replicas' clocks must agree to
well within a lease (NTP does).  Coalescing within one replica comes first:
only the replica's one in-flight download of a digest claims it.
"""

from __future__ import annotations

import calendar
import time
import urllib.parse
from dataclasses import dataclass, field

from twisted.application.internet import TimerService
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from ociregistry.bodies import discard
from ociregistry.index import Index, IndexBusy, IndexConnection, IndexUnavailable

log = Logger()

# How long a download's lease lasts unless its owner renews it.
LEASE_SECONDS = 30.0
# Sent with a request to a peer, naming the replica asking: the peer must answer it
# from its own download or upstream, never by asking another replica in turn.
PEER_HEADER = b"X-Ociregistry-Peer"


@dataclass(frozen=True, eq=False)
class Ours:
    """This replica holds the lease: it downloads the blob, and releases the lease when done.

    ``lost`` fires if a renewal finds the lease taken over by another replica
    (this one failed to renew it in time): two downloads of the blob then run.
    """

    registry: str
    digest: str
    lost: Deferred[None] = field(default_factory=Deferred)


@dataclass(frozen=True)
class Peer:
    """Another replica holds the lease until ``expires`` (POSIX seconds): stream the blob from it at ``url``."""

    url: str
    expires: float


class PeerRefused(Exception):
    """A peer URL that is not plain http(s) to a host, or a peer that answered other than 200."""


class Cluster:
    """This replica's part in the cluster: claims, renews and releases download leases in the shared index."""

    def __init__(self, index: Index, advertise_url: str, clock: IReactorTime,
                 lease_seconds: float = LEASE_SECONDS) -> None:
        self.index = index
        self.url = advertise_url
        self.clock = clock
        self.lease_seconds = lease_seconds
        self._held: dict[tuple[str, str], Ours] = {}

    @property
    def held(self) -> list[tuple[str, str]]:
        """The (registry, digest) of every lease this replica holds, sorted."""
        return sorted(self._held)

    async def start(self) -> int:
        """Drop the leases of this replica's previous life (it was killed), so no one waits for them; how many."""
        return self._dropped(await self.index.run(IndexConnection.release_downloads_of, self.url))

    def start_blocking(self) -> int:
        """As ``start``, at start-up before the replica listens, so that no claim of this life is dropped."""
        return self._dropped(self.index.run_blocking(IndexConnection.release_downloads_of, self.url))

    def _dropped(self, dropped: int) -> int:
        if dropped:
            log.info("Released {count} download leases left by this replica's previous run", count=dropped)
        return dropped

    async def claim(self, registry: str, digest: str) -> Ours | Peer:
        """Take the download of a blob unless a live lease names another replica: Ours, or the Peer to stream from."""
        key = (registry, digest)
        if key in self._held:
            return self._held[key]
        owner, expires = await self.index.run(IndexConnection.claim_download, registry, digest, self.url,
                                              self.clock.seconds(), self.lease_seconds)
        if owner != self.url:
            return Peer(owner, _seconds(expires))
        return self._held.setdefault(key, Ours(registry, digest))

    async def claim_after(self, registry: str, digest: str, failed: Peer) -> Ours | Peer:
        """Claim again after streaming from ``failed`` broke or could not start.

        If that peer's lease was renewed since (it is alive) or another replica
        holds the download now, that is the Peer to stream from; else this
        waits until the lease expires and claims it, as every follower does:
        the first to claim becomes the owner.
        """
        while True:
            result = await self.claim(registry, digest)
            if isinstance(result, Ours) or result.url != failed.url or result.expires > failed.expires:
                return result
            await deferLater(self.clock, max(0.0, result.expires - self.clock.seconds()), lambda: None)

    async def outlast(self, registry: str, digest: str, poll: float = 0.5) -> None:
        """Wait until no other replica holds a live lease of a download (it ended, or its owner died)."""
        while await self.index.run(IndexConnection.download_owner, registry, digest,
                                   self.clock.seconds()) not in (None, self.url):
            await deferLater(self.clock, poll, lambda: None)

    async def renew(self) -> None:
        """Extend every lease this replica holds; one found taken over fires its ``lost``.  Errors are logged."""
        renewing = dict(self._held)
        keys = sorted(renewing)
        if not keys:
            return
        try:
            lost = await self.index.run(IndexConnection.renew_downloads, keys, self.url, self.clock.seconds(),
                                        self.lease_seconds)
        except CancelledError:
            raise
        except (IndexBusy, IndexUnavailable) as e:
            # Said every few seconds while the index is down: one line, no traceback.
            log.warn("Renewing {count} download leases failed: {why}", count=len(keys), why=e.message)
            return
        except Exception:
            log.failure("Renewing {count} download leases failed", count=len(keys))
            return
        for key in lost:
            # Not one released (and perhaps claimed anew) while the renewal ran.
            if key in self._held and self._held[key] is renewing[key]:
                ours = self._held.pop(key)
                log.warn("The download lease of {digest} ({registry}) was taken over by another replica",
                         registry=key[0], digest=key[1])
                ours.lost.callback(None)

    async def release(self, registry: str, digest: str) -> None:
        """End this replica's lease of a download (it finished or failed): the next claimant owns it."""
        if self._held.pop((registry, digest), None) is not None:
            await self.index.run(IndexConnection.release_downloads, [(registry, digest)], self.url)

    async def release_all(self) -> None:
        """End every lease this replica holds (at shutdown), so that others take over at once."""
        keys = self.held
        self._held.clear()
        if keys:
            await self.index.run(IndexConnection.release_downloads, keys, self.url)

    def service(self) -> LeaseService:
        """The service that renews this replica's leases and releases them all when it stops."""
        return LeaseService(self)


class LeaseService(TimerService):
    """Renews a Cluster's leases every third of a lease; at stop, releases every one of them."""

    def __init__(self, cluster: Cluster) -> None:
        super().__init__(cluster.lease_seconds / 3, lambda: Deferred.fromCoroutine(cluster.renew()))
        self.clock = cluster.clock
        self._cluster = cluster

    def stopService(self) -> Deferred[None]:
        """Stop renewing, then release."""
        stopped: Deferred[None] = maybeDeferred(super().stopService)
        return stopped.addCallback(lambda _: Deferred.fromCoroutine(self._cluster.release_all()))


def peer_blob_url(peer: str, registry: str, repository: str, digest: str) -> bytes:
    """The URL of a blob in a peer's ``/v2/`` API; PeerRefused unless the peer's URL is http(s) to a host."""
    parts = urllib.parse.urlsplit(peer)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise PeerRefused(f"not an http(s) replica URL: {peer!r}")
    quote = urllib.parse.quote
    path = f"{parts.path.rstrip('/')}/v2/{quote(repository)}/blobs/{quote(digest, safe=':')}"
    query = urllib.parse.urlencode({"ns": registry})
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, query, "")).encode("ascii")


async def open_from_peer(agent: IAgent, peer: str, registry: str, repository: str, digest: str,
                         own_url: str) -> IResponse:
    """Start streaming a blob from the replica downloading it: its 200 response, the body not yet read.

    The body arrives as the peer receives it (deliver it to a consumer that
    paces the connection, as bodies.py does).  A connection error is the
    agent's; any other answer than 200 is PeerRefused, its body dropped.
    """
    url = peer_blob_url(peer, registry, repository, digest)
    response: IResponse = await agent.request(b"GET", url, Headers({PEER_HEADER: [own_url.encode("utf-8")]}))
    if response.code != 200:
        discard(response)
        raise PeerRefused(f"{peer} answered {response.code} for {digest}")
    return response


def _seconds(stored: str) -> float:
    """An index time (UTC, ISO 8601) as POSIX seconds."""
    return float(calendar.timegm(time.strptime(stored, "%Y-%m-%dT%H:%M:%SZ")))
