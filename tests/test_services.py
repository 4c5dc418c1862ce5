"""The pattern for real services shared by a whole test run."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from tests.services import Shared


class _Service:
    def __init__(self) -> None:
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True


class SharedTests(SynchronousTestCase):
    """A service is started once, by whoever asks first, and a failed start is not retried."""

    def test_started_once_for_every_caller(self) -> None:
        """Callers asking while the service starts, and after, all get the one service."""
        starts: list[Deferred[_Service]] = []

        async def start() -> _Service:
            starts.append(Deferred())
            return await starts[-1]

        shared = Shared(start)
        first = Deferred.fromCoroutine(shared.get())
        second = Deferred.fromCoroutine(shared.get())
        self.assertNoResult(first)
        self.assertEqual(len(starts), 1)
        service = _Service()
        starts[0].callback(service)
        self.assertIs(self.successResultOf(first), service)
        self.assertIs(self.successResultOf(second), service)
        self.assertIs(self.successResultOf(Deferred.fromCoroutine(shared.get())), service)
        self.assertEqual(len(starts), 1)
        self.assertIsNotNone(shared.start_seconds)

    def test_failed_start_fails_every_caller(self) -> None:
        """A start that failed fails later callers at once, without starting again."""
        calls: list[int] = []

        async def start() -> _Service:
            calls.append(1)
            raise RuntimeError("mon did not come up")

        shared = Shared(start)
        for _ in range(2):
            failure = self.failureResultOf(Deferred.fromCoroutine(shared.get()), RuntimeError)
            self.assertEqual(str(failure.value), "mon did not come up")
        self.assertEqual(len(calls), 1)
