"""Coalescing: one job per key, a Deferred per caller."""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred
from twisted.trial.unittest import SynchronousTestCase

from ociregistry.inflight import InFlight


class InFlightTests(SynchronousTestCase):
    """The job runs once; waiters come and go independently."""

    def setUp(self) -> None:
        self.inflight: InFlight[str, str] = InFlight()
        self.started = 0
        self.gate: Deferred[str] = Deferred()

    async def work(self) -> str:
        self.started += 1
        return await self.gate

    def test_one_job_many_waiters(self) -> None:
        """Three callers share one job and each gets the result."""
        waiters = [self.inflight.run("k", self.work) for _ in range(3)]
        self.assertEqual(self.started, 1)
        self.assertIn("k", self.inflight)
        self.gate.callback("done")
        self.assertEqual([self.successResultOf(w) for w in waiters], ["done"] * 3)
        self.assertNotIn("k", self.inflight)

    def test_cancel_one_waiter(self) -> None:
        """Cancelling one caller leaves the job running for the others."""
        first, second = self.inflight.run("k", self.work), self.inflight.run("k", self.work)
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.gate.callback("done")
        self.assertEqual(self.successResultOf(second), "done")

    def test_failure_reaches_all_and_is_not_cached(self) -> None:
        """A failure reaches every waiter; the next call starts afresh."""
        waiters = [self.inflight.run("k", self.work) for _ in range(2)]
        self.gate.errback(ValueError("upstream down"))
        for waiter in waiters:
            self.failureResultOf(waiter, ValueError)
        self.gate = Deferred()
        again = self.inflight.run("k", self.work)
        self.assertEqual(self.started, 2)
        self.gate.callback("ok")
        self.assertEqual(self.successResultOf(again), "ok")

    def test_synchronous_work(self) -> None:
        """Work that finishes at once still answers its caller."""
        async def immediate() -> str:
            return "now"

        self.assertEqual(self.successResultOf(self.inflight.run("k", immediate)), "now")
        self.assertNotIn("k", self.inflight)
