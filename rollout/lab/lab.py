"""The lab's life cycle: up (idempotent, recovers a half-started lab), status, down."""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rollout.errors import LabError
from rollout.lab import boot, net
from rollout.lab.host import LabHost
from rollout.lab.inventory import write_inventory
from rollout.lab.material import prepare_state_dir
from rollout.lab.paths import LabPaths, default_netns, default_state_dir
from rollout.lab.playbook import write_playbook
from rollout.lab.proc import pid_alive
from rollout.lab.spec import LabSpec, build_spec

Progress = Callable[[str], None]
DEFAULT_BOOT_TIMEOUT = 300.0
REUSE_TIMEOUT = 90.0  # a running host gets this long to answer before it is restarted (busy machines)


def _quiet(_: str) -> None:
    return None


@dataclass(frozen=True, kw_only=True)
class HostStatus:
    short: str
    fqdn: str
    address: str
    pid: int | None
    ssh_ok: bool | None  # None: not checked (the kernel is not running)

    @property
    def healthy(self) -> bool:
        return self.pid is not None and bool(self.ssh_ok)


@dataclass(frozen=True, kw_only=True)
class DownReport:
    stopped: tuple[str, ...]
    leftover_pids: tuple[int, ...]
    netns_removed: bool


@dataclass(frozen=True, kw_only=True)
class Lab:
    """A handle on a lab's state dir and layout. Holds no processes; safe to copy and share."""

    paths: LabPaths
    spec: LabSpec

    @property
    def state_dir(self) -> Path:
        return self.paths.root

    @property
    def inventory_dir(self) -> Path:
        return self.paths.inventory_dir

    @property
    def inventory_file(self) -> Path:
        return self.paths.inventory_file

    @property
    def netns(self) -> str:
        return self.spec.netns

    @property
    def hosts(self) -> tuple[LabHost, ...]:
        return tuple(LabHost(spec=h, paths=self.paths, netns=self.spec.netns) for h in self.spec.hosts)

    def host(self, name: str) -> LabHost:
        """By short name, FQDN or address."""
        return LabHost(spec=self.spec.host(name), paths=self.paths, netns=self.spec.netns)

    def status(self, *, ssh_timeout: float = 15.0) -> tuple[HostStatus, ...]:
        def one(host: LabHost) -> HostStatus:
            pid = boot.host_running(self.paths, host.short)
            ssh_ok = host.reachable(timeout=ssh_timeout) if pid is not None else None
            return HostStatus(short=host.short, fqdn=host.fqdn, address=host.address, pid=pid, ssh_ok=ssh_ok)

        with ThreadPoolExecutor(max_workers=max(1, min(16, len(self.hosts)))) as pool:
            return tuple(pool.map(one, self.hosts))

    def close(self) -> None:
        """Stop the SSH multiplexing masters this lab's runners opened."""
        for host in self.hosts:
            host.close()


def _paths(state_dir: Path | str | None) -> LabPaths:
    root = Path(state_dir).absolute() if state_dir else default_state_dir()
    if any(c.isspace() for c in str(root)):
        raise LabError(f"lab state dir {root} contains whitespace (it goes on the UML kernel command line)")
    return LabPaths(root)


def load(state_dir: Path | str | None = None) -> Lab:
    """The lab recorded in state_dir (no check that it runs: see Lab.status)."""
    paths = _paths(state_dir)
    try:
        return Lab(paths=paths, spec=LabSpec.from_json(paths.spec_file.read_text()))
    except FileNotFoundError as exc:
        raise LabError(f"no lab in {paths.root}", hint="ipsec-rollout lab up") from exc
    except (ValueError, KeyError) as exc:
        raise LabError(f"{paths.spec_file}: unreadable lab state ({exc})",
                       hint=f"ipsec-rollout lab down --state-dir {paths.root}, then lab up") from exc


