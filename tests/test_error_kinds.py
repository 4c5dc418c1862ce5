"""The failures raised below the web layer, by class: what clients get for each, and which ones pass."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from ociregistry import errors
from ociregistry.errors import answer_for
from ociregistry.index import IndexBusy, IndexUnavailable
from ociregistry.store import StorageFull


class ErrorKindTests(SynchronousTestCase):
    """The classes that replaced hand-built statuses answer exactly what those statuses were."""

    def test_answers(self) -> None:
        """Each class answers the status, code and headers its raise sites gave by hand before."""
        expected = {
            errors.Unauthorized("token service answered 401"): (401, "UNAUTHORIZED", {}),
            errors.CredentialsUnavailable("helper gave nothing"): (502, "UNAUTHORIZED", {}),
            errors.ServiceUnavailable("shutting down"): (503, "UNAVAILABLE", {}),
            errors.ServiceUnavailable("too many lookups", retry_after=1): (503, "UNAVAILABLE", {b"Retry-After": b"1"}),
            errors.RateLimited("upstream", "Wed, 21 Oct 2026 07:28:00 GMT"):
                (429, "TOOMANYREQUESTS", {b"Retry-After": b"Wed, 21 Oct 2026 07:28:00 GMT"}),
            IndexBusy(): (503, "UNAVAILABLE", {}),
            IndexUnavailable("gone"): (503, "UNAVAILABLE", {}),
            StorageFull("no space left on device"): (507, "UNAVAILABLE", {}),
        }
        for error, (status, code, headers) in expected.items():
            answer = answer_for(error)
            self.assertEqual((answer.status, answer.code, answer.headers), (status, code, headers), repr(error))

    def test_transient(self) -> None:
        """Failures that may pass share a base; refusals and unknown names do not."""
        for error in (errors.Unavailable("x"), errors.TimedOut("x"), errors.RateLimited("x"),
                      errors.CredentialsUnavailable("x"), errors.ServiceUnavailable("x"), IndexBusy()):
            self.assertIsInstance(error, errors.Transient, repr(error))
        for error in (errors.Denied("x"), errors.Unauthorized("x"), errors.manifest_unknown("v1"),
                      errors.InvalidParameter("x"), errors.InvalidManifest("x"), StorageFull("x")):
            self.assertFalse(isinstance(error, errors.Transient), repr(error))

    def test_storage_full_is_insufficient_storage(self) -> None:
        """The store's and the index's full disk are the one InsufficientStorage of the mapping."""
        self.assertIsInstance(StorageFull("x"), errors.InsufficientStorage)
        self.assertIsInstance(IndexUnavailable("x"), errors.ServiceUnavailable)
