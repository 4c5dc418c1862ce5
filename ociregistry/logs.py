"""Logging: the observer twistd writes through, and the access line of each request."""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    jsonFileLogObserver,
    textFileLogObserver,
)

LEVELS = {"error": LogLevel.error, "warn": LogLevel.warn, "info": LogLevel.info, "debug": LogLevel.debug}


def observer(level: str, path: str | None, json_format: bool) -> ILogObserver:
    """Log events at ``level`` and above, as text or JSON lines, to a file or standard output."""
    stream: IO[Any] = open(path, "a", encoding="utf-8") if path else sys.stdout
    target = jsonFileLogObserver(stream) if json_format else textFileLogObserver(stream)
    return FilteringLogObserver(target, [LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])])


def access_line(timestamp: str, request: Any) -> str:
    """One line per request: client, method, path, status, bytes, latency and cache result."""
    started = getattr(request, "started", None)
    latency = f"{(time.monotonic() - started) * 1000:.1f}ms" if started is not None else "-"
    length = request.sentLength or 0
    client = request.getClientAddress()
    host = getattr(client, "host", "-")
    uri = request.uri.decode("latin-1")
    method = request.method.decode("latin-1")
    status = getattr(request, "cache_status", "-")
    return f"{host} {method} {uri} {request.code} {length} {latency} cache={status}"
