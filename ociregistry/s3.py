"""Content-addressed objects in an S3-compatible bucket (Ceph RGW, AWS S3, MinIO, R2).

The interface is as small as CNCF distribution's storage driver: ``stat``,
``open_range`` (a body delivered to a consumer with backpressure, the Range
passed to the store), ``begin`` (a writer that uploads multipart parts as bytes
arrive and completes the object only once its digest is verified), ``delete``,
``presign_get`` for redirects, ``list`` for checks, ``sweep_uploads`` for the uploads a crash left
behind, and ``check_bucket`` for start-up.

botocore only signs (SigV4 headers, presigned URLs); requests travel through
treq on the reactor, never buffered whole.  Failures of the store (5xx, resets,
silence) are retried a bounded number of times, then raised as
``StorageUnavailable``, which clients see as a JSON 503.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
import xml.etree.ElementTree as ElementTree
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

import treq
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, ConnectionLost, DNSLookupError, TimeoutError
from twisted.internet.interfaces import IConsumer, IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import RequestNotSent
from twisted.web.client import Agent, HTTPConnectionPool, RequestTransmissionFailed, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse

from ociregistry.bodies import BytesBody, Collector, Relay, discard
from ociregistry.config import BUCKET_NAME, S3Config
from ociregistry.errors import RangeNotSatisfiable, StorageUnavailable
from ociregistry.inflight import Observable
from ociregistry.store import DigestMismatch, SizeExceeded
from ociregistry.transport import describe

log = Logger()

MIB = 1024 * 1024
# S3 refuses parts below 5 MiB, except the last one of an upload.
MINIMUM_PART = 5 * MIB
PART_SIZE = 8 * MIB
_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# Answers that say "try again": the store is overloaded or failing for now.
_RETRIED = frozenset({500, 502, 503, 504})
# Failures of the connection rather than answers of the store.
_NETWORK = (ConnectError, DNSLookupError, TimeoutError, ConnectionLost, ResponseFailed,
            RequestTransmissionFailed, RequestNotSent)
_CREDENTIALS = {"InvalidAccessKeyId": "wrong credentials (unknown access key)",
                "SignatureDoesNotMatch": "wrong credentials (the secret key does not match)",
                "AccessDenied": "wrong credentials (access denied)"}


@dataclass(frozen=True)
class Upload:
    """A multipart upload in progress: its key (without our prefix), id, and when it began."""

    key: str
    upload_id: str
    initiated: float


@dataclass(frozen=True)
class Listed:
    """An object in the bucket: its key (without our prefix), size, and when it was last written."""

    key: str
    size: int
    modified: float


def key_for(digest: str) -> str:
    """The content-addressed key of a manifest or blob: ``blobs/<algorithm>/<encoded>``."""
    algorithm, _, encoded = digest.partition(":")
    return f"blobs/{algorithm}/{encoded}"


def digest_for(key: str) -> str | None:
    """The digest a content-addressed key names, or None for a key that is not one of ours."""
    top, _, rest = key.partition("/")
    algorithm, _, encoded = rest.partition("/")
    if top != "blobs" or not algorithm or not encoded or "/" in encoded:
        return None
    return f"{algorithm}:{encoded}"


class _Signer(S3SigV4Auth):  # type: ignore[misc]  # botocore ships no type information
    """botocore's S3 SigV4 signer, told the payload's sha256 (computed as the bytes arrived)."""

    def payload(self, request: AWSRequest) -> str:
        return str(request.context["payload_sha256"])


class StoreFailing(StorageUnavailable):
    """The store kept failing a request as often as we retry it; ``reason`` says how it failed last."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class _Failed(Exception):
    """One try that failed in a way worth another try; the message says how."""


def _wraps_cancel(error: BaseException) -> bool:
    """Whether a connection failure is really our own caller cancelling the request."""
    reasons = getattr(error, "reasons", None) or []
    return any(isinstance(reason, Failure) and reason.check(CancelledError) for reason in reasons)


