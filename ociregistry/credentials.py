"""Upstream credentials: from the configuration, an environment map, or a credential helper.

Helpers speak Docker's credential-helper protocol: ``docker-credential-NAME
get`` reads the registry host on standard input and prints
``{"ServerURL": ..., "Username": ..., "Secret": ...}``.  Their answers are
cached for a few minutes, since helpers such as ecr-login mint short-lived
passwords and are slow to run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.utils import getProcessOutputAndValue

from ociregistry.config import ConfigError, RegistrySettings
from ociregistry.errors import CredentialsUnavailable, OCIError
from ociregistry.grammar import canonical_registry
from ociregistry.inflight import InFlight

CREDENTIALS_VARIABLE = "OCIREGISTRY_CREDENTIALS"
RUST_CREDENTIALS_VARIABLE = "UPSTREAM_CREDENTIALS"
# In order of precedence: (variable, key of the user name, whether tokens may be given).
_VARIABLES = ((CREDENTIALS_VARIABLE, "user", True), (RUST_CREDENTIALS_VARIABLE, "username", False))
_HELPER_TTL = 300.0

RunHelper = Callable[[str, str], "Deferred[tuple[bytes, bytes, int]]"]


@dataclass(frozen=True)
class Login:
    """A user and password for basic auth or a token service."""

    user: str
    password: str


def _run_helper(program: str, host: str) -> Deferred[tuple[bytes, bytes, int]]:
    from twisted.internet import reactor

    d: Deferred[tuple[bytes, bytes, int]] = getProcessOutputAndValue(
        program, ("get",), env=dict(os.environ), reactor=reactor, stdinBytes=host.encode("utf-8")
    )
    return d


def credentials_from_environment(
    registries: Sequence[RegistrySettings], environ: Mapping[str, str]
) -> tuple[RegistrySettings, ...]:
    """Add the credentials of the JSON maps in $OCIREGISTRY_CREDENTIALS and $UPSTREAM_CREDENTIALS to the registries.

    $OCIREGISTRY_CREDENTIALS is ``{"registry": {"user": ..., "password": ...} or
    {"token": ...}}``; $UPSTREAM_CREDENTIALS is the Rust oci-registry's
    ``{"registry": {"username": ..., "password": ...}}``.  A registry
    configured with credentials keeps its own, and $OCIREGISTRY_CREDENTIALS
    wins over $UPSTREAM_CREDENTIALS.
    """
    by_name = {r.name: r for r in registries}
    for variable, user_key, tokens in _VARIABLES:
        for host, entry in _credential_map(environ, variable, user_key, tokens).items():
            current = by_name.get(host, RegistrySettings(name=host))
            if current.user or current.token or current.credential_helper:
                continue
            by_name[host] = replace(current, user=entry.get(user_key), password=entry.get("password"),
                                    token=entry.get("token") if tokens else None)
    return tuple(by_name.values())


def _credential_map(environ: Mapping[str, str], variable: str, user_key: str,
                    tokens: bool) -> dict[str, dict[str, Any]]:
    """The entries of one variable's JSON map by registry, checked; errors never show a value."""
    text = environ.get(variable)
    if not text:
        return {}
    source = f"${variable}"
    try:
        document: Any = json.loads(text)
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        # json's messages give a position, never the text.
        raise ConfigError(source, "", f"invalid JSON ({e})") from None
    needs = f"needs '{user_key}' and 'password'" + (", or 'token'" if tokens else "")
    found: dict[str, dict[str, Any]] = {}
    for name, entry in document.items():
        try:
            host = canonical_registry(name)
        except OCIError:
            raise ConfigError(source, str(name), "not a registry host") from None
        if not isinstance(entry, dict) or not (
            (isinstance(entry.get(user_key), str) and isinstance(entry.get("password"), str))
            or (tokens and isinstance(entry.get("token"), str))
        ):
            raise ConfigError(source, str(name), needs)
        found[host] = entry
    return found


class Credentials:
    """What to authenticate with, per registry."""

    def __init__(
        self, clock: IReactorTime, lookup: Callable[[str], RegistrySettings], run_helper: RunHelper = _run_helper
    ) -> None:
        self._clock = clock
        self._lookup = lookup
        self._run_helper = run_helper
        self._helper_answers: dict[str, tuple[Login, float]] = {}
        self._helper_runs: InFlight[str, Login] = InFlight()

    def configured(self, registry: str) -> bool:
        """Whether any credentials are configured for the registry."""
        settings = self._lookup(registry)
        return bool(settings.user or settings.token or settings.credential_helper)

    def token(self, registry: str) -> str | None:
        """A static bearer token, sent with every request."""
        return self._lookup(registry).token

    async def login(self, registry: str) -> Login | None:
        """The user and password for basic auth or a token service, if any."""
        settings = self._lookup(registry)
        if settings.user is not None:
            return Login(settings.user, settings.password or "")
        if settings.credential_helper is None:
            return None
        cached = self._helper_answers.get(registry)
        if cached is not None and cached[1] > self._clock.seconds():
            return cached[0]
        helper = settings.credential_helper
        return await self._helper_runs.run(registry, lambda: self._ask_helper(registry, helper))

    async def _ask_helper(self, registry: str, helper: str) -> Login:
        program = helper if os.sep in helper else f"docker-credential-{helper}"
        failure = CredentialsUnavailable(f"credential helper {helper} gave no credentials for {registry}")
        try:
            out, _, code = await self._run_helper(program, registry)
            answer = json.loads(out)
            login = Login(str(answer["Username"]), str(answer["Secret"]))
        except (OSError, ValueError, KeyError, TypeError):
            raise failure from None
        if code != 0:
            raise failure
        self._helper_answers[registry] = (login, self._clock.seconds() + _HELPER_TTL)
        return login