@contextlib.contextmanager
def _locked(paths: LabPaths, timeout: float = 900.0) -> Iterator[None]:
    """One up/down at a time per state dir (other test sessions may share the lab)."""
    paths.root.mkdir(parents=True, exist_ok=True)
    with paths.lock_file.open("a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LabError(f"another lab up/down holds {paths.lock_file}") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _running(paths: LabPaths, spec: LabSpec) -> list[str]:
    return [h.short for h in spec.hosts if boot.host_running(paths, h.short) is not None]


def _choose_spec(paths: LabPaths, wanted: LabSpec | None) -> LabSpec:
    """The requested layout, else the recorded one, else the default; refuse to mix layouts."""
    recorded = load(paths.root).spec if paths.spec_file.exists() else None
    if wanted is None:
        return recorded or build_spec(netns=default_netns())
    if recorded is not None and recorded != wanted and _running(paths, recorded):
        raise LabError(f"a lab with another layout is running from {paths.root}",
                       hint=f"ipsec-rollout lab down --state-dir {paths.root}, then lab up again")
    if recorded is not None and recorded.netns != wanted.netns:
        net.release_network(recorded.netns, paths.root, claim_unrecorded=False)
    return wanted


def up(spec: LabSpec | None = None, *, state_dir: Path | str | None = None,
       boot_timeout: float = DEFAULT_BOOT_TIMEOUT, progress: Progress = _quiet) -> Lab:
    """Bring the lab up (or finish bringing it up): reuse healthy hosts, (re)start the others."""
    paths = _paths(state_dir)
    with _locked(paths):
        spec = _choose_spec(paths, spec)
        lab = Lab(paths=paths, spec=spec)
        if not net.netns_exists(spec.netns) and _running(paths, spec):
            progress(f"namespace {spec.netns} is gone: stopping its orphaned hosts")
            boot.stop_all(paths, [h.short for h in spec.hosts])
        progress(f"preparing {paths.root} (keys, certificates)")
        prepare_state_dir(paths, spec)
        paths.spec_file.write_text(spec.to_json())
        net.ensure_network(spec, paths.root)
        _boot_missing(lab, boot_timeout, progress)
        write_inventory(spec, paths)
        write_playbook(spec, paths)
        progress(f"lab up: {len(spec.hosts)} hosts; inventory {paths.inventory_file}")
        return lab


def _ssh_fault_set(lab: Lab, host: LabHost) -> bool:
    """A test made this host unreachable on purpose: never 'repair' it by restarting it."""
    ctl, recorded = lab.paths.ctl_dir(host.short), lab.paths.faults_dir(host.short)
    return (ctl.is_dir() and any(ctl.iterdir())) or (recorded / "ssh-blackhole").exists()


def _boot_missing(lab: Lab, timeout: float, progress: Progress) -> None:
    running = [h for h in lab.hosts if boot.host_running(lab.paths, h.short) is not None]
    faulted = [h for h in running if _ssh_fault_set(lab, h)]
    if faulted:
        progress(f"left alone (SSH fault set): {', '.join(h.short for h in faulted)}")
    reused = [h for h in running if h not in faulted]
    if reused:
        progress(f"checking {len(reused)} running host(s)")
        ready = boot.wait_ready(reused, timeout=REUSE_TIMEOUT)
        for host in reused:
            if ready[host.short] is None:
                progress(f"{host.short}: running but sshd does not answer: restarting it")
                boot.stop_host(lab.paths, host.short)
    fresh = [h for h in lab.hosts if boot.host_running(lab.paths, h.short) is None]
    for host in fresh:
        net.ensure_tap(lab.spec, host.spec)
        boot.start_host(lab.paths, lab.spec, host.spec)
    if fresh:
        progress(f"booted {len(fresh)} host(s); waiting for sshd (up to {timeout:.0f} s)")
        _wait_or_fail(lab, fresh, timeout)


def _kernel_alive(lab: Lab, host: LabHost) -> bool:
    # Only the PID: its cmdline reads empty for a moment while ip-netns-exec and the guard exec.
    pid = boot.recorded_pid(lab.paths, host.short)
    return pid is not None and pid_alive(pid)


def _wait_or_fail(lab: Lab, hosts: Sequence[LabHost], timeout: float) -> None:
    ready = boot.wait_ready(hosts, timeout=timeout, alive=lambda h: _kernel_alive(lab, h))
    late = [h for h in hosts if ready[h.short] is None]
    dead = {h.short: boot.console_verdict(lab.paths, h.short) or "its kernel exited (no panic line)"
            for h in late if not _kernel_alive(lab, h)}
    if dead:
        short, why = sorted(dead.items())[0]
        raise LabError(
            f"lab kernel(s) died while booting: {', '.join(sorted(dead))}; {short}: {why}",
            hint=f"see {lab.paths.console(short)}; docs/lab.md lists the known host/kernel problems")
    if late:
        names = ", ".join(h.short for h in late)
        raise LabError(
            f"lab hosts not reachable over SSH after {timeout:.0f} s: {names}",
            hint=f"see {lab.paths.console(late[0].short)}; `ipsec-rollout lab up` again restarts "
                 "only those hosts; `ipsec-rollout lab down` stops everything")


def down(state_dir: Path | str | None = None, *, netns: str | None = None, purge: bool = False,
         progress: Progress = _quiet) -> DownReport:
    """Stop every host (by recorded PID and process group), remove the namespace, check nothing is left."""
    paths = _paths(state_dir)
    with _locked(paths):
        spec = LabSpec.from_json(paths.spec_file.read_text()) if paths.spec_file.exists() else None
        shorts = [h.short for h in spec.hosts] if spec else _host_dirs(paths)
        namespace = netns or (spec.netns if spec else default_netns())
        if spec:
            Lab(paths=paths, spec=spec).close()
        running = tuple(s for s in shorts if boot.host_running(paths, s) is not None)
        progress(f"stopping {len(running)} host(s)")
        left = boot.stop_all(paths, shorts)
        # Without a recorded layout or an explicit --netns, never delete a namespace nobody says is ours.
        removed = net.release_network(namespace, paths.root, claim_unrecorded=bool(spec or netns))
        if purge and not left:
            shutil.rmtree(paths.root, ignore_errors=True)
    report = DownReport(stopped=running, leftover_pids=tuple(left), netns_removed=removed)
    if left or not removed:
        raise LabError(f"lab down incomplete: UML pids left {left}, namespace removed: {removed}",
                       hint="kill the listed PIDs, then `ip netns del " + namespace + "`")
    return report


def _host_dirs(paths: LabPaths) -> list[str]:
    hosts = paths.root / "hosts"
    return sorted(p.name for p in hosts.iterdir()) if hosts.is_dir() else []