def _error_code(body: bytes) -> tuple[str, str]:
    """The ``<Code>`` and ``<Message>`` of an S3 error document ("", "" when there is none)."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return "", ""
    return root.findtext("Code") or "", root.findtext("Message") or ""


def _xml(body: bytes, what: str) -> ElementTree.Element:
    try:
        return ElementTree.fromstring(body)
    except ElementTree.ParseError:
        raise StorageUnavailable(f"{what}: the store answered something that is not XML") from None


def _header(response: IResponse, name: str) -> str | None:
    values = response.headers.getRawHeaders(name.encode("ascii"))
    return values[0].decode("latin-1") if values else None


class S3Store:
    """One bucket (and key prefix) of an S3-compatible store, used without blocking the reactor."""

    def __init__(self, config: S3Config, *, reactor: Any, agent: IAgent | None = None,
                 retries: int = 3, backoff: float = 0.2, timeout: float | None = None,
                 part_size: int = PART_SIZE) -> None:
        if part_size < MINIMUM_PART:
            raise ValueError(f"S3 parts must be at least {MINIMUM_PART} bytes")
        if not BUCKET_NAME.fullmatch(config.bucket):
            # Ceph RGW, like AWS, refuses names shorter than 3 characters.
            raise ValueError(f"{config.bucket!r} is not a bucket name: 3 to 63 lowercase letters, "
                             "digits, dots and hyphens, starting and ending with a letter or digit")
        self.config = config
        self.part_size = part_size
        self.retries = retries
        self._clock: IReactorTime = reactor
        self._backoff = backoff
        # Bounds each request, all its tries together (the configuration's unless given).
        self._timeout = config.timeout if timeout is None else timeout
        self._pool: HTTPConnectionPool | None = None
        if agent is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._http = HTTPClient(agent or Agent(reactor, pool=self._pool))
        self._credentials = Credentials(config.access_key, config.secret_key)
        self._base = f"{config.endpoint.rstrip('/')}/{quote(config.bucket, safe='')}"
        self._where = f"bucket {config.bucket} at {config.endpoint}"
        # Multipart uploads (key, upload id) whose abort failed, to abort at the next sweep: an ordered set.
        self._unaborted: dict[tuple[str, str], None] = {}
        # The ids of the multipart uploads this process's writers are writing to now.
        self.writing: set[str] = set()

    # The driver's interface

    async def stat(self, key: str) -> int | None:
        """The size of the object at ``key``, or None when there is none."""
        response = await self._call("HEAD", key, what=f"HEAD {key}")
        if response.code == 404:
            return None
        if response.code != 200:
            raise self._refusal(response.code, b"", f"HEAD {key}")
        return int(_header(response, "Content-Length") or 0)

    async def open_range(self, key: str, start: int | None = None,
                         end: int | None = None) -> ObjectBody | None:
        """The object's bytes ``start``..``end`` (inclusive, as in HTTP), or None when there is none.

        ``start`` alone is open-ended, ``end`` alone a suffix of that many bytes,
        neither the whole object.  The store answers the Range itself; nothing is
        read until ``ObjectBody.deliver``.
        """
        headers = {}
        if start is not None or end is not None:
            headers["Range"] = f"bytes={'' if start is None else start}-{'' if end is None else end}"
        what = f"GET {key}"
        response = await self._call("GET", key, headers=headers, what=what)
        if response.code == 404:
            code, _ = _error_code(await treq.content(response))
            if code == "NoSuchBucket":
                raise StorageUnavailable(f"{self._where}: missing")
            return None
        if response.code == 416:
            await treq.content(response)
            size = await self.stat(key)
            if size is None:
                return None
            raise RangeNotSatisfiable(size)
        if response.code not in (200, 206):
            raise await self._refused(response, what)
        return ObjectBody(self, key, response, *_extent(response))

    async def read(self, key: str, limit: int = 4 * MIB) -> bytes | None:
        """The whole of a small object (a manifest), or None; one larger than ``limit`` is refused."""
        body = await self.open_range(key)
        if body is None:
            return None
        if body.size > limit:
            body.discard()
            raise ValueError(f"{key} has {body.size} bytes, more than the {limit} asked for")
        collected = Collector()
        await body.deliver(collected)
        return b"".join(collected.chunks)

    def begin(self, key: str, digest: str, limit: int | None = None,
              began: Callable[[str, str], Awaitable[None]] | None = None) -> S3Writer:
        """Start writing the object at ``key``, whose bytes must hash to ``digest``.

        ``began`` is told the (key, upload id) of the multipart upload once it
        is begun, and awaited before its first part is sent.
        """
        return S3Writer(self, key, digest, limit, began)

    async def delete(self, key: str) -> None:
        """Remove the object at ``key`` (nothing happens when there is none)."""
        response = await self._call("DELETE", key, what=f"DELETE {key}")
        await self._ok(response, f"DELETE {key}", 204, 404)

    def presign_get(self, key: str, expires: int) -> str:
        """A URL that GETs the object at ``key`` without credentials for ``expires`` seconds."""
        request = AWSRequest(method="GET", url=self._url(self._full(key)))
        S3SigV4QueryAuth(self._credentials, "s3", self.config.region, expires=expires).add_auth(request)
        return str(request.url)

    async def uploads(self) -> list[Upload]:
        """The multipart uploads in progress under our prefix, oldest first."""
        found: list[Upload] = []
        markers = {"key-marker": "", "upload-id-marker": ""}
        while True:
            query = {"uploads": "", "prefix": self.config.prefix, **markers}
            response = await self._call("GET", None, query=query, what="list multipart uploads")
            root = _xml(await self._ok(response, "list multipart uploads"), "list multipart uploads")
            for upload in root.iter(_NS + "Upload"):
                initiated = (upload.findtext(_NS + "Initiated") or "").replace("Z", "+00:00")
                found.append(Upload((upload.findtext(_NS + "Key") or "").removeprefix(self.config.prefix),
                                    upload.findtext(_NS + "UploadId") or "",
                                    datetime.fromisoformat(initiated).timestamp()))
            if root.findtext(_NS + "IsTruncated") != "true":
                return sorted(found, key=lambda upload: upload.initiated)
            markers = {"key-marker": root.findtext(_NS + "NextKeyMarker") or "",
                       "upload-id-marker": root.findtext(_NS + "NextUploadIdMarker") or ""}

    async def list(self, prefix: str = "") -> list[Listed]:
        """The objects whose keys (under our prefix) begin with ``prefix``, in key order."""
        found: list[Listed] = []
        token: dict[str, str] = {}
        while True:
            query = {"list-type": "2", "prefix": self.config.prefix + prefix, **token}
            response = await self._call("GET", None, query=query, what="list objects")
            root = _xml(await self._ok(response, "list objects"), "list objects")
            for entry in root.iter(_NS + "Contents"):
                modified = (entry.findtext(_NS + "LastModified") or "").replace("Z", "+00:00")
                found.append(Listed((entry.findtext(_NS + "Key") or "").removeprefix(self.config.prefix),
                                    int(entry.findtext(_NS + "Size") or 0),
                                    datetime.fromisoformat(modified).timestamp()))
            following = root.findtext(_NS + "NextContinuationToken")
            if root.findtext(_NS + "IsTruncated") != "true" or not following:
                return found
            token = {"continuation-token": following}

    async def abort_upload(self, key: str, upload_id: str, retries: int | None = None) -> None:
        """Abort a multipart upload (one that is gone already is fine); one whose abort fails is retried by
        ``retry_aborts``."""
        try:
            await self._abort_upload(key, upload_id, retries)
        except StorageUnavailable:
            self._unaborted[(key, upload_id)] = None
            raise
        self._unaborted.pop((key, upload_id), None)

    async def retry_aborts(self) -> int:
        """Abort again the multipart uploads whose abort failed (the store was failing); how many are gone now.

        StorageUnavailable while the store still fails; those not aborted are tried again next time.
        """
        pending = list(self._unaborted)
        for key, upload_id in pending:
            await self.abort_upload(key, upload_id)
            log.info("Aborted the multipart upload of {key}, whose abort had failed", key=key)
        return len(pending)

    async def sweep_uploads(self, older_than: float, keep: Iterable[str] = ()) -> int:
        """Abort multipart uploads under our prefix begun more than ``older_than`` seconds ago.

        These are what a writer that crashed (or was killed) left behind; the
        count aborted is returned.  The uploads this process writes to, and
        those whose ids are in ``keep`` (other replicas' downloads in
        progress), are left alone; so are uploads outside the prefix, so a
        bucket shared with other software wants a prefix of our own.
        """
        cutoff = self._clock.seconds() - older_than
        live = self.writing | set(keep)
        stale = [upload for upload in await self.uploads()
                 if upload.initiated < cutoff and upload.upload_id not in live]
        for upload in stale:
            await self.abort_upload(upload.key, upload.upload_id)
            log.info("Aborted a stale multipart upload of {key}", key=upload.key)
        return len(stale)

    async def check_bucket(self) -> str:
        """``"bucket B at ENDPOINT: reachable"``; otherwise StorageUnavailable saying why in one line."""
        try:
            response = await self._call("GET", None, query={"max-keys": "0"}, what="list")
        except StoreFailing as e:
            raise StorageUnavailable(f"{self._where}: unreachable ({e.reason})") from None
        await self._ok(response, "list")
        return f"{self._where}: reachable"

    def check_bucket_now(self) -> str:
        """``check_bucket`` with one blocking request, for start-up before the reactor runs."""
        url = self._url(None, {"max-keys": "0"})
        request = AWSRequest(method="GET", url=url, headers={})
        request.context["payload_sha256"] = _EMPTY_SHA256
        _Signer(self._credentials, "s3", self.config.region).add_auth(request)
        # Like treq, never through a proxy from the environment.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(urllib.request.Request(url, headers=dict(request.headers.items())),
                             timeout=self._timeout) as answer:
                answer.read()
        except urllib.error.HTTPError as e:
            raise self._refusal(e.code, e.read(), "list") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", None) or e
            raise StorageUnavailable(f"{self._where}: unreachable ({reason})") from None
        return f"{self._where}: reachable"

    async def create_bucket(self) -> None:
        """Make the bucket (an existing bucket of ours is fine)."""
        response = await self._call("PUT", None, what="create bucket")
        body = await treq.content(response)
        if response.code != 200 and _error_code(body)[0] != "BucketAlreadyOwnedByYou":
            raise self._refusal(response.code, body, "create bucket")

    async def close(self) -> None:
        """Close the connections kept open to the store."""
        if self._pool is not None:
            await self._pool.closeCachedConnections()

    # Requests

    def _full(self, key: str) -> str:
        return self.config.prefix + key

    def _url(self, full_key: str | None, query: dict[str, str] | None = None) -> str:
        url = self._base + ("/" + quote(full_key, safe="/~") if full_key is not None else "/")
        if query:
            url += "?" + "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
                                  for k, v in query.items())
        return url

    async def _call(self, method: str, key: str | None, *, what: str,
                    query: dict[str, str] | None = None, headers: dict[str, str] | None = None,
                    body: bytes | None = None, payload_sha256: str | None = None,
                    retries: int | None = None) -> IResponse:
        """Send a signed request, retrying failures of the store; the response, body unread.

        Every request we make is idempotent (a repeated part or object PUT writes the
        same bytes again), so each may be retried; a retried CreateMultipartUpload
        can leave an empty upload behind, which ``sweep_uploads`` removes.  The
        tries together take at most the timeout: a retry starts only while time
        is left, and has what is left, so that a store that has gone silent is a
        503 after the timeout, not after a timeout per try.
        """
        url = self._url(None if key is None else self._full(key), query)
        if body is not None and payload_sha256 is None:
            payload_sha256 = hashlib.sha256(body).hexdigest()
        reason = ""
        retries = self.retries if retries is None else retries
        deadline = self._clock.seconds() + self._timeout
        tries = 0
        for attempt in range(retries + 1):
            if attempt:
                pause = self._backoff * 2 ** (attempt - 1)
                if self._clock.seconds() + pause >= deadline:
                    break
                await deferLater(self._clock, pause, lambda: None)
            tries += 1
            request = AWSRequest(method=method, url=url, headers=dict(headers or {}))
            request.context["payload_sha256"] = payload_sha256 or _EMPTY_SHA256
            _Signer(self._credentials, "s3", self.config.region).add_auth(request)
            try:
                response = await self._send(method, url, dict(request.headers.items()),
                                            None if body is None else BytesBody(body),
                                            deadline - self._clock.seconds())
            except _Failed as e:
                reason = str(e)
            else:
                if response.code not in _RETRIED:
                    return response
                code, _ = _error_code(await treq.content(response))
                reason = f"{response.code} {code}".rstrip()
            log.warn("S3 {what} at {endpoint} failed (try {attempt} of {tries}): {reason}",
                     what=what, endpoint=self.config.endpoint, attempt=attempt + 1,
                     tries=retries + 1, reason=reason)
        told = "once" if tries == 1 else f"{tries} times"
        raise StoreFailing(f"S3 {what} at {self.config.endpoint} failed {told}: {reason}",
                           f"{reason}, {tries} {'try' if tries == 1 else 'tries'}")

    async def _send(self, method: str, url: str, headers: dict[str, str],
                    body: IBodyProducer | None, timeout: float) -> IResponse:
        """One try, given up after ``timeout`` seconds without an answer; connection failures become ``_Failed``."""
        sent = self._http.request(method, url, headers=Headers({k: [v] for k, v in headers.items()}), data=body,
                                  unbuffered=True, allow_redirects=False)
        timed_out: list[bool] = []

        def expire() -> None:
            timed_out.append(True)
            sent.cancel()

        timer: IDelayedCall = self._clock.callLater(timeout, expire)
        silent = f"no answer in {timeout:.3g} s"
        try:
            return await sent
        except CancelledError:
            if timed_out:
                raise _Failed(silent) from None
            raise
        except _NETWORK as e:
            if timed_out:
                raise _Failed(silent) from None
            if _wraps_cancel(e):
                raise CancelledError() from None
            raise _Failed(describe(e)) from None
        finally:
            if timer.active():
                timer.cancel()

    def _refusal(self, status: int, body: bytes, what: str) -> StorageUnavailable:
        """The error for an answer we cannot use, named after the store's error code."""
        code, message = _error_code(body)
        if code in _CREDENTIALS or status == 403:
            why = _CREDENTIALS.get(code, "wrong credentials (403)")
        elif code == "NoSuchBucket":
            why = "missing"
        else:
            why = f"{what} answered {status} {code or message}".rstrip()
        return StorageUnavailable(f"{self._where}: {why}")

    async def _refused(self, response: IResponse, what: str) -> StorageUnavailable:
        """``_refusal`` for a response whose body is still to be read."""
        return self._refusal(response.code, await treq.content(response), what)

    async def _ok(self, response: IResponse, what: str, *also: int) -> bytes:
        """The body of a 200 answer (or one of the statuses ``also``); otherwise the refusal raised."""
        body: bytes = await treq.content(response)
        if response.code != 200 and response.code not in also:
            raise self._refusal(response.code, body, what)
        return body

    # Uploads

    async def _put(self, key: str, body: bytes, sha256: str) -> None:
        response = await self._call("PUT", key, body=body, payload_sha256=sha256, what=f"PUT {key}")
        await self._ok(response, f"PUT {key}")

    async def _create_upload(self, key: str) -> str:
        what = f"create multipart upload of {key}"
        response = await self._call("POST", key, query={"uploads": ""}, what=what)
        upload_id = _xml(await self._ok(response, what), what).findtext(_NS + "UploadId")
        if not upload_id:
            raise StorageUnavailable(f"{what}: no UploadId in the answer")
        return upload_id

    async def _upload_part(self, key: str, upload_id: str, number: int, body: bytes, sha256: str) -> str:
        what = f"upload part {number} of {key}"
        response = await self._call("PUT", key, query={"partNumber": str(number), "uploadId": upload_id},
                                    body=body, payload_sha256=sha256, what=what)
        await self._ok(response, what)
        etag = _header(response, "ETag")
        if etag is None:
            raise StorageUnavailable(f"{what}: no ETag in the answer")
        return etag

    async def _complete(self, key: str, upload_id: str, parts: Iterable[tuple[int, str]], size: int) -> None:
        what = f"complete multipart upload of {key}"
        document = "".join(f"<Part><PartNumber>{n}</PartNumber><ETag>{etag}</ETag></Part>"
                           for n, etag in parts)
        body = f"<CompleteMultipartUpload>{document}</CompleteMultipartUpload>".encode()
        response = await self._call("POST", key, query={"uploadId": upload_id}, body=body, what=what)
        answer = await treq.content(response)
        if response.code == 404 and _error_code(answer)[0] == "NoSuchUpload":
            # A retry after a completion whose answer was lost; the object tells.
            if await self.stat(key) == size:
                return
        if response.code != 200:
            raise self._refusal(response.code, answer, what)
        # S3 may answer 200 and still report an error in the body.  (Ceph RGW's
        # answer carries an empty ETag, so nothing here relies on it.)
        if _xml(answer, what).tag.endswith("Error"):
            raise StorageUnavailable(f"{self._where}: {what} failed: {_error_code(answer)[0]}")

    async def _abort_upload(self, key: str, upload_id: str, retries: int | None = None) -> None:
        what = f"abort multipart upload of {key}"
        response = await self._call("DELETE", key, query={"uploadId": upload_id}, what=what,
                                    retries=retries)
        await self._ok(response, what, 204, 404)


