"""How requests reach upstream registries: TLS, the allow-list, redirects, timeouts, retries.

The HTTP client is composed of Twisted agents, one job each: the allow-list
is asked before every hop, Twisted's ``RedirectAgent`` follows redirects (and
drops ``Authorization``, cookies and the like whenever a hop changes scheme,
host or port: an HTTPS request redirected to plain HTTP on the same host and
port never carries credentials; the redirect's own body is dropped, never
buffered), and gzip is decoded.  Around the chain runs
an answer deadline of our own, so an upstream that does not answer fails with
``AnswerTimeout`` and never looks like a cancellation: ``CancelledError``
means a client went away or the server is shutting down, and nothing else.

Bodies are read with an idle timeout and a minimum rate, so a stalled body
and a body trickled a byte at a time are both abandoned.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from OpenSSL import SSL
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IHostnameResolver,
    IOpenSSLClientConnectionCreator,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import Certificate, CertificateOptions, PrivateCertificate, optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    ContentDecoderAgent,
    GzipDecoder,
    HTTPConnectionPool,
    RedirectAgent,
    ResponseDone,
    ResponseFailed,
)
from twisted.web.error import InfiniteRedirection, RedirectWithNoLocation
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from ociregistry.allowlist import Allowlist, CheckedResolver, ReactorWithResolver
from ociregistry.config import RegistrySettings, TLSSettings, parse_duration, parse_size
from ociregistry.errors import OCIError, ServiceUnavailable, TimedOut, Unavailable
from ociregistry.metrics import Metrics

log = Logger()

# Takes each piece of a body; a Deferred it returns pauses the body until it fires.
Sink = Callable[[bytes], "Deferred[None] | None"]

T = TypeVar("T")

_RETRY_STATUSES = (500, 502, 503, 504)
_MAX_REDIRECTS = 5
_DISCARD_LIMIT = 64 * 1024
DEFAULT_MIN_RATE = 1024
DEFAULT_RATE_WINDOW = 30.0
DEFAULT_MIN_RATE_TEXT = "1KiB/30s"


def parse_rate(text: str) -> tuple[float, float]:
    """A minimum rate ``SIZE/DURATION`` (``1KiB/30s``: 1 KiB per second averaged over 30 s) or ``0``.

    Returns (bytes per second, window in seconds); a rate of 0 turns the check off.
    """
    size, slash, duration = text.partition("/")
    rate = float(parse_size(size))
    window = parse_duration(duration) if slash else DEFAULT_RATE_WINDOW
    if rate < 0 or window <= 0:
        raise ValueError(f"invalid rate {text!r}: expected SIZE/DURATION such as 1KiB/30s, or 0")
    return rate, window


def _split_host(host: str, scheme: str) -> tuple[str, int]:
    parsed = urlsplit(f"//{host}")
    return parsed.hostname or host, parsed.port or (443 if scheme == "https" else 80)


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """TLS without verifying the server, for ``insecureSkipVerify`` registries."""

    def __init__(self, hostname: str, options: CertificateOptions) -> None:
        self._hostname = hostname.encode("idna")
        self._options = options

    def clientConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._options.getContext(), None)
        connection.set_app_data(protocol)
        if not re.match(rb"[0-9.:\[\]]+\Z", self._hostname):
            connection.set_tlsext_host_name(self._hostname)
        return connection


def client_tls(host: str, tls: TLSSettings) -> IOpenSSLClientConnectionCreator:
    """TLS towards one host per a registry's settings: its CA, our client certificate, or no verification."""
    client = None
    if tls.cert and tls.key:
        with open(tls.cert, "rb") as cert, open(tls.key, "rb") as key:
            client = PrivateCertificate.loadPEM(cert.read() + b"\n" + key.read())
    if tls.insecure_skip_verify:
        if client is None:
            options = CertificateOptions(verify=False)
        else:
            options = CertificateOptions(
                privateKey=client.privateKey.original, certificate=client.original, verify=False
            )
        return _Unverified(host, options)
    trust = None
    if tls.ca:
        with open(tls.ca, "rb") as ca:
            trust = Certificate.loadPEM(ca.read())
    return optionsForClientTLS(host, trustRoot=trust, clientCertificate=client)


@implementer(IPolicyForHTTPS)
class TLSPolicy:
    """Chooses TLS settings by the host being contacted: a configured registry's own, else system trust.

    A registry whose upstream is elsewhere has its settings apply to that host.
    """

    def __init__(self, registries: Sequence[RegistrySettings]) -> None:
        self._by_netloc: dict[tuple[str, int], TLSSettings] = {}
        for settings in registries:
            host, port = _split_host(settings.api_host, settings.scheme)
            self._by_netloc[(host.lower(), port)] = settings.tls

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        host = hostname.decode("ascii")
        return client_tls(host, self._by_netloc.get((host.lower(), port), TLSSettings()))


