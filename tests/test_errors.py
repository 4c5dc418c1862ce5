"""The one mapping from failures to OCI answers."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from ociregistry import errors
from ociregistry.errors import OCIError, answer_for


class MappingTests(SynchronousTestCase):
    """Each failure class gets its status, code and headers from `answer_for` alone."""

    def test_domain_classes(self) -> None:
        """Every class below the web layer maps to the status and OCI code clients expect."""
        expected = {
            errors.manifest_unknown("v1"): (404, "MANIFEST_UNKNOWN"),
            errors.blob_unknown("sha256:x"): (404, "BLOB_UNKNOWN"),
            errors.name_unknown("app"): (404, "NAME_UNKNOWN"),
            errors.not_found(): (404, "UNSUPPORTED"),
            errors.name_invalid("bad"): (400, "NAME_INVALID"),
            errors.digest_invalid("bad"): (400, "DIGEST_INVALID"),
            errors.unsupported("no push"): (405, "UNSUPPORTED"),
            errors.Denied("not allowed"): (403, "DENIED"),
            errors.Unavailable("refused"): (502, "UNAVAILABLE"),
            errors.TimedOut("silent"): (504, "UNAVAILABLE"),
            errors.RateLimited("slow down"): (429, "TOOMANYREQUESTS"),
            errors.TooLarge("big"): (502, "MANIFEST_INVALID"),
            errors.DigestMismatch("wrong"): (502, "DIGEST_INVALID"),
            errors.InsufficientStorage("full"): (507, "UNAVAILABLE"),
            errors.Internal("oops"): (500, "UNKNOWN"),
            errors.RegistryError("unclassified"): (500, "UNKNOWN"),
            errors.HeadersTooLarge("big"): (431, "UNSUPPORTED"),
            errors.URITooLong("long"): (414, "UNSUPPORTED"),
            errors.RequestTimeout("slow"): (408, "UNSUPPORTED"),
            errors.TooManyConnections("greedy"): (429, "TOOMANYREQUESTS"),
        }
        for error, (status, code) in expected.items():
            answer = answer_for(error)
            self.assertEqual((answer.status, answer.code), (status, code), repr(error))
            # Callers that still read the attributes of OCIError see the same answer.
            self.assertEqual((error.status, error.code), (status, code))
            self.assertIsInstance(error, OCIError)

    def test_headers_come_from_the_mapping(self) -> None:
        """Retry-After follows a known retry time; a 416 names the blob's size in Content-Range."""
        self.assertEqual(answer_for(errors.RateLimited("slow", retry_after=7)).headers, {b"Retry-After": b"7"})
        self.assertEqual(answer_for(errors.RateLimited("slow")).headers, {})
        unsatisfiable = answer_for(errors.RangeNotSatisfiable(100))
        self.assertEqual((unsatisfiable.status, unsatisfiable.headers), (416, {b"Content-Range": b"bytes */100"}))
        self.assertEqual(json.loads(unsatisfiable.body())["errors"][0]["detail"], {"size": 100})

    def test_explicit_oci_error_is_understood(self) -> None:
        """An OCIError raised with its own status, code and headers is answered with exactly those."""
        error = OCIError(429, "TOOMANYREQUESTS", "upstream is rate limiting", headers={b"Retry-After": b"3"})
        answer = answer_for(error)
        self.assertEqual((answer.status, answer.code, answer.headers), (429, "TOOMANYREQUESTS", {b"Retry-After": b"3"}))
        self.assertEqual((error.status, error.code, error.headers), (429, "TOOMANYREQUESTS", {b"Retry-After": b"3"}))

    def test_body(self) -> None:
        """The body is the spec's error document, with the detail when there is one."""
        body = json.loads(errors.manifest_unknown("v1").body())
        self.assertEqual(body, {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown",
                                            "detail": {"reference": "v1"}}]})
        self.assertNotIn("detail", json.loads(errors.Unavailable("refused").body())["errors"][0])
