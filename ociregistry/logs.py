"""Logging: the observer twistd writes through, the log file it reopens, and the access line of each request."""

from __future__ import annotations

import re
import sys
import time
from typing import IO, Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEventAsClassicLogText,
    jsonFileLogObserver,
)
from twisted.web.iweb import IAccessLogFormatter
from zope.interface import provider

from ociregistry.site import RegistryRequest

log = Logger()

LEVELS = {"error": LogLevel.error, "warn": LogLevel.warn, "info": LogLevel.info, "debug": LogLevel.debug}


_DIGEST = re.compile(r"\b(sha256:[0-9a-f]{12})[0-9a-f]{52}\b|\b(sha512:[0-9a-f]{12})[0-9a-f]{116}\b")


def short_digests(text: str) -> str:
    """Shorten the digests in a human line to their first 12 hex digits."""
    return _DIGEST.sub(lambda m: (m.group(1) or m.group(2)) + "...", text)


class LogFile:
    """The log file, appended to, that ``reopen`` opens again by its name (after logrotate moved it)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stream: IO[str] = open(path, "a", encoding="utf-8")

    def write(self, text: str) -> None:
        """Append text."""
        self._stream.write(text)

    def flush(self) -> None:
        """Flush what was written."""
        self._stream.flush()

    def reopen(self) -> None:
        """Continue in a file opened anew by the same name; keep the old one if it cannot be opened."""
        try:
            stream = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            log.error("Could not reopen the log file, still writing to the old one: {why}", why=e)
            return
        old, self._stream = self._stream, stream
        old.close()
        log.info("Reopened the log file {path}", path=self.path)


def observer(level: str, output: str | LogFile | None, json_format: bool) -> ILogObserver:
    """Log events at ``level`` and above, as text or JSON lines, to a file (a path) or standard output.

    Human lines carry shortened digests; JSON events keep them whole.
    """
    stream: IO[Any] | LogFile = LogFile(output) if isinstance(output, str) else (output or sys.stdout)
    if json_format:
        target: ILogObserver = jsonFileLogObserver(stream)  # type: ignore[arg-type]
    else:
        target = FileLogObserver(stream,  # type: ignore[arg-type]
                                 lambda event: short_digests(formatEventAsClassicLogText(event) or ""))
    return FilteringLogObserver(target, [LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])])


@provider(IAccessLogFormatter)
def access_line(timestamp: str, request: RegistryRequest) -> str:
    """One line per request: client, method, path, status, bytes, latency and cache result."""
    started = request.started
    latency = f"{(time.monotonic() - started) * 1000:.1f}ms" if started is not None else "-"
    length = request.sentLength or 0
    client = request.getClientAddress()
    host = client.host if isinstance(client, (IPv4Address, IPv6Address)) else "-"
    uri = request.uri.decode("latin-1")
    method = request.method.decode("latin-1")
    return f"{host} {method} {uri} {request.code} {length} {latency} cache={request.cache_status}"
