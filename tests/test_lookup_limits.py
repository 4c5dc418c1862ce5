"""Name lookups are bounded: own threads, coalesced, cached in a bounded cache, timed out, capped per client."""

from __future__ import annotations

import contextvars
import queue
import socket
import threading
from functools import partial
from typing import Any, Callable

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IHostResolution
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from ociregistry.allowlist import Allowlist, HostLookups, lookups_on_behalf_of
from ociregistry.errors import OCIError
from ociregistry.tap import Options
from ociregistry.threads import WorkerThreads


class _FakeThreads:
    """Stands in for WorkerThreads: records each call started; the test answers it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Deferred[Any]]] = []

    def run(self, function: Callable[..., Any], host: str) -> Deferred[Any]:
        result: Deferred[Any] = Deferred()
        self.calls.append((host, result))
        return result

    def answer(self, host: str, addresses: list[str]) -> None:
        for name, result in self.calls:
            if name == host and not result.called:
                result.callback(addresses)

    def hosts(self) -> list[str]:
        return [host for host, _ in self.calls]


def _as_client(address: str, function: Callable[[], Any]) -> Any:
    """Run ``function`` as the work of a request from ``address``."""

    def run() -> Any:
        lookups_on_behalf_of(IPv4Address("TCP", address, 40000))
        return function()

    return contextvars.copy_context().run(run)


class HostLookupsTests(SynchronousTestCase):
    """HostLookups on a Clock with fake threads."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.threads = _FakeThreads()

    def lookups(self, **options: Any) -> HostLookups:
        return HostLookups(self.clock, self.threads.run, **options)

    def test_coalesced(self) -> None:
        """Identical lookups under way share one; every caller gets the answer."""
        lookups = self.lookups()
        first, second = lookups.addresses("a.example"), lookups.addresses("A.example")
        self.assertEqual(self.threads.hosts(), ["a.example"])
        self.threads.answer("a.example", ["93.184.216.34"])
        self.assertEqual(self.successResultOf(first), ["93.184.216.34"])
        self.assertEqual(self.successResultOf(second), ["93.184.216.34"])

    def test_one_caller_leaving_does_not_cancel_the_others(self) -> None:
        """A caller that gives up only stops its own wait; a queued lookup nobody waits for never runs."""
        lookups = self.lookups(threads=1)
        lookups.addresses("busy.example")
        first, second = lookups.addresses("a.example"), lookups.addresses("a.example")
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.assertEqual(lookups.pending, 2)
        second.cancel()
        self.failureResultOf(second, CancelledError)
        self.assertEqual(lookups.pending, 1)
        self.threads.answer("busy.example", ["93.184.216.34"])
        self.assertEqual(self.threads.hosts(), ["busy.example"])

    def test_answers_cached_for_a_while(self) -> None:
        """An answer is reused until its TTL ends; a name-not-known failure for a shorter time."""
        lookups = self.lookups(ttl=60, failure_ttl=5)
        lookups.addresses("a.example")
        self.threads.answer("a.example", ["93.184.216.34"])
        self.assertEqual(self.successResultOf(lookups.addresses("a.example")), ["93.184.216.34"])
        missing = lookups.addresses("nx.invalid")
        self.threads.calls[-1][1].errback(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
        self.failureResultOf(missing, OSError)
        self.failureResultOf(lookups.addresses("nx.invalid"), OSError)
        self.assertEqual(self.threads.hosts(), ["a.example", "nx.invalid"])
        self.clock.advance(5)
        lookups.addresses("nx.invalid")
        self.threads.answer("nx.invalid", ["93.184.216.34"])
        self.clock.advance(55)
        lookups.addresses("a.example")
        self.assertEqual(self.threads.hosts(), ["a.example", "nx.invalid", "nx.invalid", "a.example"])

    def test_answer_cache_bounded(self) -> None:
        """The answer cache holds at most max_answers hosts, dropping the least recently used."""
        lookups = self.lookups(max_answers=3)
        for number in range(5):
            lookups.addresses(f"h{number}.example")
            self.threads.answer(f"h{number}.example", ["93.184.216.34"])
        for number in range(2, 5):
            self.successResultOf(lookups.addresses(f"h{number}.example"))
        self.assertEqual(len(self.threads.calls), 5)
        lookups.addresses("h0.example")
        lookups.addresses("h1.example")
        self.assertEqual(len(self.threads.calls), 7)
        self.assertLessEqual(len(lookups._answers), 3)

    def test_timeout(self) -> None:
        """A lookup that takes too long is a 504 naming the host; queued ones never run; late answers are kept."""
        lookups = self.lookups(timeout=3, threads=1)
        result = lookups.addresses("slow.example")
        queued = lookups.addresses("queued.example")
        self.clock.advance(2.9)
        self.assertNoResult(result)
        self.clock.advance(0.1)
        error = self.failureResultOf(result, OCIError).value
        self.assertEqual((error.status, error.code), (504, "UNAVAILABLE"))
        self.assertIn("slow.example", error.message)
        self.assertIn("queued.example", self.failureResultOf(queued, OCIError).value.message)
        self.assertEqual(lookups.pending, 0)
        self.failureResultOf(lookups.addresses("slow.example"), OCIError)
        # The thread stuck in the lookup is still taken until it returns; then its answer serves.
        again = lookups.addresses("other.example")
        self.assertEqual(self.threads.hosts(), ["slow.example"])
        self.threads.answer("slow.example", ["93.184.216.34"])
        self.assertEqual(self.threads.hosts(), ["slow.example", "other.example"])
        self.assertEqual(self.successResultOf(lookups.addresses("slow.example")), ["93.184.216.34"])
        self.assertNoResult(again)
        self.threads.answer("other.example", ["93.184.216.34"])

    def test_overall_cap(self) -> None:
        """Past max_pending lookups under way, a new one is refused at once with a 503."""
        lookups = self.lookups(max_pending=2)
        lookups.addresses("a.example")
        lookups.addresses("b.example")
        error = self.failureResultOf(lookups.addresses("c.example"), OCIError).value
        self.assertEqual((error.status, error.headers.get(b"Retry-After")), (503, b"1"))
        self.assertEqual(self.threads.hosts(), ["a.example", "b.example"])
        lookups.addresses("a.example")
        self.threads.answer("a.example", ["93.184.216.34"])
        lookups.addresses("c.example")
        self.assertEqual(self.threads.hosts(), ["a.example", "b.example", "c.example"])

    def test_clients_take_turns(self) -> None:
        """One client's lookups that hang take at most half the threads; another client's run at once."""
        lookups = self.lookups(threads=4)
        for number in range(6):
            _as_client("192.0.2.1", partial(lookups.addresses, f"hang{number}.example"))
        self.assertEqual(self.threads.hosts(), ["hang0.example", "hang1.example"])
        other = _as_client("192.0.2.9", partial(lookups.addresses, "b.example"))
        self.assertEqual(self.threads.hosts()[-1], "b.example")
        self.threads.answer("b.example", ["93.184.216.34"])
        self.successResultOf(other)
        self.threads.answer("hang0.example", ["93.184.216.34"])
        self.assertEqual(self.threads.hosts()[-1], "hang2.example")
        self.assertEqual(len(self.threads.calls), 4)

    def test_configured_registries_first(self) -> None:
        """The configured registries' lookups go before queued ones and count against no client."""
        lookups = self.lookups(threads=2, max_per_client=2, preferred=["registry.example"])
        for host in ["h0.example", "h1.example"]:
            _as_client("192.0.2.1", partial(lookups.addresses, host))
        _as_client("192.0.2.9", partial(lookups.addresses, "x0.example"))
        _as_client("192.0.2.9", partial(lookups.addresses, "x1.example"))
        self.assertEqual(self.threads.hosts(), ["h0.example", "x0.example"])
        mine = _as_client("192.0.2.1", partial(lookups.addresses, "registry.example"))
        self.threads.answer("h0.example", ["93.184.216.34"])
        self.assertEqual(self.threads.hosts()[-1], "registry.example")
        self.threads.answer("registry.example", ["93.184.216.34"])
        self.successResultOf(mine)

    def test_per_client_cap(self) -> None:
        """One client may have max_per_client lookups under way; the excess is a 429; others still get theirs."""
        lookups = self.lookups(max_per_client=2)
        for host in ["h0.example", "h1.example"]:
            _as_client("192.0.2.1", partial(lookups.addresses, host))
        refused = _as_client("192.0.2.1", lambda: lookups.addresses("h2.example"))
        error = self.failureResultOf(refused, OCIError).value
        self.assertEqual((error.status, error.code), (429, "TOOMANYREQUESTS"))
        # Joining a lookup already under way costs nothing.
        self.assertNoResult(_as_client("192.0.2.1", lambda: lookups.addresses("h0.example")))
        self.assertNoResult(_as_client("192.0.2.9", lambda: lookups.addresses("h2.example")))
        self.threads.answer("h0.example", ["93.184.216.34"])
        self.assertNoResult(_as_client("192.0.2.1", lambda: lookups.addresses("h3.example")))

    def test_addresses_need_no_lookup(self) -> None:
        """An IP address is its own answer, without a thread."""
        lookups = self.lookups()
        self.assertEqual(self.successResultOf(lookups.addresses("127.0.0.1")), ["127.0.0.1"])
        self.assertEqual(self.threads.calls, [])

    def test_closed(self) -> None:
        """At shutdown queued lookups are a 503 saying so, at once; running ones still get their answer."""
        lookups = self.lookups(threads=1)
        running, queued = lookups.addresses("a.example"), lookups.addresses("b.example")
        lookups.close()
        error = self.failureResultOf(queued, OCIError).value
        self.assertEqual(error.status, 503)
        self.assertIn("shutting down", error.message)
        self.assertIn("shutting down", self.failureResultOf(lookups.addresses("c.example"), OCIError).value.message)
        self.threads.answer("a.example", ["93.184.216.34"])
        self.successResultOf(running)
        self.assertEqual(self.threads.hosts(), ["a.example"])

    def test_connection_resolution(self) -> None:
        """As a name resolver, it hands out addresses of the asked types with the port; a failure gives none."""
        lookups = self.lookups()
        receiver = _Receiver()
        lookups.resolveHostName(receiver, "a.example", 443, [IPv4Address])
        self.threads.answer("a.example", ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"])
        self.assertEqual(receiver.addresses, [IPv4Address("TCP", "93.184.216.34", 443)])
        self.assertTrue(receiver.complete)
        both = _Receiver()
        lookups.resolveHostName(both, "a.example", 80)
        self.assertEqual(both.addresses[1], IPv6Address("TCP", "2606:2800:220:1:248:1893:25c8:1946", 80))
        failed = _Receiver()
        lookups.resolveHostName(failed, "slow.example", 80)
        self.clock.advance(10)
        self.assertEqual((failed.addresses, failed.complete), ([], True))

    def test_allowlist_uses_the_cache(self) -> None:
        """The allow-list asks the lookups, so repeated checks of a name cost one lookup."""
        lookups = self.lookups()
        allowlist = Allowlist(self.clock, lookups.addresses, [])
        first = Deferred.fromCoroutine(allowlist.check("a.example"))
        self.threads.answer("a.example", ["93.184.216.34"])
        self.successResultOf(first)
        self.successResultOf(Deferred.fromCoroutine(allowlist.check("a.example:5000")))
        self.assertEqual(self.threads.hosts(), ["a.example"])


class _Receiver:
    def __init__(self) -> None:
        self.addresses: list[Any] = []
        self.complete = False

    def resolutionBegan(self, resolution: IHostResolution) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        self.addresses.append(address)

    def resolutionComplete(self) -> None:
        self.complete = True


class _FromThreads:
    """A reactor's callFromThread, run when the test says."""

    def __init__(self) -> None:
        self.calls: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]]] = queue.Queue()

    def callFromThread(self, function: Callable[..., Any], *args: Any) -> None:
        self.calls.put((function, args))

    def run_one(self) -> None:
        function, args = self.calls.get(timeout=5)
        function(*args)


