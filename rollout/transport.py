"""The transport protocol: the executor, kill switch and monitor talk to hosts only through this."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from rollout.model import Host


@dataclass(frozen=True, kw_only=True)
class CommandResult:
    host: str
    exit_code: int
    stdout: str
    stderr: str
    duration: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class Transport(Protocol):
    def run(self, host: Host, command: str, *, timeout: float, stdin: str | None = None) -> CommandResult:
        """Run a complete POSIX-shell command string on `host`.

        Raises errors.HostUnreachable when the command never ran, errors.CommandTimeout when it
        started but did not finish within `timeout` seconds.
        """
        ...

    def close(self) -> None: ...


class AsyncTransport(Protocol):
    """An event-driven transport for wide fan-out (the kill switch): same contract as `Transport.run`."""

    async def run_async(self, host: Host, command: str, *, timeout: float,
                        stdin: str | None = None) -> CommandResult: ...

    async def aclose(self) -> None:
        """Release what the run held (call on the loop that ran the commands)."""
        ...

    def close(self) -> None: ...
