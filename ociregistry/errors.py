"""Errors that reach clients as OCI JSON error bodies.

Below the web layer, failures are raised as the classes here, named for what
went wrong (a manifest is unknown, an upstream is unavailable, ...).
`answer_for`, used at the edge, alone decides the HTTP status, the OCI error
code and the headers each of them is answered with.  `OCIError` itself,
raised with an explicit status and code, is the older form: it is the base
that every caller catches, and the mapping still understands it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class OCIAnswer:
    """What a client is told about a failure: status, OCI code, message, detail, headers."""

    status: int
    code: str
    message: str
    detail: Any = None
    headers: dict[bytes, bytes] = field(default_factory=dict)

    def body(self) -> bytes:
        """The JSON error document the distribution spec describes."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return json.dumps({"errors": [error]}).encode("utf-8")


class OCIError(Exception):
    """A failure shown to the client; raised directly, it carries its own status and code."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: Any = None,
        headers: dict[bytes, bytes] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self._given = (status, code, headers or {})

    @property
    def status(self) -> int:
        """The HTTP status the client gets."""
        return answer_for(self).status

    @property
    def code(self) -> str:
        """The OCI error code the client gets."""
        return answer_for(self).code

    @property
    def headers(self) -> dict[bytes, bytes]:
        """Headers that go with the answer (Retry-After, Content-Range)."""
        return answer_for(self).headers

    def body(self) -> bytes:
        """The JSON error document the distribution spec describes."""
        return answer_for(self).body()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.code!r}, {self.message!r})"


class RegistryError(OCIError):
    """A failure named for what went wrong; `answer_for` says how HTTP tells it."""

    def __init__(self, message: str, detail: Any = None) -> None:
        Exception.__init__(self, message)
        self.message = message
        self.detail = detail


class NotFound(RegistryError):
    """Nothing by that path: no such endpoint in the pull API."""


class ManifestUnknown(NotFound):
    """No manifest with that tag or digest, here or upstream."""


class BlobUnknown(NotFound):
    """No blob with that digest, here or upstream."""


class NameUnknown(NotFound):
    """No repository of that name, here or upstream."""


class InvalidName(RegistryError):
    """A repository or registry name that breaks the distribution grammar."""


class InvalidDigest(RegistryError):
    """A malformed digest, or one of an algorithm we do not verify."""


class InvalidParameter(RegistryError):
    """A query parameter the API cannot use."""


class Unsupported(RegistryError):
    """Push, delete and anything else a pull-only mirror does not do."""


class Denied(RegistryError):
    """The upstream, or our allow-list, refuses access."""


class Unauthorized(RegistryError):
    """The upstream's token service refuses the credentials it was given."""


class Transient(RegistryError):
    """A failure that may pass: asked again later, the same request may succeed.

    ``retry_after`` (seconds, or an HTTP date as an upstream sent it), when
    known, says when to try again.
    """

    def __init__(self, message: str, detail: Any = None, *, retry_after: int | str | None = None) -> None:
        super().__init__(message, detail)
        self.retry_after = retry_after


class Unavailable(Transient):
    """The upstream cannot be reached or failed."""


class TimedOut(Unavailable):
    """The upstream did not answer in time."""


class StorageUnavailable(Unavailable):
    """The shared object store cannot be reached, refuses us, or keeps failing."""


class RateLimited(Unavailable):
    """Too many requests; ``retry_after`` (seconds), when known, says when to try again."""

    def __init__(self, message: str, retry_after: int | str | None = None, detail: Any = None) -> None:
        super().__init__(message, detail, retry_after=retry_after)


class CredentialsUnavailable(Unavailable):
    """No credentials for an upstream could be had (its credential helper gave none)."""


class ServiceUnavailable(Transient):
    """This server cannot do it just now: it is shutting down, overloaded, or its index is unreachable."""


class TooManyConnections(RateLimited):
    """A client holds as many connections as one address may."""


class InvalidManifest(RegistryError):
    """An upstream sent a manifest we cannot use."""


class TooLarge(InvalidManifest):
    """An upstream sent a manifest larger than the configured limit."""


class DigestMismatch(RegistryError):
    """An upstream sent content that does not match the digest asked for."""


class InsufficientStorage(RegistryError):
    """The image path is full: new content cannot be stored."""


