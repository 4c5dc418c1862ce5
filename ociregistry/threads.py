"""Worker threads of their own for each kind of blocking work.

Twisted's ThreadPool is not used here because it can neither take back
work that is still queued nor stop without joining every thread, and a
thread blocked in getaddrinfo or in fsync on a dead disk cannot be
interrupted: shutdown would wait for it.  These threads are daemon
threads, started only while there is work, and closing drops whatever is
still queued.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure

T = TypeVar("T")


class Closed(Exception):
    """The threads were closed before the work started."""


class _Job:
    def __init__(self, function: Callable[..., Any], args: tuple[Any, ...], result: Deferred[Any]) -> None:
        self.function = function
        self.args = args
        self.result = result


class WorkerThreads:
    """At most ``size`` threads running blocking calls in turn; results come back on the reactor thread."""

    def __init__(self, reactor: IReactorFromThreads, name: str, size: int) -> None:
        self._reactor = reactor
        self.name = name
        self.size = size
        self._queue: deque[_Job] = deque()
        self._lock = threading.Lock()
        self._threads = 0
        self._closed = False

    @property
    def queued(self) -> int:
        """How many calls wait for a thread."""
        return len(self._queue)

    def run(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        """Call ``function(*args)`` in a worker; cancelling the result takes back a call still queued."""

        def take_back(result: Deferred[T]) -> None:
            with self._lock:
                if job in self._queue:
                    self._queue.remove(job)

        job = _Job(function, args, Deferred(take_back))
        with self._lock:
            closed = self._closed
            if not closed:
                self._queue.append(job)
            start = not closed and self._threads < self.size
            if start:
                self._threads += 1
                name = f"{self.name}-{self._threads}"
        if closed:
            job.result.errback(Closed(f"the {self.name} threads are closed"))
        elif start:
            threading.Thread(target=self._work, name=name, daemon=True).start()
        return job.result

    def close(self) -> None:
        """Run nothing more: queued calls fail with Closed; calls already running are not waited for."""
        with self._lock:
            self._closed = True
            dropped = list(self._queue)
            self._queue.clear()
        for job in dropped:
            job.result.errback(Closed(f"the {self.name} threads are closed"))

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._threads -= 1
                    return
                job = self._queue.popleft()
            try:
                outcome: Any = job.function(*job.args)
            except BaseException:
                outcome = Failure()
            self._reactor.callFromThread(_deliver, job.result, outcome)


def _deliver(result: Deferred[Any], outcome: Any) -> None:
    if result.called:
        # Cancelled while it ran: nobody is waiting for it any more.
        return
    if isinstance(outcome, Failure):
        result.errback(outcome)
    else:
        result.callback(outcome)
