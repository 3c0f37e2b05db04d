"""Starting and stopping the UML kernels, one per lab host."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rollout.errors import LabError
from rollout.lab.host import LabHost
from rollout.lab.paths import LabPaths
from rollout.lab.proc import cmdline, kill_group, netns_argv, pid_alive, uml_pids, wait_gone
from rollout.lab.spec import HostSpec, LabSpec

UML_BINARY = "linux.uml"


def uml_binary() -> str:
    found = shutil.which(UML_BINARY) or shutil.which(UML_BINARY, path="/usr/bin")
    if not found:
        raise LabError("linux.uml not found", hint="apt-get install user-mode-linux")
    return found


def kernel_argv(paths: LabPaths, spec: LabSpec, host: HostSpec) -> list[str]:
    """The UML command line: the machine's / read-only through hostfs, our init, one vector NIC."""
    guard = needs_xstate_guard()
    argv = [
        uml_binary(), f"mem={spec.mem_mb}M", f"umid={host.short}", f"uml_dir={paths.uml_dir}",
        "root=/dev/root", "rootfstype=hostfs", "rootflags=/", "ro", f"init={paths.init_script}",
        "con=null", "con0=null,fd:1", "ssl=null",
        f"vec0:transport=tap,ifname={host.tap},mac={host.mac}",
        f"lab.state={paths.root}", f"lab.host={host.short}",
    ]
    if guard:
        return [sys.executable, str(XSTATE_GUARD), *argv, "lab.noavx=1"]
    return argv


XSTATE_GUARD = Path(__file__).with_name("xstate_guard.py")


def needs_xstate_guard(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True on hosts whose XSAVE area (AMX) is larger than UML 6.1 can restore (see xstate_guard.py).
    ROLLOUT_LAB_XSTATE_GUARD=1/0 forces it on/off."""
    forced = os.environ.get("ROLLOUT_LAB_XSTATE_GUARD")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return "amx_tile" in flags.split()


def recorded_pid(paths: LabPaths, short: str) -> int | None:
    try:
        return int(paths.pid_file(short).read_text().strip())
    except (OSError, ValueError):
        return None


def host_running(paths: LabPaths, short: str) -> int | None:
    """The host's kernel PID if it is alive and really is this lab's kernel for this host."""
    pid = recorded_pid(paths, short)
    if pid is None or not pid_alive(pid):
        return None
    argv = cmdline(pid)
    if f"uml_dir={paths.uml_dir}" not in argv or f"umid={short}" not in argv:
        return None
    return pid


def start_host(paths: LabPaths, spec: LabSpec, host: HostSpec) -> int:
    """Boot one UML kernel in its own session (so it can be stopped by process group); record its PID."""
    shutil.rmtree(paths.uml_dir / host.short, ignore_errors=True)
    for stale in paths.ctl_dir(host.short).iterdir():
        stale.unlink()
    console = paths.console(host.short).open("wb")
    with console:
        proc = subprocess.Popen(
            netns_argv(spec.netns, kernel_argv(paths, spec, host)), stdin=subprocess.DEVNULL,
            stdout=console, stderr=subprocess.STDOUT, start_new_session=True, cwd=paths.root,
        )
    paths.pid_file(host.short).write_text(f"{proc.pid}\n")
    return proc.pid


def console_verdict(paths: LabPaths, short: str) -> str:
    """The line of a host's console that says why its kernel died (a panic), or ''."""
    try:
        lines = paths.console(short).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    panic = next((i for i, line in enumerate(lines) if "Kernel panic" in line), None)
    if panic is None:
        return ""
    why = [line for line in lines[max(0, panic - 3):panic] if line.strip() and "[<" not in line]
    return "; ".join([*why[-2:], lines[panic].strip()])


def stop_host(paths: LabPaths, short: str) -> None:
    pid = host_running(paths, short)
    if pid is not None:
        kill_group(pid)
        wait_gone([pid], 10.0)
    paths.pid_file(short).unlink(missing_ok=True)


def stop_all(paths: LabPaths, shorts: Sequence[str]) -> list[int]:
    """Kill every recorded kernel, then anything else started with this state dir; return leftovers."""
    for short in shorts:
        pid = host_running(paths, short)
        if pid is not None:
            kill_group(pid)
    for pid in uml_pids(paths.uml_dir):
        kill_group(pid)
    deadline = time.monotonic() + 15.0
    left = uml_pids(paths.uml_dir)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = uml_pids(paths.uml_dir)
    for short in shorts:
        paths.pid_file(short).unlink(missing_ok=True)
    return left


def wait_ready(hosts: Sequence[LabHost], timeout: float,
               on_ready: Callable[[LabHost, float], None] | None = None,
               alive: Callable[[LabHost], bool] | None = None) -> dict[str, float | None]:
    """Poll each host's sshd (strict host keys) until it answers; return seconds to ready (None = never).

    Each attempt may take longer than the one before (15 s, 30 s, 60 s, ...): on a loaded machine an SSH
    handshake with a guest can take tens of seconds, and a fixed short bound would never succeed.
    """
    started = time.monotonic()

    def one(host: LabHost) -> float | None:
        attempt = 15.0
        while (left := timeout - (time.monotonic() - started)) > 0:
            if alive is not None and not alive(host):
                return None  # the kernel is gone (a panic): waiting longer cannot help
            if host.reachable(timeout=max(2.0, min(attempt, left))):
                elapsed = time.monotonic() - started
                if on_ready:
                    on_ready(host, elapsed)
                return elapsed
            attempt = min(attempt * 2, 120.0)
            time.sleep(1.0)
        return None

    with ThreadPoolExecutor(max_workers=max(1, min(32, len(hosts)))) as pool:
        return dict(zip([h.short for h in hosts], pool.map(one, hosts), strict=True))
