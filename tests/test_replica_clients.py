"""podman and containerd follow a replica's redirects to the bucket: with `redirect: true`, every
cached blob GET is a 307 to a presigned URL, and the client fetches the bytes from Ceph RGW itself.

The image is pulled cold through replica A, the upstream is stopped, and the client pulls through
replica B, whose bucket endpoint is a relay in front of RGW: the relay shows which presigned GETs
reached the bucket, and B's access log that it sent 307s and not the blobs' bytes.  The presigned
URLs name the endpoint of `storage.s3` (here plain HTTP on a loopback address other than B's): the
clients follow a 307 to another host and from HTTP to HTTP without being told anything, so a
user sets nothing for redirects, but the endpoint must be one the clients can reach.
"""

from __future__ import annotations

import json
import os
import re

from ociregistry.s3 import key_for
from tests.realparts import (
    ImageSet,
    Registry,
    Server,
    ThrottledRelay,
    build_oci_index,
    free_port,
    log_settled,
    push,
    skopeo_copy_all,
    start_registry,
)
from tests.services import ReplicaTestCase, until
from tests.test_clients import Containerd, podman_pull, write

# An access line: client, method, path, status, bytes sent.
_ACCESS = re.compile(r" (GET|HEAD) (\S+) (\d{3}) (\d+) ")


class RedirectedPullTests(ReplicaTestCase):
    """Real clients pull an image cached by another replica, with the blobs' bytes coming from the bucket."""

    async def cached_behind_redirects(self, address: str) -> tuple[ImageSet, Registry, Server, ThrottledRelay]:
        """An OCI index of two platforms pulled through replica A, its upstream (port 80 of ``address``)
        stopped, and replica B with redirects on, its bucket reached through a relay on 127.0.32.x."""
        image = build_oci_index(self.path("oci"), layer_sizes=(300_000, 4000))
        registry = await start_registry(self.path("registry"), test=self, address=address, port=80)
        await push(image, registry, "team/app", "v1")
        registries = [{"name": registry.host, "scheme": "http"}]
        a = await self.replica("a", registries)
        pulled = await skopeo_copy_all(f"{a.host}/{registry.host}/team/app:v1", self.path("via-a"))
        self.assertEqual((pulled.digest, pulled.blobs), (image.digest, image.blobs))
        for digest in image.blobs:
            await until(lambda digest=digest: self.s3.stat(key_for(digest)))
        await registry.stop()
        relay = ThrottledRelay(("127.0.0.1", int(self.rgw.endpoint.rpartition(":")[2])), None)
        self.addCleanup(relay.stop)
        relay_address = address.rpartition(".")[0] + "." + str(int(address.rpartition(".")[2]) + 10)
        await relay.start(relay_address, free_port(relay_address))
        b = await self.replica("b", registries, redirect=True, endpoint=f"http://{relay.host}")
        return image, registry, b, relay

    async def assert_redirected(self, b: Server, relay: ThrottledRelay, blobs: set[str]) -> None:
        """B answered every blob GET with a 307 and no body, and each blob came from the bucket by a presigned GET."""
        await log_settled(b.log_path)
        answers = [(m[2], int(m[3]), int(m[4])) for m in map(_ACCESS.search, b.log_text().splitlines())
                   if m and m[1] == "GET" and "/blobs/" in m[2]]
        # The log shortens digests to their first 12 digits.
        self.assertEqual({path.split("/blobs/")[1][:19] for path, _, _ in answers}, {d[:19] for d in blobs})
        self.assertEqual({(code, sent) for _, code, sent in answers}, {(307, 0)}, answers)
        for digest in blobs:
            presigned = relay.carrying(f"/{self.bucket}/{key_for(digest)}?")
            self.assertTrue(presigned and all("X-Amz-Signature=" in line for c in presigned for line in c.requests
                                              if key_for(digest) in line), digest)

    async def test_podman_follows_the_redirect(self) -> None:
        """podman pulls the linux/amd64 image through B from the bucket: B sends 307s, RGW the bytes."""
        image, registry, b, relay = await self.cached_behind_redirects("127.0.32.1")
        inspected = await podman_pull(self, registry.host, f"{b.host}/{registry.host}",
                                      f"{registry.host}/team/app:v1")
        amd64 = json.loads(image.manifest_bytes(image.manifests["linux/amd64"]))
        self.assertEqual(inspected, [amd64["config"]["digest"].split(":")[1], image.digest])
        wanted = {amd64["config"]["digest"], *(layer["digest"] for layer in amd64["layers"])}
        await self.assert_redirected(b, relay, wanted)

    async def test_containerd_follows_the_redirect(self) -> None:
        """containerd (hosts.toml naming B) pulls every platform through B from the bucket: B sends 307s, RGW the bytes."""
        image, registry, b, relay = await self.cached_behind_redirects("127.0.32.2")
        containerd = Containerd(self.path("containerd"))
        self.addCleanup(containerd.stop)
        await containerd.start()
        hosts_dir = self.path("certs.d")
        write(os.path.join(hosts_dir, "_default", "hosts.toml"),
              f'[host."{b.url}"]\n  capabilities = ["pull", "resolve"]\n')
        reference = f"{registry.host}/team/app:v1"
        await containerd.pull(reference, hosts_dir)
        self.assertEqual(await containerd.image_digest(reference), image.digest)
        self.assertEqual({image.digest, *image.manifests.values(), *image.blobs} - await containerd.content(), set())
        await self.assert_redirected(b, relay, set(image.blobs))