@implementer(IPolicyForHTTPS)
class TrustedAs:
    """One registry's TLS settings for every host: a token realm is trusted as the registry naming it is."""

    def __init__(self, tls: TLSSettings) -> None:
        self._tls = tls

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        return client_tls(hostname.decode("ascii"), self._tls)


class AnswerTimeout(Exception):
    """No answer (status line and headers) came within the answer timeout."""


def answer_within(work: Deferred[T], seconds: float, clock: IReactorTime) -> Deferred[T]:
    """``work``, failing with AnswerTimeout if it has not fired after ``seconds``.

    The timeout cancels ``work``; whatever failure that produces becomes
    AnswerTimeout.  Cancelling the result is a real cancellation and stays one.
    """
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        work.cancel()

    timer = clock.callLater(seconds, expire)

    def settle(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        if expired and isinstance(result, Failure):
            return Failure(AnswerTimeout(f"no answer in {seconds:g} s"))
        return result

    return work.addBoth(settle)


@implementer(IAgent)
class _Allowed:
    """Asks the allow-list before each request, each redirect hop included."""

    def __init__(self, agent: IAgent, allowlist: Allowlist, via: str) -> None:
        self._agent = agent
        self._allowlist = allowlist
        self._via = via

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: IBodyProducer | None = None) -> Deferred[IResponse]:
        async def send() -> IResponse:
            await self._allowlist.check(urlsplit(uri.decode("ascii")).netloc, via=self._via)
            response: IResponse = await self._agent.request(method, uri, headers, bodyProducer)
            return response

        return Deferred.fromCoroutine(send())


class _Dropped(Protocol):
    """Drops a body as it arrives; past ``limit`` bytes, the connection is not worth keeping."""

    def __init__(self, limit: int) -> None:
        self._left = limit

    def dataReceived(self, data: bytes) -> None:
        self._left -= len(data)
        if self._left < 0 and self.transport is not None:
            # A response body's transport is the producer of its bytes.
            cast(IPushProducer, self.transport).stopProducing()


class _Redirects(RedirectAgent):
    """Twisted's redirect policy, with each redirect's own body dropped rather than held in memory."""

    def _handleRedirect(self, response: IResponse, method: bytes, uri: bytes, headers: Headers | None,
                        redirectCount: int) -> Deferred[IResponse]:
        response.deliverBody(_Dropped(_DISCARD_LIMIT))
        followed: Deferred[IResponse] = super()._handleRedirect(response, method, uri, headers, redirectCount)
        return followed


class _BodyReader(Protocol):
    """Delivers a response body to a sink; aborts when the upstream stalls, trickles, or on cancel."""

    def __init__(self, sink: Sink, clock: IReactorTime, idle: float,
                 min_rate: float, window: float, source: str) -> None:
        self.done: Deferred[None] = Deferred(lambda _: self._abort())
        self._sink = sink
        self._clock = clock
        self._idle = idle
        self._min_rate = min_rate
        self._window = window
        self._source = source
        self._in_window = 0
        self._idle_timer: IDelayedCall | None = None
        self._rate_timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._arm()

    def _arm(self) -> None:
        self._idle_timer = self._clock.callLater(self._idle, self._stalled)
        if self._min_rate > 0:
            self._rate_timer = self._clock.callLater(self._window, self._check_rate)

    def dataReceived(self, data: bytes) -> None:
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.reset(self._idle)
        self._in_window += len(data)
        try:
            room = self._sink(data)
        except Exception:
            self._fail(Failure())
            return
        if room is not None and not room.called:
            # The sink is storing what it has (a part upload): the upstream waits, its timers too.
            self._hold()
            room.addCallbacks(self._resume, self._fail)
        elif room is not None:
            room.addErrback(self._fail)

    def _hold(self) -> None:
        for timer in (self._idle_timer, self._rate_timer):
            if timer is not None and timer.active():
                timer.cancel()
        if self.transport is not None:
            cast(IPushProducer, self.transport).pauseProducing()

    def _resume(self, _: object) -> None:
        if self.done.called:
            return
        self._in_window = 0
        self._arm()
        if self.transport is not None:
            cast(IPushProducer, self.transport).resumeProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        for timer in (self._idle_timer, self._rate_timer):
            if timer is not None and timer.active():
                timer.cancel()
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(Unavailable(f"upstream {self._source} broke off: {describe(reason.value)}"))

    def _stalled(self) -> None:
        self._fail(Failure(TimedOut(f"upstream {self._source} stalled for {self._idle:g} s")))

    def _check_rate(self) -> None:
        received, self._in_window = self._in_window, 0
        if received < self._min_rate * self._window:
            self._fail(Failure(TimedOut(
                f"upstream {self._source} sent {received} bytes in {self._window:g} s, "
                f"below the minimum rate of {self._min_rate:g} bytes/s",
            )))
        else:
            self._rate_timer = self._clock.callLater(self._window, self._check_rate)

    def _fail(self, failure: Failure) -> None:
        if not self.done.called:
            self.done.errback(failure)
        self._abort()

    def _abort(self) -> None:
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()