def _extent(response: IResponse) -> tuple[int, int, int]:
    """First and last byte positions of a GET answer, and the whole object's size."""
    content_range = _header(response, "Content-Range")
    if response.code == 206 and content_range:
        positions, _, total = content_range.removeprefix("bytes ").partition("/")
        first, _, last = positions.partition("-")
        return int(first), int(last), int(total)
    # Twisted keeps a GET's Content-Length to itself, as the response's length.
    size = response.length if isinstance(response.length, int) else 0
    return 0, size - 1, size


class ObjectBody:
    """The answer to ``open_range``: which bytes it holds, and a way to deliver them once."""

    def __init__(self, store: S3Store, key: str, response: IResponse, first: int, last: int,
                 size: int) -> None:
        self.key = key
        self.first = first
        self.last = last
        self.size = size
        self.partial = response.code == 206
        self._store = store
        self._response: IResponse | None = response

    @property
    def length(self) -> int:
        """How many bytes ``deliver`` writes."""
        return self.last - self.first + 1

    async def deliver(self, consumer: IConsumer) -> None:
        """Write the bytes to ``consumer``, which can pause the store's connection (backpressure).

        A connection that breaks or stalls midway is resumed from the next byte
        with a Range request (content-addressed objects never change), a bounded
        number of times.  When the consumer stops producing, delivery ends quietly.
        """
        response, self._response = self._response, None
        if response is None:
            raise ValueError(f"the body of {self.key} was delivered already")
        store = self._store
        sent = 0
        resumed = 0
        while True:
            relay = Relay(consumer, store._clock, store._timeout)
            response.deliverBody(relay)
            reason = ""
            try:
                await relay.done
            except CancelledError:
                raise
            except Exception as e:
                reason = "stalled" if relay.stalled else describe(e)
            sent += relay.received
            if (relay.stopped and not relay.stalled) or sent >= self.length:
                return
            reason = reason or f"{sent} of {self.length} bytes"
            if resumed == store.retries:
                raise StorageUnavailable(f"S3 GET {self.key} at {store.config.endpoint} broke off "
                                         f"after {sent} of {self.length} bytes: {reason}")
            resumed += 1
            log.warn("S3 GET {key} broke off after {sent} bytes ({reason}); resuming",
                     key=self.key, sent=sent, reason=reason)
            what = f"GET {self.key} from byte {self.first + sent}"
            response = await store._call("GET", self.key, what=what,
                                         headers={"Range": f"bytes={self.first + sent}-{self.last}"})
            if response.code != 206:
                raise await store._refused(response, what)

    def discard(self) -> None:
        """Drop a body that will not be delivered (closes its connection)."""
        response, self._response = self._response, None
        if response is not None:
            discard(response)


