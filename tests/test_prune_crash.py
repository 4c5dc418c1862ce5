"""Crash safety of pruning: `ociregistry prune` killed with SIGKILL at random moments.

Set OCIREGISTRY_SEED=N to repeat a run.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

from twisted.internet.task import Clock
from twisted.logger import Logger

from ociregistry.sqlite import SqliteEngine
from ociregistry.manifests import describe
from tests.fakes import OCI_MANIFEST, make_image
from tests.realparts import LONG_RUN, PROJECT_ROOT, WorkspaceTestCase, cache_problems, sleep
from tests.test_load import run_cli
from tests.test_store import digest_of

log = Logger()

KILLS = 30 if LONG_RUN else 12
IMAGES = 300


def fill_cache(image_path: str, count: int, prefix: str, age: float = 0.0) -> str:
    """Record ``count`` small images named prune/<prefix>N, sharing a base layer, and one named keep/app.

    Every file is dated ``age`` seconds ago.  Returns keep/app's digest.
    """
    os.makedirs(os.path.join(image_path, "tmp"), exist_ok=True)
    index = SqliteEngine(os.path.join(image_path, "index.db"), Clock()).connect()
    written = time.time() - age

    def put(content: bytes) -> str:
        digest = digest_of(content)
        path = os.path.join(image_path, "blobs", "sha256", digest[7:9], digest[7:])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)
        os.utime(path, (written, written))
        return digest

    kept = ""
    for number in range(count + 1):
        name = "keep/app" if number == count else f"prune/{prefix}{number}"
        image = make_image(b"a base layer shared by all", f"{name} layer".encode(),
                           config=f'{{"name":"{name}"}}'.encode())
        for content in image.blobs.values():
            index.record_blob(put(content), len(content))
        _, references = describe(image.manifest, OCI_MANIFEST, "test")
        index.record_manifest(put(image.manifest), OCI_MANIFEST, len(image.manifest), "quay.io", name,
                              references, tag="v1")
        kept = image.digest
    index.close()
    return kept


class PruneCrashTests(WorkspaceTestCase):
    """A real `ociregistry prune` process killed again and again while it works."""

    timeout = 300

    async def test_kill_during_prune(self) -> None:
        """After every kill no row names a missing file, and check --repair sweeps the files left behind."""
        image_path = self.path("cache")
        seed = int(os.environ.get("OCIREGISTRY_SEED") or time.time_ns() % 1_000_000)
        rng = random.Random(seed)
        env = {**os.environ, "PYTHONPATH": PROJECT_ROOT}
        command = [sys.executable, "-m", "ociregistry.cli", "prune", "--image-path", image_path,
                   "--pattern", "^quay.io/prune/"]
        fill_cache(image_path, IMAGES, "calibrate", age=3600)
        began = time.monotonic()
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        duration = time.monotonic() - began
        interrupted = orphaned = 0
        for kill in range(KILLS):
            fill_cache(image_path, IMAGES, f"k{kill}-", age=3600)
            moment = rng.uniform(0.0, duration)
            where = f"seed {seed}, kill {kill} at {moment:.3f} s of {duration:.3f} s"
            process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            await sleep(moment)
            if process.poll() is None:
                interrupted += 1
            process.send_signal(signal.SIGKILL)
            process.wait()
            assert process.stderr is not None
            process.stderr.close()
            found = await run_cli("check", "--image-path", image_path)
            problems = [line for line in found.stdout.splitlines() if line.startswith(("manifest ", "blob "))]
            self.assertEqual(problems, [], f"{where}: rows whose files are gone or wrong")
            orphans = [line for line in found.stdout.splitlines() if "not in the index" in line]
            orphaned += len(orphans)
            swept = await run_cli("check", "--repair", "--image-path", image_path)
            self.assertEqual(swept.returncode, 0, f"{where}: {swept.stdout}{swept.stderr}")
            self.assertEqual([p for p in cache_problems(image_path) if not p.startswith("left in tmp/")], [], where)
            clean = await run_cli("check", "--image-path", image_path)
            self.assertEqual(clean.returncode, 0, f"{where}: {clean.stdout}")
            self.assertTrue(clean.stdout.endswith(", 0 problems\n"), f"{where}: {clean.stdout}")
        log.info("seed {seed}: {interrupted} of {kills} kills interrupted a prune of {images} images "
                 "({duration:.2f} s); {orphaned} files left unnamed were swept",
                 seed=seed, interrupted=interrupted, kills=KILLS, images=IMAGES, duration=duration,
                 orphaned=orphaned)
        self.assertGreaterEqual(interrupted, KILLS // 2, f"seed {seed}: the kills came too late")
