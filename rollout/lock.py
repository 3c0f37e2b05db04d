"""One apply at a time: a lock file naming its owner (user@host, pid, since) with a TTL.

The holder refreshes a heartbeat at every step; a lock whose heartbeat is older than its TTL, or whose
owner process is gone from this machine, is stale and is taken over with a warning. The kill switch
never takes or waits for this lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from rollout.errors import LockedError

DEFAULT_TTL = 15 * 60.0  # seconds without a heartbeat before a lock is stale


@dataclass(frozen=True, kw_only=True)
class LockInfo:
    user: str
    hostname: str
    pid: int
    since: float  # when it was taken (epoch seconds)
    heartbeat: float  # last refresh
    ttl: float
    run_id: str
    command: str = "apply"

    @property
    def owner(self) -> str:
        return f"{self.user}@{self.hostname} pid {self.pid}"

    def expired(self, now: float) -> bool:
        return now - self.heartbeat > self.ttl

    def describe(self, now: float) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.since))
        return (f"{self.owner} ({self.command} run {self.run_id}, since {started}, "
                f"last heartbeat {now - self.heartbeat:.0f} s ago, ttl {self.ttl:.0f} s)")


def current_owner() -> tuple[str, str, int]:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return user, socket.gethostname(), os.getpid()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """The apply lock at `path`. `acquire` raises errors.LockedError naming the current owner."""

    def __init__(self, path: Path, *, ttl: float = DEFAULT_TTL, clock: Callable[[], float] = time.time,
                 owner: tuple[str, str, int] | None = None,
                 warn: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.ttl = ttl
        self._clock = clock
        self._owner = owner or current_owner()
        self._warn = warn or (lambda _msg: None)
        self._held: LockInfo | None = None

    @property
    def held(self) -> LockInfo | None:
        return self._held

    def read(self) -> LockInfo | None:
        """The lock as it is on disk (None when free or unreadable)."""
        try:
            data: dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8"))
            return LockInfo(**data)
        except (OSError, ValueError, TypeError):
            return None

    def acquire(self, run_id: str, *, command: str = "apply") -> LockInfo:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._guard():
            current = self.read()
            if current is not None and not self._stale(current):
                raise LockedError(
                    f"another apply holds the lock: {current.describe(self._clock())}",
                    hint=f"wait for it to finish; if its owner is gone the lock expires after "
                         f"{current.ttl:.0f} s ({self.path})")
            if current is not None:
                self._warn(f"taking over a stale lock from {current.describe(self._clock())}")
            user, host, pid = self._owner
            now = self._clock()
            info = LockInfo(user=user, hostname=host, pid=pid, since=now, heartbeat=now, ttl=self.ttl,
                            run_id=run_id, command=command)
            self._write(info)
            self._held = info
            return info

    def refresh(self) -> None:
        """Heartbeat: keeps the lock from going stale while a long run progresses."""
        if self._held is None:
            return
        with self._guard():
            on_disk = self.read()
            if on_disk is not None and (on_disk.pid, on_disk.hostname, on_disk.since) != (
                    self._held.pid, self._held.hostname, self._held.since):
                self._warn(f"the lock was taken over by {on_disk.owner}")
                return
            self._held = replace(self._held, heartbeat=self._clock())
            self._write(self._held)

    def release(self) -> None:
        if self._held is None:
            return
        with self._guard():
            on_disk = self.read()
            if on_disk is not None and (on_disk.pid, on_disk.since) == (self._held.pid, self._held.since):
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            self._held = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- internals ----------------------------------------------------------------------------
    def _stale(self, info: LockInfo) -> bool:
        if info.expired(self._clock()):
            return True
        # A SIGKILLed apply on this very machine leaves its lock behind: its pid is gone.
        return info.hostname == self._owner[1] and not _pid_alive(info.pid)

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Serialises check-and-write between processes (an flock on a side file, never blocking long:
        it is held for microseconds)."""
        guard = self.path.with_name(self.path.name + ".guard")
        fd = os.open(guard, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, info: LockInfo) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(asdict(info), fh, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
