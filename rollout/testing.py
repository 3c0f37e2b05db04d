"""Test kit: a scripted, recording stand-in for `rollout.transport.Transport`.

Public so every module's tests (executor, kill switch, monitor) can share it::

    from rollout.testing import FakeTransport, Hang, Unreachable, result

    fake = FakeTransport([
        (r"^swanctl --list-sas", result(stdout="...")),
        (r"ip xfrm state count", result(stdout="SAD count 0\\n")),
        (r"sh -s", lambda host, command, stdin: result(stdout=f"hello {host.fqdn}")),
        (r"flaky", Hang()),                      # -> errors.CommandTimeout
    ], unreachable={"cp1.example.org"})           # -> errors.HostUnreachable, never runs
    fake.on(r"^true$", result(), host="cp2.example.org", times=1)   # more rules, first match wins
    ...
    assert fake.commands("cp2.example.org") == ["true"]
    assert fake.calls[0].stdin is None

Rules are tried in order; the first whose regex `re.search`es the command (and whose host filter, if
any, matches) answers. A rule with `times=N` answers N times then is skipped. Unscripted commands get
`default` (exit 0, no output) unless `strict=True`, which raises `UnscriptedCommand`.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from rollout import errors
from rollout.model import Host
from rollout.transport import CommandResult


@dataclass(frozen=True, kw_only=True)
class Hang:
    """The command starts but never finishes: raises CommandTimeout. With `FakeTransport(sleep=True)`
    it really waits for the caller's timeout first (for wall-clock tests)."""


@dataclass(frozen=True, kw_only=True)
class Unreachable:
    """The host cannot be reached for this command: raises HostUnreachable (the command never ran)."""

    reason: str = "connection refused (fake)"


Handler = Callable[[Host, str, "str | None"], "CommandResult | str"]
Response = CommandResult | BaseException | Hang | Unreachable | Handler


@dataclass(frozen=True, kw_only=True)
class Call:
    """One recorded `run()`; `ran` is False when the fake refused it as unreachable."""

    host: str
    command: str
    stdin: str | None
    timeout: float
    ran: bool


class UnscriptedCommand(AssertionError):
    """A strict FakeTransport received a command no rule matches."""


def result(stdout: str = "", stderr: str = "", exit_code: int = 0, duration: float = 0.0) -> CommandResult:
    """A CommandResult for scripts; `host` is filled in by the fake when it answers."""
    return CommandResult(host="", exit_code=exit_code, stdout=stdout, stderr=stderr, duration=duration)


@dataclass(kw_only=True)
class _Rule:
    pattern: re.Pattern[str]
    response: Response
    host: str | None = None
    times: int | None = None
    used: int = 0

    def matches(self, host: str, command: str) -> bool:
        if self.host is not None and self.host != host:
            return False
        if self.times is not None and self.used >= self.times:
            return False
        return self.pattern.search(command) is not None


class FakeTransport:
    """Scripted transport; thread-safe (rules and the call log are guarded by one lock)."""

    def __init__(self, script: Iterable[tuple[str, Response]] = (), *, unreachable: Iterable[str] = (),
                 default: Response | None = None, strict: bool = False, sleep: bool = False) -> None:
        self._rules = [_Rule(pattern=re.compile(p), response=r) for p, r in script]
        self._unreachable = set(unreachable)
        self.default: Response = result() if default is None else default
        self.strict = strict
        self.sleep = sleep
        self.closed = False
        self._calls: list[Call] = []
        self._lock = threading.Lock()

    # -- scripting -------------------------------------------------------------------------------
    def on(self, pattern: str, response: Response, *, host: str | None = None,
           times: int | None = None) -> FakeTransport:
        """Add a rule (after the existing ones); returns self for chaining."""
        with self._lock:
            self._rules.append(_Rule(pattern=re.compile(pattern), response=response, host=host, times=times))
        return self

    def set_unreachable(self, *fqdns: str, unreachable: bool = True) -> None:
        with self._lock:
            if unreachable:
                self._unreachable.update(fqdns)
            else:
                self._unreachable.difference_update(fqdns)

    # -- inspection ------------------------------------------------------------------------------
    @property
    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    def commands(self, host: str | None = None) -> list[str]:
        """Commands that ran (unreachable attempts excluded), optionally for one host."""
        return [c.command for c in self.calls if c.ran and (host is None or c.host == host)]

    def hosts(self) -> set[str]:
        return {c.host for c in self.calls if c.ran}

    # -- Transport -------------------------------------------------------------------------------
    def run(self, host: Host, command: str, *, timeout: float, stdin: str | None = None) -> CommandResult:
        with self._lock:
            down = host.fqdn in self._unreachable
            response = None if down else self._pick(host.fqdn, command)
            self._calls.append(Call(host=host.fqdn, command=command, stdin=stdin, timeout=timeout,
                                    ran=not down and not isinstance(response, Unreachable)))
        if down:
            raise errors.HostUnreachable(host.fqdn, "connection refused (fake)")
        assert response is not None
        return self._answer(response, host, command, stdin, timeout)

    def close(self) -> None:
        self.closed = True

    # -- internals -------------------------------------------------------------------------------
    def _pick(self, fqdn: str, command: str) -> Response:
        for rule in self._rules:
            if rule.matches(fqdn, command):
                rule.used += 1
                return rule.response
        if self.strict:
            raise UnscriptedCommand(f"{fqdn}: no rule matches {command!r}")
        return self.default

    def _answer(self, response: Response, host: Host, command: str, stdin: str | None,
                timeout: float) -> CommandResult:
        if isinstance(response, Unreachable):
            raise errors.HostUnreachable(host.fqdn, response.reason)
        if isinstance(response, Hang):
            if self.sleep:
                time.sleep(timeout)
            raise errors.CommandTimeout(host.fqdn, f"no answer within {timeout:g} s (fake hang)")
        if isinstance(response, BaseException):
            raise response
        if isinstance(response, CommandResult):
            return replace(response, host=host.fqdn)
        answer = response(host, command, stdin)
        if isinstance(answer, str):
            answer = result(stdout=answer)
        return replace(answer, host=host.fqdn)