class S3Writer:
    """An object being uploaded: hashed as it is written, sent in parts, completed once verified.

    At most one part is held in memory: ``write`` uploads a full part before it
    returns, so a caller that awaits it is paced by the store.  An object
    smaller than one part is sent as a single PUT by ``commit``.
    """

    def __init__(self, store: S3Store, key: str, digest: str, limit: int | None,
                 began: Callable[[str, str], Awaitable[None]] | None = None) -> None:
        self.key = key
        self.digest = digest
        self.size = 0
        self._store = store
        self._limit = limit
        self._began = began
        self._hash = hashlib.new(digest.partition(":")[0])
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._part_hash = hashlib.sha256()
        self._upload_id: str | None = None
        self._parts: list[tuple[int, str]] = []
        self._finished = False
        self._aborted: Observable[None] | None = None
        self._creating: Observable[str] | None = None

    def actual_digest(self) -> str:
        """The digest of the bytes written so far."""
        return f"{self._hash.name}:{self._hash.hexdigest()}"

    async def write(self, data: bytes) -> None:
        """Take more bytes; a full part is uploaded before this returns.

        Raises SizeExceeded past the limit, and StorageUnavailable when the store
        keeps failing; either way the upload is aborted and the writer is done.
        """
        if self._finished:
            raise ValueError(f"the upload of {self.key} is finished")
        if self._limit is not None and self.size + len(data) > self._limit:
            await self.abort()
            raise SizeExceeded(f"{self.digest} is larger than {self._limit} bytes")
        self._hash.update(data)
        self._part_hash.update(data)
        self._chunks.append(data)
        self._buffered += len(data)
        self.size += len(data)
        if self._buffered >= self._store.part_size:
            await self._guarded(self._send_part())

    async def commit(self) -> str:
        """Verify the digest, then send what is left and complete the object; returns its key.

        A mismatch raises DigestMismatch and aborts: nothing becomes visible.
        """
        if self._finished:
            raise ValueError(f"the upload of {self.key} is finished")
        actual = self.actual_digest()
        if actual != self.digest:
            await self.abort()
            raise DigestMismatch(self.digest, actual)
        await self._guarded(self._finish())
        return self.key

    async def abort(self) -> None:
        """Give up: drop the buffer and abort the multipart upload, if one was begun.

        The abort is tried once (a writer is often aborted because the store is
        failing); a failed abort is logged, and tried again by ``retry_aborts``.
        A second call waits for the first one's abort to end.
        """
        if self._aborted is None:
            self._aborted = Observable()
            Deferred.fromCoroutine(self._abort()).addBoth(self._aborted.fire)
        await self._aborted.observe()

    async def _abort(self) -> None:
        self._finished = True
        self._chunks, self._buffered = [], 0
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is None and self._creating is not None:
            # Aborted while the store creates the upload: it is aborted once it exists.
            try:
                upload_id = await self._creating.observe()
            except Exception:
                upload_id = None
        if upload_id is None:
            return
        self._store.writing.discard(upload_id)
        try:
            await self._store.abort_upload(self.key, upload_id, retries=0)
        except StorageUnavailable as e:
            log.warn("Could not abort the upload of {key}: {error}", key=self.key, error=e.message)

    async def _guarded(self, work: Any) -> None:
        try:
            await work
        except BaseException:
            await self.abort()
            raise

    def _take(self) -> tuple[bytes, str]:
        body = b"".join(self._chunks)
        sha256 = self._part_hash.hexdigest()
        self._chunks, self._buffered, self._part_hash = [], 0, hashlib.sha256()
        return body, sha256

    async def _send_part(self) -> None:
        if self._upload_id is None:
            # Not cancelled with the writer: an abort waits for the upload id, to abort it.
            self._creating = Observable()
            Deferred.fromCoroutine(self._store._create_upload(self.key)).addBoth(self._creating.fire)
            self._upload_id = await self._creating.observe()
            self._store.writing.add(self._upload_id)
            if self._began is not None:
                await self._began(self.key, self._upload_id)
        body, sha256 = self._take()
        number = len(self._parts) + 1
        etag = await self._store._upload_part(self.key, self._upload_id, number, body, sha256)
        self._parts.append((number, etag))

    async def _finish(self) -> None:
        if self._upload_id is None:
            body, sha256 = self._take()
            await self._store._put(self.key, body, sha256)
        else:
            if self._buffered:
                await self._send_part()
            await self._store._complete(self.key, self._upload_id, self._parts, self.size)
            self._store.writing.discard(self._upload_id)
        self._finished = True
        self._upload_id = None
        log.debug("Stored {key} ({size} bytes)", key=self.key, size=self.size)
