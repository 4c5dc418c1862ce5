"""Reference rows stay right when three replicas pull images that share layers at once.

The index keeps what each manifest refers to in ``manifest_refs`` (an index to its platform
manifests, an image manifest to its config and layers); ``blob_refcounts`` counts those rows per
cached blob, and pruning drops a blob whose count is zero.  After concurrent pulls of the same
tags and digests through different replicas, every row is compared with a recount from the
manifests themselves, read back from the bucket.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg
from twisted.internet.defer import Deferred, gatherResults

from ociregistry.s3 import key_for
from tests.realparts import (
    MANIFEST_ACCEPT,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    Registry,
    Server,
    WebClient,
    digest_of,
    free_port,
    start_registry,
    upload_blob,
    upload_manifest,
)
from tests.services import ReplicaTestCase, bucket_objects, until
from tests.test_load import run_cli

KIB = 1024
REPLICAS = ("a", "b", "c")


@dataclass
class Published:
    """An image the upstream holds: its tag, top digest, and every manifest and blob under it."""

    repository: str
    tag: str
    digest: str = ""
    manifests: dict[str, bytes] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)


async def publish_image(registry: Registry, image: Published, config: bytes, layers: list[bytes],
                        tag: str | None = None) -> dict[str, Any]:
    """Upload an image manifest's blobs and the manifest (under ``tag``, or its digest): its descriptor."""
    web = WebClient()
    try:
        for blob in [config, *layers]:
            image.blobs[await upload_blob(registry, image.repository, blob, web)] = blob
    finally:
        await web.close()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": digest_of(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": digest_of(layer), "size": len(layer)} for layer in layers],
    }).encode()
    digest = await upload_manifest(registry, image.repository, tag or digest_of(manifest), OCI_MANIFEST, manifest)
    image.manifests[digest] = manifest
    if tag is not None:
        image.digest = digest
    return {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(manifest)}


async def publish_images(registry: Registry) -> list[Published]:
    """Three images whose layers overlap, one of them an OCI index of two platforms."""
    shared, common = os.urandom(200 * KIB), os.urandom(40 * KIB)
    one, two, three = Published("team/one", "v1"), Published("team/two", "v1"), Published("team/three", "v1")
    await publish_image(registry, one, b'{"image": "one"}', [shared, os.urandom(30 * KIB)], one.tag)
    await publish_image(registry, two, b'{"image": "two"}', [shared, common, os.urandom(20 * KIB)], two.tag)
    entries = []
    for os_, arch, layer in (("linux", "amd64", common), ("linux", "arm64", shared)):
        descriptor = await publish_image(registry, three, json.dumps({"image": "three", "arch": arch}).encode(),
                                         [layer, os.urandom(10 * KIB)])
        entries.append({**descriptor, "platform": {"os": os_, "architecture": arch}})
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    three.digest = await upload_manifest(registry, three.repository, three.tag, OCI_INDEX, index)
    three.manifests[three.digest] = index
    return [one, two, three]


async def pull(web: WebClient, server: Server, ns: str, repository: str, reference: str) -> set[str]:
    """Pull every platform of an image like a client, verifying each digest: the digests pulled."""
    response = await web.client.get(f"{server.url}/v2/{repository}/manifests/{reference}",
                                    params={"ns": ns}, headers={"Accept": MANIFEST_ACCEPT})
    content = await response.content()
    assert response.code == 200, (server.url, repository, reference, response.code, content)
    digest = response.headers.getRawHeaders("docker-content-digest")[0]
    assert digest_of(content) == digest and reference in (digest, reference.partition("@")[0]), reference
    document = json.loads(content)
    pulled = {digest}
    for entry in document.get("manifests", []):
        pulled |= await pull(web, server, ns, repository, entry["digest"])
    for descriptor in [document["config"], *document["layers"]] if "config" in document else []:
        response = await web.client.get(f"{server.url}/v2/{repository}/blobs/{descriptor['digest']}",
                                        params={"ns": ns})
        hashed = hashlib.sha256()
        await response.collect(hashed.update)
        assert response.code == 200 and f"sha256:{hashed.hexdigest()}" == descriptor["digest"], descriptor
        pulled.add(descriptor["digest"])
    return pulled


def _platform(entry: dict[str, Any]) -> str | None:
    platform = entry.get("platform") or {}
    return "/".join(p for p in (platform.get("os"), platform.get("architecture"), platform.get("variant")) if p) or None


