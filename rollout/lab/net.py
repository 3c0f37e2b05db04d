"""The lab network: one namespace holding a bridge (the lab's "switch") and one tap per host."""

from __future__ import annotations

from rollout.errors import LabError
from rollout.lab.proc import run
from rollout.lab.spec import HostSpec, LabSpec


def netns_exists(name: str) -> bool:
    listing = run(["ip", "netns", "list"], check=False).stdout
    return any(line.split(" ", 1)[0] == name for line in listing.splitlines())


def link_exists(netns: str, link: str) -> bool:
    return run(["ip", "-n", netns, "link", "show", "dev", link], check=False).returncode == 0


def ensure_network(spec: LabSpec) -> None:
    """Create the namespace and bridge if missing. No default route: nothing can leave the lab."""
    if not netns_exists(spec.netns):
        run(["ip", "netns", "add", spec.netns])
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
