"""Replicas sharing one index: which replica fetches each blob and manifest, and how the others get it from that one.

A fetch is owned by one replica at a time across the cluster: a lease row
in the index's ``downloads`` table names the owner by its advertise URL and
ends at an expiry that the owner pushes forward every third of the lease
while it fetches.  Every other replica that wants the blob meanwhile
streams it from the owner through the owner's ordinary
``/v2/<repository>/blobs/<digest>?ns=<registry>`` API: the owner is then a
chained mirror, which streams its in-flight download to any client already.
Manifests go the same way through ``/v2/<repository>/manifests/<reference>``,
leased by ``manifest_subject`` (a repository and a tag or digest) where
blobs are leased by digest: the owner answers once the manifest is in the
shared index, so its answer is the shared cache's.

Takeover: when the owner cannot be reached, or its stream breaks, the
follower claims again.  It gets the download only once the lease has expired
unrenewed (a live owner renews it, and the follower streams from it again),
so that a replica that only one peer cannot reach never ends up with a twin.
A dead owner stops renewing and is replaced within one lease.

The owner records its multipart upload with the lease once it has begun one;
whoever ends a lease that was not released (the owner's next life at start,
or the replica taking an expired lease over) aborts that upload, so that no
upload of a dead owner is left in the bucket.  An owner that finds at a
renewal that its lease was taken over (it could not renew in time) goes on
with its download, so that its clients are not cut off: both downloads
verify, and the content is addressed by digest.  (Its upload was aborted by
the new owner, so its commit succeeds only once the new owner's object is
complete; else its clients' next try is served by the new owner.)

The claimant's clock sets and judges expiries: replicas' clocks must agree to
well within a lease (NTP does).  Coalescing within one replica comes first:
only the replica's one in-flight download of a digest claims it.
"""

from __future__ import annotations

import calendar
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from twisted.application.internet import TimerService
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from ociregistry.bodies import discard
from ociregistry.bucket import BucketStore
from ociregistry.errors import NotFound, Unavailable
from ociregistry.index import Index, IndexBusy, IndexConnection, IndexUnavailable

log = Logger()

T = TypeVar("T")

# How long a download's lease lasts unless its owner renews it.
LEASE_SECONDS = 30.0
# Sent with a request to a peer, naming the replica asking: the peer must answer it
# from its own download or upstream, never by asking another replica in turn.
PEER_HEADER = b"X-Ociregistry-Peer"
# How many times a follower starts again (from the owner, a new owner, or as the owner) before it gives up.
ROUNDS = 5


def manifest_subject(repository: str, reference: str) -> str:
    """What a manifest fetch is leased as, beside blobs' digests (which never hold an "@")."""
    return f"{repository}@{reference}"


@dataclass(frozen=True, eq=False)
class Ours:
    """This replica holds the lease: it downloads the blob, and releases the lease when done."""

    registry: str
    digest: str


@dataclass(frozen=True)
class Peer:
    """Another replica holds the lease until ``expires`` (POSIX seconds): stream the blob from it at ``url``."""

    url: str
    expires: float


class PeerRefused(Exception):
    """A peer URL that is not plain http(s) to a host, or a peer that answered other than 200."""


class PeerNotFound(PeerRefused):
    """The peer answered 404: its upstream does not have it."""