class ConcurrentReferenceTests(ReplicaTestCase):
    """Three replicas on one index pull overlapping images at once; the reference rows match the manifests."""

    timeout = 180

    async def recount(self) -> tuple[set[tuple[Any, ...]], set[tuple[Any, ...]], dict[str, int], Counter[str]]:
        """(manifest_refs rows, rows recounted from the manifests in the bucket, blob_refcounts, recounted counts)."""
        with psycopg.connect(self.database) as db:
            manifests = [digest for (digest,) in db.execute("SELECT digest FROM manifests")]
            rows = set(db.execute("SELECT manifest, child, kind, media_type, size, platform FROM manifest_refs"))
            counts = {digest: count for digest, _, count in db.execute("SELECT digest, size, refcount FROM blob_refcounts")}
        expected: set[tuple[Any, ...]] = set()
        for digest in manifests:
            content = await self.s3.read(key_for(digest))
            assert content is not None and digest_of(content) == digest, digest
            document = json.loads(content)
            expected |= {(digest, e["digest"], "manifest", e["mediaType"], e["size"], _platform(e))
                         for e in document.get("manifests", [])}
            if "config" in document:
                expected |= {(digest, d["digest"], kind, d["mediaType"], d["size"], None)
                             for kind, d in [("config", document["config"]),
                                             *(("layer", layer) for layer in document["layers"])]}
        recounted = Counter(child for _, child, kind, *_ in expected if kind != "manifest")
        return rows, expected, counts, recounted

    async def assert_references_right(self, images: list[Published]) -> None:
        """Every reference row and count matches the manifests, and every object of these images is there."""
        rows, expected, counts, recounted = await self.recount()
        self.assertEqual(rows, expected)
        self.assertEqual(counts, dict(recounted))
        with psycopg.connect(self.database) as db:
            cached = {digest for (digest,) in db.execute("SELECT digest FROM manifests")}
            tags = set(db.execute("SELECT repository, tag, digest FROM tags"))
        self.assertEqual(cached, {d for image in images for d in image.manifests})
        self.assertEqual(tags, {(image.repository, image.tag, image.digest) for image in images})
        objects = await bucket_objects(self.s3)
        self.assertEqual(set(objects), {key_for(d) for image in images for d in [*image.manifests, *image.blobs]})

    async def test_concurrent_pulls_through_three_replicas(self) -> None:
        """Overlapping images pulled at once through 3 replicas (same tags and digests, repeated) leave reference rows
        that match the manifests; a prune with nothing unreferenced removes nothing; pruning one image removes
        exactly its unshared blobs, and the rest still pull through every replica with the upstream stopped."""
        registry = await start_registry(self.path("registry"), test=self, address="127.0.32.3")
        images = await publish_images(registry)
        ns = registry.host
        registries = [{"name": ns, "scheme": "http"}]
        admin_port = free_port()
        replicas = {name: await self.replica(name, registries, admin=(
            f"tcp:{admin_port}:interface=127.0.0.1" if name == "c" else "none")) for name in REPLICAS}
        web = WebClient()
        self.addCleanup(web.close)
        # Every image through every replica twice, at once; by tag, and by digest on alternate rounds.
        pulls = [Deferred.fromCoroutine(pull(web, replicas[name], ns, image.repository,
                                             image.digest if (round_ + n) % 2 else image.tag))
                 for round_ in range(2) for n, name in enumerate(REPLICAS) for image in images]
        pulled = await gatherResults(pulls)
        for image, digests in zip(images * 2 * len(REPLICAS), pulled, strict=True):
            self.assertEqual(digests, {*image.manifests, *image.blobs})
        for digest in {d for image in images for d in image.blobs}:
            await until(lambda digest=digest: self.s3.stat(key_for(digest)))
        await self.assert_references_right(images)
        await registry.settled()
        blobs = {d for image in images for d in image.blobs}
        print(f"\n{len(pulls)} concurrent pulls through {len(REPLICAS)} replicas: "
              f"{sum(registry.count_requests('GET', f'/blobs/{d}') for d in blobs)} upstream blob GETs "
              f"for {len(blobs)} blobs")
        await registry.stop()

        # Nothing is unreferenced: a prune (CLI, then the admin API of a replica) that selects no image removes nothing.
        config = self.shared_config()
        result = await run_cli("prune", "--config-file", config, "--pattern", "^nothing$", "--grace", "0")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("removed 0 images, 0 manifests, 0 blobs, 0 bytes", result.stdout)
        admin = f"http://127.0.0.1:{admin_port}/cmd/prune?type=pattern&dryRun=false&grace=0&expr="
        response = await web.client.delete(admin + "^nothing$")
        text = (await response.content()).decode()
        self.assertEqual(response.code, 200, text)
        self.assertIn("removed 0 images, 0 manifests, 0 blobs, 0 bytes", text)
        await self.assert_references_right(images)

        # One image goes: its manifest and the blobs only it used, not the layer it shares.
        one, *rest = images
        response = await web.client.delete(admin + "team/one:v1")
        text = (await response.content()).decode()
        self.assertEqual(response.code, 200, text)
        used_by_rest = {d for image in rest for d in image.blobs}
        unshared = set(one.blobs) - used_by_rest
        self.assertEqual(len(unshared), 2)
        self.assertIn(f"removed 1 images, 1 manifests, {len(unshared)} blobs", text)
        await self.assert_references_right(rest)
        for server in replicas.values():
            for image in rest:
                self.assertEqual(await pull(web, server, ns, image.repository, image.tag),
                                 {*image.manifests, *image.blobs})
                self.assertEqual(await pull(web, server, ns, image.repository, image.digest),
                                 {*image.manifests, *image.blobs})
