"""Worker threads of their own for each kind of blocking work.

Twisted's ThreadPool is not used here because it stops only by joining
every thread, and a thread blocked in getaddrinfo, or in fsync on a dead
disk, cannot be interrupted: shutdown would wait for it.  These are daemon
threads, started only while there is work, that nothing waits for at exit.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure

T = TypeVar("T")


class WorkerThreads:
    """At most ``size`` threads running blocking calls in turn; results come back on the reactor thread."""

    def __init__(self, reactor: IReactorFromThreads, name: str, size: int) -> None:
        self._reactor = reactor
        self.name = name
        self.size = size
        self._queue: deque[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = deque()
        self._lock = threading.Lock()
        self._threads = 0

    @property
    def queued(self) -> int:
        """How many calls wait for a thread."""
        return len(self._queue)

    def run(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        """Call ``function(*args)`` in a worker thread; cancelling the result only stops waiting for it."""
        result: Deferred[T] = Deferred()
        with self._lock:
            self._queue.append((function, args, result))
            start = self._threads < self.size
            if start:
                self._threads += 1
                name = f"{self.name}-{self._threads}"
        if start:
            threading.Thread(target=self._work, name=name, daemon=True).start()
        return result

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._threads -= 1
                    return
                function, args, result = self._queue.popleft()
            try:
                outcome: Any = function(*args)
            except BaseException:
                outcome = Failure()
            self._reactor.callFromThread(_deliver, result, outcome)


def _deliver(result: Deferred[Any], outcome: Any) -> None:
    if result.called:
        # Cancelled while it ran: nobody is waiting for it any more.
        return
    if isinstance(outcome, Failure):
        result.errback(outcome)
    else:
        result.callback(outcome)