class Cluster:
    """This replica's part in the cluster: claims, renews and releases download leases in the shared index."""

    def __init__(self, index: Index, advertise_url: str, clock: IReactorTime,
                 lease_seconds: float = LEASE_SECONDS, bucket: BucketStore | None = None) -> None:
        self.index = index
        self.url = advertise_url
        self.clock = clock
        self.lease_seconds = lease_seconds
        self._held: dict[tuple[str, str], Ours] = {}
        # Where the owners' multipart uploads are: each one begun is recorded with its lease.
        self._bucket = bucket
        if bucket is not None:
            bucket.upload_begun = self.record_upload

    @property
    def held(self) -> list[tuple[str, str]]:
        """The (registry, digest) of every lease this replica holds, sorted."""
        return sorted(self._held)

    async def start(self) -> int:
        """Drop the leases of this replica's previous life (it was killed), so no one waits for them, and abort
        the uploads recorded with them; how many leases."""
        return self._dropped(*await self.index.run(_drop_leases, self.url))

    def start_blocking(self) -> int:
        """As ``start``, at start-up before the replica listens, so that no claim of this life is dropped.

        The uploads are aborted once the reactor runs.
        """
        return self._dropped(*self.index.run_blocking(_drop_leases, self.url))

    def _dropped(self, dropped: int, uploads: list[tuple[str, str]]) -> int:
        if dropped:
            log.info("Released {count} download leases left by this replica's previous run", count=dropped)
        self._abort(uploads, "this replica's previous run")
        return dropped

    def _abort(self, uploads: list[tuple[str, str]], whose: str) -> None:
        """Abort uploads a lease's owner left, in the background (a failure is logged and swept later)."""
        if uploads and self._bucket is not None:
            Deferred.fromCoroutine(self._bucket.abort_uploads(uploads, whose)).addErrback(
                lambda failure: log.failure("Aborting the uploads left by {whose}", failure, whose=whose))

    async def record_upload(self, digest: str, key: str, upload_id: str) -> None:
        """Record the multipart upload of a blob with this replica's leases of it; a failure is logged.

        Unrecorded, an upload left by a crash is aborted by the sweep of uploads
        older than abandonUploadsAfter instead.
        """
        keys = [held for held in self.held if held[1] == digest]
        if not keys:
            return
        try:
            await self.index.run(IndexConnection.record_upload, keys, self.url, key, upload_id)
        except CancelledError:
            raise
        except Exception as e:
            log.warn("Recording the upload of {digest} with its lease failed ({why}); the sweep aborts it "
                     "if it is left", digest=digest, why=str(e) or type(e).__name__)

    async def leased_uploads(self) -> set[str]:
        """The ids of the multipart uploads that downloads under live leases (of any replica) write to."""
        return await self.index.run(IndexConnection.leased_uploads, self.clock.seconds())

    async def claim(self, registry: str, digest: str) -> Ours | Peer:
        """Take the download of a blob unless a live lease names another replica: Ours, or the Peer to stream from."""
        key = (registry, digest)
        if key in self._held:
            return self._held[key]
        owner, expires, previous = await self.index.run(IndexConnection.claim_download, registry, digest,
                                                        self.url, self.clock.seconds(), self.lease_seconds)
        if owner != self.url:
            return Peer(owner, _seconds(expires))
        if previous is not None:
            self._abort([previous], "the replica whose lease expired")
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

    async def lead_or_follow(self, registry: str, subject: str, lead: Callable[[], Awaitable[T]],
                             follow: Callable[[Peer], Awaitable[T]], what: str) -> T:
        """Fetch ``subject`` once across the cluster: ``lead`` if this replica gets the lease, else ``follow`` the owner.

        The lease is released when ``lead`` ends.  When following fails (the
        owner cannot be reached, or its stream breaks), this claims again,
        taking the fetch over once the owner's lease has expired; a NotFound
        is the answer, not a failure.
        """
        claim = await self.claim(registry, subject)
        for attempt in range(1, ROUNDS + 1):
            if isinstance(claim, Ours):
                try:
                    return await lead()
                finally:
                    await self._release_quietly(registry, subject)
            try:
                return await follow(claim)
            except (CancelledError, NotFound):
                raise
            except Exception as e:
                if attempt == ROUNDS:
                    raise Unavailable(f"could not get {what} from the replica fetching it, {claim.url}: {e}") from None
                log.warn("Getting {what} from {peer} failed ({why}); claiming it again",
                         what=what, peer=claim.url, why=str(e) or type(e).__name__)
            claim = await self.claim_after(registry, subject, claim)
        raise AssertionError("unreachable")

    async def _release_quietly(self, registry: str, subject: str) -> None:
        """End this replica's lease; an index that cannot answer leaves it to expire."""
        try:
            await self.release(registry, subject)
        except CancelledError:
            raise
        except Exception as e:
            log.warn("Releasing the lease of {subject} failed ({why}); it expires unrenewed",
                     subject=subject, why=str(e))

    async def outlast(self, registry: str, digest: str, poll: float = 0.5) -> None:
        """Wait until no other replica holds a live lease of a download (it ended, or its owner died)."""
        while await self.index.run(IndexConnection.download_owner, registry, digest,
                                   self.clock.seconds()) not in (None, self.url):
            await deferLater(self.clock, poll, lambda: None)

    async def renew(self) -> None:
        """Extend every lease this replica holds; one found taken over is dropped, its download goes on.

        Errors are logged.
        """
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
                del self._held[key]
                # The download goes on: both verify, and either's object is the same content.
                log.warn("The download lease of {digest} ({registry}) was taken over by another replica; "
                         "this replica's download goes on", registry=key[0], digest=key[1])

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


def peer_url(peer: str, registry: str, repository: str, kind: str, reference: str) -> bytes:
    """The URL of ``blobs`` or ``manifests`` in a peer's ``/v2/`` API; PeerRefused unless the peer's URL is http(s) to a host."""
    parts = urllib.parse.urlsplit(peer)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise PeerRefused(f"not an http(s) replica URL: {peer!r}")
    quote = urllib.parse.quote
    path = f"{parts.path.rstrip('/')}/v2/{quote(repository)}/{kind}/{quote(reference, safe=':')}"
    query = urllib.parse.urlencode({"ns": registry})
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, query, "")).encode("ascii")


async def open_from_peer(agent: IAgent, peer: str, registry: str, repository: str, kind: str, reference: str,
                         own_url: str) -> IResponse:
    """Start getting a blob or manifest from the replica fetching it: its 200 response, the body not yet read.

    A blob's body arrives as the peer receives it (deliver it to a consumer
    that paces the connection, as bodies.py does).  A connection error is
    the agent's; a 404 is PeerNotFound and any other answer than 200 is
    PeerRefused, its body dropped.
    """
    url = peer_url(peer, registry, repository, kind, reference)
    response: IResponse = await agent.request(b"GET", url, Headers({PEER_HEADER: [own_url.encode("utf-8")]}))
    if response.code != 200:
        discard(response)
        refused = PeerNotFound if response.code == 404 else PeerRefused
        raise refused(f"{peer} answered {response.code} for {reference}")
    return response


def _drop_leases(connection: IndexConnection, owner: str) -> tuple[int, list[tuple[str, str]]]:
    """End every lease ``owner`` holds: how many, and the uploads recorded with them."""
    uploads = connection.uploads_of(owner)
    return connection.release_downloads_of(owner), uploads


def _seconds(stored: str) -> float:
    """An index time (UTC, ISO 8601) as POSIX seconds."""
    return float(calendar.timegm(time.strptime(stored, "%Y-%m-%dT%H:%M:%SZ")))
