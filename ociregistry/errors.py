"""Errors that reach clients as OCI JSON error bodies."""

from __future__ import annotations

import json
from typing import Any


class OCIError(Exception):
    """A failure with an HTTP status and an OCI error code, shown to the client."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: Any = None,
        headers: dict[bytes, bytes] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> bytes:
        """The JSON error document the distribution spec describes."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return json.dumps({"errors": [error]}).encode("utf-8")

    def __repr__(self) -> str:
        return f"OCIError({self.status}, {self.code!r}, {self.message!r})"


def name_invalid(message: str) -> OCIError:
    """The repository name breaks the distribution grammar."""
    return OCIError(400, "NAME_INVALID", message)


def digest_invalid(message: str) -> OCIError:
    """The digest is malformed or uses an algorithm we do not verify."""
    return OCIError(400, "DIGEST_INVALID", message)


def manifest_unknown(reference: str) -> OCIError:
    """No manifest with that tag or digest, here or upstream."""
    return OCIError(404, "MANIFEST_UNKNOWN", "manifest unknown", {"reference": reference})


def blob_unknown(digest: str) -> OCIError:
    """No blob with that digest, here or upstream."""
    return OCIError(404, "BLOB_UNKNOWN", "blob unknown to registry", {"digest": digest})


def name_unknown(name: str) -> OCIError:
    """No repository of that name, here or upstream."""
    return OCIError(404, "NAME_UNKNOWN", "repository name not known to registry", {"name": name})


def unsupported(message: str, status: int = 405) -> OCIError:
    """Push, delete and anything else a pull-only mirror does not do."""
    return OCIError(status, "UNSUPPORTED", message)


def not_found() -> OCIError:
    """A path that names no API endpoint."""
    return OCIError(404, "UNSUPPORTED", "no such endpoint in the pull API")