def describe(reason: BaseException | None) -> str:
    """What went wrong, in a few words, from a network failure (wrapped or not)."""
    if reason is None:
        return "no reason given"
    if isinstance(reason, ResponseFailed) and reason.reasons:
        return describe(reason.reasons[0].value)
    if isinstance(reason, SSL.Error) and reason.args and isinstance(reason.args[0], list):
        parts = [str(entry[-1]) for entry in reason.args[0] if isinstance(entry, tuple) and entry]
        if parts:
            return "; ".join(parts)
    return str(reason) or type(reason).__name__


def _innermost(reason: BaseException) -> list[BaseException]:
    """The failures a ResponseFailed wraps, or the exception itself."""
    if isinstance(reason, ResponseFailed) and reason.reasons:
        return [r.value for r in reason.reasons]
    return [reason]


class Transport:
    """Sends requests to upstreams and reads their bodies, within bounded time.

    One connection pool serves the registries' own traffic, with TLS chosen
    by host; token realms get a pool per registry TLS settings (bounded by
    the configuration), trusted as the registry that names them.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        registries: Sequence[RegistrySettings],
        allowlist: Allowlist,
        *,
        connect_timeout: float = 30.0,
        response_timeout: float = 60.0,
        idle_timeout: float = 60.0,
        min_rate: float = DEFAULT_MIN_RATE,
        rate_window: float = DEFAULT_RATE_WINDOW,
        retries: int = 2,
        backoff: float = 0.5,
        metrics: Metrics | None = None,
        name_resolver: IHostnameResolver | None = None,
    ) -> None:
        self._clock = reactor
        self._allowlist = allowlist
        self._connect_timeout = connect_timeout
        self._response_timeout = response_timeout
        self._idle_timeout = idle_timeout
        self._min_rate = min_rate
        self._rate_window = rate_window
        self._retries = retries
        self._backoff = backoff
        self._metrics = metrics or Metrics()
        # Connections resolve names through the allow-list, which drops the
        # private addresses of hosts it does not trust.
        self._connecting = ReactorWithResolver(
            reactor, CheckedResolver(name_resolver or reactor.nameResolver, allowlist)  # type: ignore[attr-defined]
        )
        self._pools: list[HTTPConnectionPool] = []
        self._by_host = self._agent(TLSPolicy(registries))
        self._realm_agents: dict[TLSSettings, IAgent] = {}
        self._closed = False
        self._pauses: set[Deferred[None]] = set()

    def _agent(self, tls: IPolicyForHTTPS) -> IAgent:
        pool = HTTPConnectionPool(self._connecting, persistent=True)
        pool.maxPersistentPerHost = 8
        self._pools.append(pool)
        return Agent(self._connecting, contextFactory=tls, pool=pool, connectTimeout=self._connect_timeout)

    def stop_retrying(self) -> None:
        """Shutdown is under way: failed requests are not tried again."""
        self._closed = True
        for pause in list(self._pauses):
            pause.cancel()

    async def close(self) -> None:
        """Close the pooled connections (at shutdown)."""
        self.stop_retrying()
        for pool in self._pools:
            await pool.closeCachedConnections()

    async def send(self, registry: str, method: str, url: str, headers: Headers) -> IResponse:
        """A request to a registry: redirects followed, failures retried, errors naming the registry.

        Errors name the host too when the registry is served from another (Docker Hub's API host, an ``upstream``).
        """
        host = urlsplit(url).netloc
        what = f"upstream {registry}" if host == registry else f"upstream {registry} (at {host})"
        return await self._send(registry, what, self._by_host, method, url, headers)

    async def send_to_realm(self, registry: str, tls: TLSSettings, url: str, headers: Headers) -> IResponse:
        """A GET from the token realm a registry named, trusted per that registry's TLS settings."""
        agent = self._realm_agents.get(tls)
        if agent is None:
            agent = self._realm_agents[tls] = self._agent(TrustedAs(tls))
        parsed = urlsplit(url)
        realm = f"{parsed.scheme}://{parsed.netloc}{parsed.path}"
        return await self._send(registry, f"the token realm {realm} of {registry}", agent, "GET", url, headers)

    async def _send(self, registry: str, what: str, agent: IAgent, method: str, url: str,
                    headers: Headers) -> IResponse:
        """Send, retrying connection failures, timeouts and 5xx answers with backoff.

        Only requests whose body nobody has read yet are retried.
        """
        # Asked once before the attempts, so that a slow or failing lookup is neither retried nor
        # charged to the answer timeout; each hop is asked again, from the allow-list's memory.
        await self._allowlist.check(urlsplit(url).netloc, via=registry)
        chain = ContentDecoderAgent(
            _Redirects(_Allowed(agent, self._allowlist, via=registry), redirectLimit=_MAX_REDIRECTS),
            [(b"gzip", GzipDecoder)],
        )
        for attempt in range(self._retries + 1):
            last = attempt == self._retries or self._closed
            started = time.monotonic()
            try:
                request = chain.request(method.encode("ascii"), url.encode("ascii"), headers)
                response: IResponse = await answer_within(request, self._response_timeout, self._clock)
            except (CancelledError, OCIError):
                # An OCIError is the allow-list's, refusing a redirect: asking again changes nothing.
                raise
            except Exception as e:
                error, retry = self._explain(e, what)
                self._observe(registry, "error", started)
                if last or not retry:
                    raise error from None
                log.info("Retrying {method} {url}: {why}", method=method, url=url, why=error.message)
            else:
                self._observe(registry, str(response.code), started)
                if last or response.code not in _RETRY_STATUSES:
                    return response
                await self.discard(response, registry)
                log.info("Retrying {method} {url} after status {code}", method=method, url=url, code=response.code)
            pause = deferLater(self._clock, self._backoff * 2**attempt, lambda: None)
            self._pauses.add(pause)
            try:
                await pause
            except CancelledError:
                if self._closed:
                    raise ServiceUnavailable(f"{what} failed and the server is shutting down") from None
                raise
            finally:
                self._pauses.discard(pause)
        raise AssertionError("unreachable")

    def _explain(self, failure: Exception, what: str) -> tuple[Unavailable, bool]:
        """The OCI error for a failed attempt, and whether another attempt may do better.

        Raises CancelledError when the request was cancelled, not failed.
        """
        reasons = _innermost(failure)
        if any(isinstance(r, (CancelledError, neterror.ConnectingCancelledError)) for r in reasons):
            raise CancelledError()
        if isinstance(failure, AnswerTimeout):
            return TimedOut(f"{what} did not answer in {self._response_timeout:g} s"), True
        if any(isinstance(r, neterror.TimeoutError) for r in reasons):
            return TimedOut(f"{what} did not accept a connection in {self._connect_timeout:g} s"), True
        tls = [r for r in reasons if isinstance(r, SSL.Error)]
        if tls:
            return Unavailable(f"TLS to {what} failed: {describe(tls[0])}"), False
        if any(isinstance(r, InfiniteRedirection) for r in reasons):
            return Unavailable(f"{what} redirected more than {_MAX_REDIRECTS} times"), False
        if any(isinstance(r, RedirectWithNoLocation) for r in reasons):
            return Unavailable(f"{what} redirected without a Location"), False
        if isinstance(failure, (ResponseFailed, neterror.ConnectError, neterror.DNSLookupError, neterror.ConnectionLost)):
            return Unavailable(f"{what} unreachable: {describe(failure)}"), True
        raise failure

    def _observe(self, registry: str, outcome: str, started: float) -> None:
        self._metrics.upstream_requests.labels(registry, outcome).observe(time.monotonic() - started)

    def read_body(self, response: IResponse, sink: Sink, source: str) -> Deferred[None]:
        """Feed a response body to ``sink``; fails if the upstream stalls, trickles or breaks off.

        When ``sink`` returns an unfired Deferred, the body is paused until it fires.

        Cancelling the Deferred aborts the connection.
        """
        reader = _BodyReader(sink, self._clock, self._idle_timeout, self._min_rate, self._rate_window, source)
        response.deliverBody(reader)
        return reader.done

    async def content(self, response: IResponse, source: str, limit: int,
                      too_large: Callable[[], Exception] | None = None) -> bytes:
        """A whole (small) response body, failing once it passes ``limit`` bytes."""
        chunks: list[bytes] = []
        received = 0

        def collect(data: bytes) -> None:
            nonlocal received
            received += len(data)
            if received > limit:
                raise too_large() if too_large else Unavailable(
                    f"upstream {source} sent more than {limit} bytes")
            chunks.append(data)

        await self.read_body(response, collect, source)
        return b"".join(chunks)

    async def discard(self, response: IResponse, source: str) -> None:
        """Read and drop a (short) response body, so the connection can be reused.

        A long or slow one is cut off instead: its connection is not worth keeping.
        """
        try:
            await self.content(response, source, _DISCARD_LIMIT)
        except CancelledError:
            raise
        except Exception as e:
            log.debug("Dropped the rest of an answer from {source}: {why}", source=source, why=e)


def header(response: IResponse, name: bytes) -> str | None:
    """The first value of a response header, if any."""
    values = response.headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None
