"""Black-box pull conformance, after the OCI distribution-spec conformance suite's pull workflow.

The content is pushed to a real docker-registry as the suite's setup pushes it
(config blob, layer blob, manifest under a tag, plus an index), and every
request goes to our twistd server, which pulls it through.  The range cases
are REFERENCE §2's table, on a cached blob and on blobs the request itself
makes the server fetch.  The upstream and the server are started once for the
whole module (on free ports of 127.0.0.1, named with ns=); the harness kills
them when the test run ends.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from twisted.trial.unittest import TestCase
from twisted.web.iweb import IResponse

from tests.realparts import (
    MANIFEST_ACCEPT,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    SPEC_ERROR_CODES,
    Registry,
    Server,
    digest_of,
    free_port,
    http_request,
    upload_blob,
    upload_manifest,
)

REPOSITORY = "conformance/app"
TAG = "tagTest0"
DUMMY_DIGEST = "sha256:" + "0" * 64
NONEXISTENT_MANIFEST = ".INVALID_MANIFEST_NAME"
# REFERENCE §2 on a 2048-byte blob: Range header, status, Content-Range, slice sent.
RANGES = [
    ("bytes=500-1499", 206, "bytes 500-1499/2048", slice(500, 1500)),
    ("bytes=500-", 206, "bytes 500-2047/2048", slice(500, 2048)),
    ("bytes=-500", 206, "bytes 1548-2047/2048", slice(1548, 2048)),
    ("bytes=2000-5000", 206, "bytes 2000-2047/2048", slice(2000, 2048)),
    ("bytes=500-0", 416, "bytes */2048", None),
    ("bytes=5000-", 416, "bytes */2048", None),
]


@dataclass
class Environment:
    """The upstream holding the suite's content, and our server in front of it."""

    server: Server
    upstream: str
    config: bytes
    layer: bytes
    manifest: bytes
    index: bytes
    cold: dict[str, bytes]

    def url(self, path: str, repository: str = REPOSITORY, ns: bool = True) -> str:
        """Our server's URL for a path below /v2/<repository>, naming the upstream with ns=."""
        url = f"{self.server.url}/v2/{repository}{path}"
        return url + ("&" if "?" in path else "?") + urlencode({"ns": self.upstream}) if ns else url

    def manifests(self) -> list[tuple[str, bytes, str]]:
        """(reference, bytes, media type) of each manifest, by digest and by tag."""
        return [(digest_of(self.manifest), self.manifest, OCI_MANIFEST), (TAG, self.manifest, OCI_MANIFEST),
                (digest_of(self.index), self.index, OCI_INDEX), ("multi", self.index, OCI_INDEX)]


_shared: list[Environment] = []


async def environment() -> Environment:
    """Start the upstream and our server and push the content, once per test run."""
    if _shared:
        return _shared[0]
    base = tempfile.mkdtemp(prefix="conformance-", dir=os.getcwd())
    registry = Registry(os.path.join(base, "registry"), address="127.0.0.1", port=free_port(),
                        tls=None, client_ca=None, htpasswd_users=None, token=None)
    await registry.start()
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers",
                                                                           "diff_ids": []}}).encode()
    layer = os.urandom(2048)
    for blob in (config, layer):
        await upload_blob(registry, REPOSITORY, blob)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": digest_of(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": digest_of(layer), "size": len(layer)}],
    }).encode()
    await upload_manifest(registry, REPOSITORY, TAG, OCI_MANIFEST, manifest)
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [{
        "mediaType": OCI_MANIFEST, "digest": digest_of(manifest), "size": len(manifest),
        "platform": {"architecture": "amd64", "os": "linux"}}]}).encode()
    await upload_manifest(registry, REPOSITORY, "multi", OCI_INDEX, index)
    cold = {}
    for case in [header for header, *_ in RANGES] + ["HEAD", "GET"]:
        content = os.urandom(2048)
        cold[case] = content
        await upload_blob(registry, REPOSITORY, content)
    with open(os.path.join(base, "config.json"), "w") as f:
        json.dump({"registries": [{"name": registry.host, "scheme": "http"}]}, f)
    run_dir = os.path.join(base, "server")
    os.makedirs(run_dir)
    server = Server(os.path.join(base, "cache"), ["--config-file", os.path.join(base, "config.json")],
                    free_port(), run_dir)
    await server.start()
    _shared.append(Environment(server, registry.host, config, layer, manifest, index, cold))
    return _shared[0]


