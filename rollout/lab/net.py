"""The lab network: one namespace holding a bridge (the lab's "switch") and one tap per host."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from rollout.errors import LabError
from rollout.lab.paths import OWNERS_DIR
from rollout.lab.proc import cmdline, run, uml_pids
from rollout.lab.spec import HostSpec, LabSpec


def netns_exists(name: str) -> bool:
    listing = run(["ip", "netns", "list"], check=False).stdout
    return any(line.split(" ", 1)[0] == name for line in listing.splitlines())


def link_exists(netns: str, link: str) -> bool:
    return run(["ip", "-n", netns, "link", "show", "dev", link], check=False).returncode == 0


def owner(netns: str) -> Path | None:
    """The state dir of the lab that created this namespace, if recorded."""
    try:
        return Path((OWNERS_DIR / f"{netns}.owner").read_text().strip())
    except OSError:
        return None


def _claim(netns: str, root: Path) -> None:
    OWNERS_DIR.mkdir(parents=True, exist_ok=True)
    (OWNERS_DIR / f"{netns}.owner").write_text(f"{root}\n")


def foreign_kernels(netns: str, root: Path) -> list[int]:
    """UML kernels running in this namespace that another state dir started."""
    try:
        inode = os.stat(f"/run/netns/{netns}").st_ino
    except OSError:
        return []
    ours = f"uml_dir={root / 'uml'}"
    found = []
    for pid in uml_pids(None):
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{pid}/ns/net").st_ino == inode and ours not in cmdline(pid):
                found.append(pid)
    return found


def _check_owner(netns: str, root: Path) -> None:
    """Refuse to share a namespace with another lab that still runs; take over an abandoned one."""
    other = owner(netns)
    if not netns_exists(netns) or (other in (None, root) and not foreign_kernels(netns, root)):
        return
    if foreign_kernels(netns, root):
        where = f"the running lab in {other}" if other else "another running lab"
        raise LabError(f"namespace {netns} belongs to {where}",
                       hint="use another namespace (--netns / $ROLLOUT_LAB_NETNS)"
                            + (f", or `ipsec-rollout lab down --state-dir {other}`" if other else ""))
    destroy_network(netns)


def ensure_network(spec: LabSpec, root: Path) -> None:
    """Create the namespace and bridge if missing. No default route: nothing can leave the lab."""
    _check_owner(spec.netns, root)
    if not netns_exists(spec.netns):
        run(["ip", "netns", "add", spec.netns])
    _claim(spec.netns, root)
    ns = ["ip", "-n", spec.netns]
    run([*ns, "link", "set", "lo", "up"])
    if not link_exists(spec.netns, spec.bridge):
        run([*ns, "link", "add", spec.bridge, "type", "bridge", "stp_state", "0"])
        run([*ns, "addr", "add", f"{spec.bridge_ipv4}/{spec.prefix4}", "dev", spec.bridge])
        run([*ns, "addr", "add", f"{spec.bridge_ipv6}/{spec.prefix6}", "dev", spec.bridge, "nodad"])
    run([*ns, "link", "set", spec.bridge, "up"])
    _check_no_default_route(spec.netns)


def _check_no_default_route(netns: str) -> None:
    for family in ("-4", "-6"):
        routes = run(["ip", "-n", netns, family, "route", "show", "default"], check=False).stdout
        if routes.strip():
            raise LabError(f"namespace {netns} has a default route ({routes.strip()}); the lab must not",
                           hint=f"ip netns del {netns}, then lab up again")


def ensure_tap(spec: LabSpec, host: HostSpec) -> None:
    """(Re)create the host's tap: a fresh one per boot, so a dead kernel's tap never lingers."""
    ns = ["ip", "-n", spec.netns]
    if link_exists(spec.netns, host.tap):
        run([*ns, "link", "del", host.tap])
    run(["ip", "netns", "exec", spec.netns, "ip", "tuntap", "add", "dev", host.tap, "mode", "tap"])
    run([*ns, "link", "set", host.tap, "master", spec.bridge, "up"])


def destroy_network(netns: str) -> None:
    """Delete the namespace (its bridge and taps go with it)."""
    if netns_exists(netns):
        run(["ip", "netns", "del", netns])
    (OWNERS_DIR / f"{netns}.owner").unlink(missing_ok=True)


def release_network(netns: str, root: Path, *, claim_unrecorded: bool) -> bool:
    """Delete the namespace if this lab owns it (or, with claim_unrecorded, if no owner is recorded).
    True if it no longer exists or is not ours to touch."""
    other = owner(netns)
    if netns_exists(netns) and other != root and (other is not None or not claim_unrecorded):
        return True
    destroy_network(netns)
    return not netns_exists(netns)
