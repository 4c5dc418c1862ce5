"""Names, references, digests and upstream selection."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from ociregistry.errors import OCIError
from ociregistry.grammar import (
    Route,
    Upstream,
    check_digest,
    check_reference,
    check_repository,
    looks_like_host,
    parse_path,
    resolve_upstream,
)


class ResolveUpstreamTests(SynchronousTestCase):
    """Which registry and repository a request names."""

    def test_table(self) -> None:
        """ns=, in-path host, default namespace and Docker Hub's library/ prefix."""
        cases = [
            (("library/nginx", "docker.io", "docker.io"), ("docker.io", "library/nginx")),
            (("nginx", None, "docker.io"), ("docker.io", "library/nginx")),
            (("docker.io/nginx", None, "quay.io"), ("docker.io", "library/nginx")),
            (("quay.io/org/img", None, "docker.io"), ("quay.io", "org/img")),
            (("org/team/sub/img", "ghcr.io", "docker.io"), ("ghcr.io", "org/team/sub/img")),
            (("img", "localhost:5000", "docker.io"), ("localhost:5000", "img")),
            (("localhost/img", None, "docker.io"), ("localhost", "img")),
            (("my.app", None, "docker.io"), ("docker.io", "library/my.app")),
            (("team/my.app", None, "127.0.0.1:5000"), ("127.0.0.1:5000", "team/my.app")),
            (("x", "INDEX.DOCKER.IO", "quay.io"), ("docker.io", "library/x")),
            (("registry.k8s.io/pause", None, "docker.io"), ("registry.k8s.io", "pause")),
        ]
        for (name, ns, default), (registry, repository) in cases:
            self.assertEqual(resolve_upstream(name, ns, default), Upstream(registry, repository), name)

    def test_invalid(self) -> None:
        """Bad names and hosts are NAME_INVALID, never a path outside the cache."""
        for name, ns in [("Upper/case", None), ("a/../b", None), ("a//b", None), ("..", None),
                         ("quay.io/", None), ("img", "bad host"), ("img", "h:99999"), ("-a", None)]:
            with self.assertRaises(OCIError) as caught:
                resolve_upstream(name, ns, "docker.io")
            self.assertEqual(caught.exception.code, "NAME_INVALID", name)


class CanonicalHostTests(SynchronousTestCase):
    """Only canonical spellings of addresses name an upstream."""

    # Each is read by resolvers as an address other than the one a person sees,
    # or as an address at all where a person sees a name.
    REFUSED = [
        "0x7f.0.0.1",         # hex: 127.0.0.1
        "0177.0.000.1",       # octal: 127.0.0.1
        "0127.0.0.1",         # octal: 87.0.0.1, a public address
        "127.1",              # short form: 127.0.0.1
        "127.0.1",            # short form: 127.0.0.1
        "2130706433",         # one number: 127.0.0.1
        "0x7f000001",         # one hex number
        "127.0.0.01",         # leading zero in the last part
        "256.0.0.1",          # out of range
        "1.2.3.4.5",          # five parts
        "registry.0x10",      # a name whose last label is a number
        "example.123",
        "[::ffff:0177.0.0.1]",  # octal inside IPv6
        "[::1::2]",           # not an IPv6 address
    ]

    def test_refused(self) -> None:
        """Octal, hex, short and out-of-range forms are NAME_INVALID, wherever a client names an upstream."""
        for host in self.REFUSED:
            for spelling in (host, f"{host}:5000"):
                # In a path, a component names a host only with a dot or a port.
                forms = [("img", spelling)] + ([(f"{spelling}/img", None)] if looks_like_host(spelling) else [])
                for name, ns in forms:
                    with self.assertRaises(OCIError) as caught:
                        resolve_upstream(name, ns, "docker.io")
                    self.assertEqual((caught.exception.status, caught.exception.code), (400, "NAME_INVALID"), name)
            self.assertIn("registry host", caught.exception.message)

    def test_accepted(self) -> None:
        """Canonical addresses and ordinary names still name upstreams."""
        for host in ["127.0.0.1", "10.0.0.255", "0.0.0.0", "[::1]", "[::ffff:127.0.0.1]", "reg1.example.com",
                     "1password.com", "123.example", "x0x7f.example"]:
            self.assertEqual(resolve_upstream("img", f"{host}:5000", "docker.io").registry, f"{host}:5000")


class ReferenceTests(SynchronousTestCase):
    """Tags keep their case; digests must be verifiable."""

    def test_tags(self) -> None:
        """Valid tags pass unchanged, invalid ones are MANIFEST_UNKNOWN."""
        for tag in ["latest", "v1.0-RC", "UPPER", "_x", "a" * 128]:
            self.assertEqual(check_reference(tag), tag)
        for tag in [".INVALID_MANIFEST_NAME", "-x", "a" * 129, "a/b", ""]:
            with self.assertRaises(OCIError) as caught:
                check_reference(tag)
            self.assertEqual(caught.exception.status, 404)

    def test_digests(self) -> None:
        """sha256 and sha512 of the right length in lowercase hex; anything else is DIGEST_INVALID."""
        self.assertEqual(check_digest("sha256:" + "a" * 64), "sha256:" + "a" * 64)
        self.assertEqual(check_digest("sha512:" + "0" * 128), "sha512:" + "0" * 128)
        for digest in ["sha256:baddigest", "sha256:" + "A" * 64, "md5:" + "a" * 32, "sha256:" + "a" * 63,
                       "sha256:../../../etc/passwd", "sha256:"]:
            with self.assertRaises(OCIError) as caught:
                check_digest(digest)
            self.assertEqual(caught.exception.code, "DIGEST_INVALID", digest)

    def test_repository_length(self) -> None:
        """Names longer than 255 characters are refused."""
        with self.assertRaises(OCIError):
            check_repository("a" * 256)


class ParsePathTests(SynchronousTestCase):
    """Routes are read from the end of the path."""

    def test_routes(self) -> None:
        """Manifests, blobs and tags at any depth, even with endpoint words in the name."""
        self.assertEqual(parse_path("a/b/c/manifests/v1".split("/")), Route("manifests", "a/b/c", "v1"))
        self.assertEqual(parse_path("manifests/manifests/x".split("/")), Route("manifests", "manifests", "x"))
        self.assertEqual(parse_path("a/blobs/sha256:x".split("/")), Route("blobs", "a", "sha256:x"))
        self.assertEqual(parse_path("a/b/tags/list".split("/")), Route("tags", "a/b", ""))

    def test_unknown(self) -> None:
        """Anything else is a 404 with an OCI error."""
        for path in ["a", "a/b", "_catalog", "a/referrers/x/y"]:
            with self.assertRaises(OCIError) as caught:
                parse_path(path.split("/"))
            self.assertEqual(caught.exception.status, 404, path)

    def test_uploads(self) -> None:
        """Upload endpoints are 405 UNSUPPORTED: this is a pull-only registry."""
        for path in ["a/blobs/uploads/", "a/b/blobs/uploads/1234", "a/blobs/uploads"]:
            with self.assertRaises(OCIError) as caught:
                parse_path(path.split("/"))
            self.assertEqual((caught.exception.status, caught.exception.code), (405, "UNSUPPORTED"), path)