def length(response: IResponse) -> int | None:
    """The Content-Length of a response (Twisted's client moves a GET's into `length`)."""
    header = response.headers.getRawHeaders("content-length")
    if header:
        return int(header[0])
    return response.length if isinstance(response.length, int) else None


def header(response: IResponse, name: str) -> str | None:
    """One response header, or None."""
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


class PullConformanceTests(TestCase):
    """The spec's pull workflow against our server in front of a real registry."""

    timeout = 60

    async def request(self, method: str, path: str, repository: str = REPOSITORY,
                      **headers: str) -> tuple[IResponse, bytes]:
        env = await environment()
        sent: dict[str | bytes, str | bytes] = {name: value for name, value in headers.items()}
        return await http_request(method, env.url(path, repository), headers=sent)

    def assert_error(self, response: IResponse, body: bytes, status: int | tuple[int, ...],
                     code: str | None = None, what: str = "") -> None:
        """An error status with the spec's JSON body; `code` if given, else any spec code."""
        what = f"{what} answered {response.code} {body[:200]!r}"
        self.assertIn(response.code, status if isinstance(status, tuple) else (status,), what)
        errors: list[dict[str, Any]] = json.loads(body)["errors"]
        self.assertIn(errors[0]["code"], {code} if code else SPEC_ERROR_CODES, what)
        self.assertEqual(header(response, "content-type"), "application/json", what)

    async def test_base(self) -> None:
        """GET /v2/ answers 200 with the API version header."""
        env = await environment()
        response, _ = await http_request("GET", env.server.url + "/v2/")
        self.assertEqual(response.code, 200)
        self.assertEqual(header(response, "docker-distribution-api-version"), "registry/2.0")

    async def test_head_nonexistent_blob(self) -> None:
        """HEAD of a nonexistent blob is 404 without a body."""
        response, body = await self.request("HEAD", f"/blobs/{DUMMY_DIGEST}")
        self.assertEqual((response.code, body), (404, b""))

    async def test_head_blob(self) -> None:
        """HEAD of an existing (uncached) blob is 200 with its digest and true length, no body."""
        env = await environment()
        content = env.cold["HEAD"]
        response, body = await self.request("HEAD", f"/blobs/{digest_of(content)}")
        self.assertEqual((response.code, body), (200, b""))
        self.assertEqual(header(response, "docker-content-digest"), digest_of(content))
        self.assertEqual(length(response), len(content))

    async def test_get_nonexistent_blob(self) -> None:
        """GET of a nonexistent blob is 404 BLOB_UNKNOWN."""
        response, body = await self.request("GET", f"/blobs/{DUMMY_DIGEST}")
        self.assert_error(response, body, 404, "BLOB_UNKNOWN")

    async def test_get_blob(self) -> None:
        """GET of the config and layer blobs is 200 with their bytes and the blob headers."""
        env = await environment()
        for content in (env.config, env.layer, env.cold["GET"]):
            response, body = await self.request("GET", f"/blobs/{digest_of(content)}")
            self.assertEqual((response.code, body), (200, content))
            self.assertEqual(header(response, "docker-content-digest"), digest_of(content))
            self.assertEqual(header(response, "content-type"), "application/octet-stream")
            self.assertEqual(header(response, "accept-ranges"), "bytes")
            self.assertEqual(length(response), len(content))

    async def test_head_nonexistent_manifest(self) -> None:
        """HEAD of an invalid tag is 404 without a body."""
        response, body = await self.request("HEAD", f"/manifests/{NONEXISTENT_MANIFEST}")
        self.assertEqual((response.code, body), (404, b""))

    async def test_head_manifest(self) -> None:
        """HEAD of each manifest by digest and by tag: 200, digest, media type, true length, no body."""
        for reference, content, media_type in (await environment()).manifests():
            response, body = await self.request("HEAD", f"/manifests/{reference}", Accept=MANIFEST_ACCEPT)
            self.assertEqual((response.code, body), (200, b""), reference)
            self.assertEqual(header(response, "docker-content-digest"), digest_of(content), reference)
            self.assertEqual(header(response, "content-type"), media_type, reference)
            self.assertEqual(length(response), len(content), reference)

    async def test_get_nonexistent_manifest(self) -> None:
        """GET of an invalid tag, and of a valid tag nobody pushed, is 404 MANIFEST_UNKNOWN."""
        for reference in (NONEXISTENT_MANIFEST, "nosuchtag"):
            response, body = await self.request("GET", f"/manifests/{reference}")
            self.assert_error(response, body, 404, "MANIFEST_UNKNOWN")

    async def test_get_manifest(self) -> None:
        """GET of each manifest by digest and by tag: the exact bytes, digest and media type."""
        for reference, content, media_type in (await environment()).manifests():
            response, body = await self.request("GET", f"/manifests/{reference}", Accept=OCI_MANIFEST)
            self.assertEqual((response.code, body), (200, content), reference)
            self.assertEqual(header(response, "docker-content-digest"), digest_of(content), reference)
            self.assertEqual(header(response, "content-type"), media_type, reference)

    async def test_tag_case_kept(self) -> None:
        """A tag differing only in case is another tag: not found."""
        response, body = await self.request("GET", f"/manifests/{TAG.lower()}")
        self.assert_error(response, body, 404, "MANIFEST_UNKNOWN")

    async def test_registry_header(self) -> None:
        """An X-Registry header names the upstream as ns= does."""
        env = await environment()
        response, body = await http_request("GET", env.url(f"/manifests/{TAG}", ns=False),
                                            headers={"X-Registry": env.upstream})
        self.assertEqual((response.code, body), (200, env.manifest))

    async def test_invalid_digest(self) -> None:
        """A malformed digest is 400 or 404 with a spec error code, for manifests and blobs."""
        for path in ("/manifests/sha256:totallywrong", "/blobs/sha256:baddigest", "/blobs/md5:0000"):
            response, body = await self.request("GET", path)
            self.assert_error(response, body, (400, 404))

    async def test_push_and_delete_unsupported(self) -> None:
        """A pull-only mirror answers push, uploads and delete with 405 UNSUPPORTED."""
        env = await environment()
        cases = [("PUT", f"/manifests/{TAG}"), ("DELETE", f"/manifests/{digest_of(env.manifest)}"),
                 ("DELETE", f"/blobs/{digest_of(env.layer)}"), ("POST", "/blobs/uploads/"),
                 ("PATCH", "/blobs/uploads/5f0e6d4c"), ("PUT", f"/blobs/uploads/5f0e6d4c?digest={DUMMY_DIGEST}")]
        for method, path in cases:
            response, body = await self.request(method, path)
            self.assert_error(response, body, 405, "UNSUPPORTED", f"{method} {path}")

    async def test_tags_list(self) -> None:
        """The tag list names the repository as asked and holds the pushed tags."""
        response, body = await self.request("GET", "/tags/list")
        self.assertEqual(response.code, 200)
        listing = json.loads(body)
        self.assertEqual((listing["name"], sorted(listing["tags"])), (REPOSITORY, sorted([TAG, "multi"])))

    async def test_tags_list_unknown_repository(self) -> None:
        """The tag list of a repository the upstream does not have is 404 NAME_UNKNOWN."""
        response, body = await self.request("GET", "/tags/list", repository="no/such/repo")
        self.assert_error(response, body, 404, "NAME_UNKNOWN")

    async def test_ranges_cached(self) -> None:
        """The RFC 9110 range table on a cached blob."""
        env = await environment()
        path = f"/blobs/{digest_of(env.layer)}"
        await self.request("GET", path)
        for range_, status, content_range, part in RANGES:
            response, body = await self.request("GET", path, Range=range_)
            self.check_range(response, body, env.layer, status, content_range, part, range_)

    async def test_ranges_uncached(self) -> None:
        """The range table on blobs the ranged request itself makes the server fetch."""
        env = await environment()
        for range_, status, content_range, part in RANGES:
            content = env.cold[range_]
            response, body = await self.request("GET", f"/blobs/{digest_of(content)}", Range=range_)
            self.check_range(response, body, content, status, content_range, part, range_)

    def check_range(self, response: IResponse, body: bytes, content: bytes, status: int,
                    content_range: str, part: slice | None, range_: str) -> None:
        """One row of the range table."""
        self.assertEqual(response.code, status, range_)
        self.assertEqual(header(response, "content-range"), content_range, range_)
        if part is not None:
            self.assertEqual(body, content[part], range_)
            self.assertEqual(length(response), len(content[part]), range_)