class RangeNotSatisfiable(RegistryError):
    """A Range header that asks for nothing inside a blob of ``size`` bytes."""

    def __init__(self, size: int) -> None:
        super().__init__("requested range not satisfiable", {"size": size})
        self.size = size


class Internal(RegistryError):
    """A failure of our own; the log says more."""


class BadRequest(RegistryError):
    """A request that is not well-formed HTTP."""


class HeadersTooLarge(RegistryError):
    """A request whose header fields exceed the limits."""


class URITooLong(RegistryError):
    """A request line longer than the limits."""


class RequestTimeout(RegistryError):
    """A request whose headers did not arrive in time."""


# The one place where a failure's HTTP status and OCI code are decided; the most
# specific class listed wins.
_ANSWERS: dict[type[RegistryError], tuple[int, str]] = {
    RegistryError: (500, "UNKNOWN"),
    NotFound: (404, "UNSUPPORTED"),
    ManifestUnknown: (404, "MANIFEST_UNKNOWN"),
    BlobUnknown: (404, "BLOB_UNKNOWN"),
    NameUnknown: (404, "NAME_UNKNOWN"),
    InvalidName: (400, "NAME_INVALID"),
    InvalidDigest: (400, "DIGEST_INVALID"),
    InvalidParameter: (400, "UNSUPPORTED"),
    Unsupported: (405, "UNSUPPORTED"),
    Denied: (403, "DENIED"),
    Unauthorized: (401, "UNAUTHORIZED"),
    Unavailable: (502, "UNAVAILABLE"),
    TimedOut: (504, "UNAVAILABLE"),
    StorageUnavailable: (503, "UNAVAILABLE"),
    RateLimited: (429, "TOOMANYREQUESTS"),
    CredentialsUnavailable: (502, "UNAUTHORIZED"),
    ServiceUnavailable: (503, "UNAVAILABLE"),
    InvalidManifest: (502, "MANIFEST_INVALID"),
    DigestMismatch: (502, "DIGEST_INVALID"),
    InsufficientStorage: (507, "UNAVAILABLE"),
    RangeNotSatisfiable: (416, "BLOB_UNKNOWN"),
    Internal: (500, "UNKNOWN"),
    BadRequest: (400, "UNSUPPORTED"),
    HeadersTooLarge: (431, "UNSUPPORTED"),
    URITooLong: (414, "UNSUPPORTED"),
    RequestTimeout: (408, "UNSUPPORTED"),
}


def answer_for(error: OCIError) -> OCIAnswer:
    """How a failure is answered: its status, OCI code, message, detail and headers."""
    if not isinstance(error, RegistryError):
        status, code, headers = error._given
        return OCIAnswer(status, code, error.message, error.detail, headers)
    kind = next(k for k in type(error).__mro__ if k in _ANSWERS)
    status, code = _ANSWERS[kind]
    extra: dict[bytes, bytes] = {}
    if isinstance(error, Transient) and error.retry_after is not None:
        extra[b"Retry-After"] = str(error.retry_after).encode("ascii")
    if isinstance(error, RangeNotSatisfiable):
        extra[b"Content-Range"] = f"bytes */{error.size}".encode("ascii")
    return OCIAnswer(status, code, error.message, error.detail, extra)


def name_invalid(message: str) -> InvalidName:
    """The repository name breaks the distribution grammar."""
    return InvalidName(message)


def digest_invalid(message: str) -> InvalidDigest:
    """The digest is malformed or uses an algorithm we do not verify."""
    return InvalidDigest(message)


def manifest_unknown(reference: str) -> ManifestUnknown:
    """No manifest with that tag or digest, here or upstream."""
    return ManifestUnknown("manifest unknown", {"reference": reference})


def blob_unknown(digest: str) -> BlobUnknown:
    """No blob with that digest, here or upstream."""
    return BlobUnknown("blob unknown to registry", {"digest": digest})


def name_unknown(name: str) -> NameUnknown:
    """No repository of that name, here or upstream."""
    return NameUnknown("repository name not known to registry", {"name": name})


def unsupported(message: str) -> Unsupported:
    """Push, delete and anything else a pull-only mirror does not do."""
    return Unsupported(message)


def not_found() -> NotFound:
    """A path that names no API endpoint."""
    return NotFound("no such endpoint in the pull API")
