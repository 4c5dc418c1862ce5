"""Coalescing: one running job per key, however many callers wait for it."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


class Observable(Generic[T]):
    """A result that many callers wait for, each through a Deferred of its own.

    Cancelling one caller's Deferred removes only that caller: one impatient
    client never cancels work that others wait for.
    """

    def __init__(self) -> None:
        self._waiters: list[Deferred[T]] = []
        self._result: T | Failure | None = None
        self._fired = False

    @property
    def fired(self) -> bool:
        """Whether the result (or failure) is in."""
        return self._fired

    def observe(self) -> Deferred[T]:
        """A new Deferred for the result, fired now if it is already in."""
        if self._fired:
            if isinstance(self._result, Failure):
                return fail(self._result)
            return succeed(self._result)  # type: ignore[arg-type]
        waiter: Deferred[T] = Deferred(self._waiters.remove)
        self._waiters.append(waiter)
        return waiter

    def fire(self, result: T | Failure) -> None:
        """Deliver the result (a Failure for an error) to every waiter."""
        self._result = result
        self._fired = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


class InFlight(Generic[K, T]):
    """At most one running job per key; later callers join the running one."""

    def __init__(self) -> None:
        self._running: dict[K, Observable[T]] = {}

    def __contains__(self, key: K) -> bool:
        return key in self._running

    def __len__(self) -> int:
        return len(self._running)

    def run(self, key: K, work: Callable[[], Coroutine[Any, Any, T]]) -> Deferred[T]:
        """Wait for the job for ``key``, starting ``work`` if none is running."""
        observable = self._running.get(key)
        if observable is None:
            # Stored before the work starts: it may finish synchronously.
            observable = self._running[key] = Observable()
            job = Deferred.fromCoroutine(work())
            job.addBoth(self._finished, key, observable)
        return observable.observe()

    def _finished(self, result: T | Failure, key: K, observable: Observable[T]) -> None:
        # Pop first, so that a waiter reacting to a failure starts afresh.
        del self._running[key]
        observable.fire(result)