class WorkerThreadsTests(SynchronousTestCase):
    """Real threads with a blocking call standing in for getaddrinfo."""

    def setUp(self) -> None:
        self.reactor = _FromThreads()
        self.threads = WorkerThreads(self.reactor, "dns", 2)
        self.release = threading.Event()
        self.addCleanup(self.release.set)
        self.started: queue.Queue[str] = queue.Queue()

    def blocking(self, host: str) -> list[str]:
        self.started.put(threading.current_thread().name)
        self.release.wait(10)
        return [host]

    def test_bounded_and_named(self) -> None:
        """At most `size` calls run at once, on threads of their own; the rest wait their turn."""
        results = [self.threads.run(self.blocking, f"h{n}") for n in range(5)]
        names = {self.started.get(timeout=5), self.started.get(timeout=5)}
        self.assertEqual(names, {"dns-1", "dns-2"})
        self.assertEqual(self.threads.queued, 3)
        self.assertTrue(self.started.empty())
        self.release.set()
        for _ in results:
            self.reactor.run_one()
        self.assertEqual([self.successResultOf(r) for r in results], [[f"h{n}"] for n in range(5)])

    def test_daemon_threads(self) -> None:
        """The threads are daemon threads: a call that never returns cannot hold up the process's exit."""
        self.threads.run(lambda: self.started.put(str(threading.current_thread().daemon)))
        self.assertEqual(self.started.get(timeout=5), "True")
        self.reactor.run_one()


class LookupOptionsTests(SynchronousTestCase):
    """--dns-threads and --dns-timeout."""

    def test_options(self) -> None:
        """Both have defaults, take values, and refuse nonsense naming the option."""
        options = Options()
        options.parseOptions([])
        self.assertEqual((options.config.dns_threads, options.config.dns_timeout), (8, 10.0))
        options = Options()
        options.parseOptions(["--dns-threads", "3", "--dns-timeout", "2s"])
        self.assertEqual((options.config.dns_threads, options.config.dns_timeout), (3, 2.0))
        for args, name in [(["--dns-threads", "0"], "--dns-threads"), (["--dns-timeout", "never"], "--dns-timeout")]:
            with self.assertRaises(usage.UsageError) as caught:
                Options().parseOptions(args)
            self.assertIn(name, str(caught.exception))
