"""Subprocesses and host processes for the lab: bounded commands, liveness, stopping UML kernels."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from rollout.errors import LabError


def run(argv: Sequence[str], *, timeout: float = 30.0, check: bool = True,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run argv (never through a shell) with a bound; LabError on a timeout or, with check, a failure."""
    try:
        done = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=timeout,
                              check=False, stdin=None if stdin is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(argv)}: no answer within {timeout:.0f} s") from exc
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]}: not installed", hint="see docs/lab.md for the packages the lab needs") \
            from exc
    if check and done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise LabError(f"{' '.join(argv)} failed (exit {done.returncode}): {' / '.join(detail)}")
    return done


def netns_argv(netns: str, argv: Sequence[str]) -> list[str]:
    """argv run inside the lab's network namespace."""
    return ["ip", "netns", "exec", netns, *argv]


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...


def pid_alive(pid: int) -> bool:
    """True if pid runs and is not a zombie (reaps it first if it is our own child)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def process_group(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[2]) if fields else None


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def uml_pids(uml_dir: Path | None) -> list[int]:
    """Every live process of a UML kernel started with uml_dir=<uml_dir> (any of its threads/helpers);
    with None, of every lab-style UML kernel on the machine."""
    marker = f"uml_dir={uml_dir}" if uml_dir is not None else "uml_dir="
    found = []
    for entry in Path("/proc").iterdir():
        pid = int(entry.name) if entry.name.isdigit() else 0
        if pid and _has_word(cmdline(pid), marker) and pid_alive(pid):
            found.append(pid)
    return sorted(found)


def _has_word(argv: list[str], marker: str) -> bool:
    return any(word == marker or (marker.endswith("=") and word.startswith(marker)) for word in argv)


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by pid (a UML kernel started with setsid) and pid itself."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if process_group(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    """Wait until none of pids is alive; return the ones still alive at the deadline."""
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if pid_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if pid_alive(p)]
    return alive
