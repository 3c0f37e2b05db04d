"""Fault injection for resilience tests: break one thing on one lab host, and put it back.

Faults that break SSH itself are driven through the host's control dir (read by the guest's labd every
second) or from the namespace side; the others run over SSH inside the guest. Each fault set is recorded
in <state>/hosts/<short>/faults/<kind> so `clear_all` and `lab fault list` know about it.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable, Iterable
from typing import Literal, get_args

from rollout.errors import LabError
from rollout.lab.host import LabHost
from rollout.lab.lab import Lab
from rollout.lab.proc import netns_argv, run

FaultKind = Literal["ssh-down", "ssh-hang", "ssh-blackhole", "charon-down", "loss", "delay", "bad-cert"]
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)
CertMode = Literal["garbage", "wrong-ca"]
_CHAIN = "LABFAULT"
_CTL_KINDS = ("ssh-down", "ssh-hang")


def parse_kind(text: str) -> FaultKind:
    """A fault kind from the command line, or LabError listing the kinds."""
    for kind in get_args(FaultKind):
        if kind == text:
            return kind
    raise LabError(f"unknown fault {text!r}", hint=f"one of {', '.join(FAULT_KINDS)}")


def _record(host: LabHost, kind: str, params: dict[str, object]) -> None:
    path = host.paths.faults_dir(host.short) / kind
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(params) + "\n")


def _forget(host: LabHost, kind: str) -> None:
    (host.paths.faults_dir(host.short) / kind).unlink(missing_ok=True)


def active_faults(lab: Lab) -> dict[str, tuple[str, ...]]:
    """Recorded faults by host short name (hosts without faults left out)."""
    found = {}
    for host in lab.hosts:
        fdir = lab.paths.faults_dir(host.short)
        kinds = tuple(sorted(p.name for p in fdir.iterdir())) if fdir.is_dir() else ()
        if kinds:
            found[host.short] = kinds
    return found


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise LabError(f"fault: {what} not seen within {timeout:.0f} s")
        time.sleep(0.5)


# --- SSH faults through the control dir (labd in the guest applies them within ~1 s) ----------------
def _set_ctl(host: LabHost, kind: str) -> None:
    (host.paths.ctl_dir(host.short) / kind).touch()
    time.sleep(2.5)  # two labd periods: the guest has acted on it


def _clear_ctl(host: LabHost, kind: str, wait: bool) -> None:
    (host.paths.ctl_dir(host.short) / kind).unlink(missing_ok=True)
    if wait:
        _wait(lambda: host.reachable(timeout=30.0), 180.0, f"{host.short}: sshd back")


# --- SSH blackhole from the namespace side: SYNs to port 22 vanish (connect timeout) ---------------
def _blackhole_rule(host: LabHost, tool: str, address: str, op: str) -> list[str]:
    return netns_argv(host.netns, [tool, "-w", "5", op, "OUTPUT", "-d", address, "-p", "tcp", "--dport", "22",
                                   "-m", "comment", "--comment", "ipsec-rollout-lab-fault", "-j", "DROP"])


def _set_blackhole(host: LabHost) -> None:
    for tool, address in (("iptables", str(host.spec.ipv4)), ("ip6tables", str(host.spec.ipv6))):
        if run(_blackhole_rule(host, tool, address, "-C"), check=False).returncode != 0:
            run(_blackhole_rule(host, tool, address, "-I"))


def _clear_blackhole(host: LabHost) -> None:
    for tool, address in (("iptables", str(host.spec.ipv4)), ("ip6tables", str(host.spec.ipv6))):
        while run(_blackhole_rule(host, tool, address, "-D"), check=False).returncode == 0:
            pass


# --- faults inside the guest, over SSH ---------------------------------------------------------------
def _loss_script(percent: float, include_ssh: bool) -> str:
    probability = f"{percent / 100:.4f}"
    lines = []
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        lines += [f"{tool} -N {_CHAIN} 2>/dev/null; {tool} -F {_CHAIN}"]
        for chain in ("INPUT", "OUTPUT"):
            lines.append(f"{tool} -C {chain} -j {_CHAIN} 2>/dev/null || {tool} -I {chain} -j {_CHAIN}")
        if not include_ssh:  # keep the lab's own control path usable
            lines += [f"{tool} -A {_CHAIN} -p tcp --dport 22 -j RETURN",
                      f"{tool} -A {_CHAIN} -p tcp --sport 22 -j RETURN"]
        lines.append(f"{tool} -A {_CHAIN} -m statistic --mode random --probability {probability} -j DROP")
    return " && ".join(f"{{ {line}; }}" for line in lines)


def _unloss_script() -> str:
    parts = []
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        for chain in ("INPUT", "OUTPUT"):
            parts.append(f"while {tool} -D {chain} -j {_CHAIN} 2>/dev/null; do :; done")
        parts.append(f"{{ {tool} -F {_CHAIN} 2>/dev/null; {tool} -X {_CHAIN} 2>/dev/null; }}")
    return "; ".join(parts) + "; true"


def _cert_paths(host: LabHost) -> tuple[str, str]:
    live = f"/var/lib/puppet/ssl/certs/{host.fqdn}.pem"
    pristine = f"/run/lab/state/hosts/{host.short}/puppet/cert.pem"  # the state dir, through hostfs
    return live, pristine


def _bad_cert_pem(host: LabHost, mode: CertMode) -> str:
    if mode == "garbage":
        pem = (host.paths.host_dir(host.short) / "puppet" / "cert.pem").read_text()
        return pem[: len(pem) // 2] + "\n-----END CERTIFICATE-----\n"
    return _rogue_cert(host)


def _rogue_cert(host: LabHost) -> str:
    """The host's own key, its own name, signed by a CA nobody trusts."""
    rogue = host.paths.ca_dir / "rogue"
    rogue.mkdir(parents=True, exist_ok=True)
    key, cert = rogue / "ca.key", rogue / "ca.pem"
    if not cert.exists():
        key.write_text(run(["pki", "--gen", "--type", "ecdsa", "--size", "256", "--outform", "pem"]).stdout)
        cert.write_text(run(["pki", "--self", "--ca", "--in", str(key), "--type", "ecdsa",
                             "--dn", "C=XX, O=rogue, CN=rogue CA", "--outform", "pem"]).stdout)
    hkey = host.paths.host_dir(host.short) / "puppet" / "key.pem"
    return run(["pki", "--issue", "--in", str(hkey), "--type", "ecdsa", "--cacert", str(cert),
                "--cakey", str(key), "--dn", f"CN={host.fqdn}",
                "--san", host.fqdn, "--outform", "pem"]).stdout


# --- public API ----------------------------------------------------------------------------------------
def set_fault(lab: Lab, name: str, kind: FaultKind, *, percent: float = 10.0, delay_ms: int = 50,
              cert_mode: CertMode = "garbage", include_ssh: bool = False) -> None:
    """Apply one fault to one host (by short name, FQDN or address). Idempotent."""
    host = lab.host(name)
    if kind in _CTL_KINDS:
        _set_ctl(host, kind)
    elif kind == "ssh-blackhole":
        _set_blackhole(host)
    elif kind == "charon-down":
        host.run("/etc/lab/svc disable && /etc/lab/svc stop", check=True)
    elif kind == "loss":
        if not 0 < percent <= 100:
            raise LabError(f"loss percentage must be in (0, 100], got {percent}")
        host.run(_loss_script(percent, include_ssh), check=True)
    elif kind == "delay":
        host.run(f"tc qdisc replace dev eth0 root netem delay {int(delay_ms)}ms", check=True)
    elif kind == "bad-cert":
        live, _ = _cert_paths(host)
        host.run(f"cat > {shlex.quote(live)}", stdin=_bad_cert_pem(host, cert_mode), check=True)
    else:
        raise LabError(f"unknown fault {kind!r}", hint=f"one of {', '.join(FAULT_KINDS)}")
    _record(host, kind, {"percent": percent, "delay_ms": delay_ms, "cert_mode": cert_mode})


def clear_fault(lab: Lab, name: str, kind: FaultKind, *, wait: bool = True) -> None:
    """Undo one fault (whether or not it was recorded)."""
    host = lab.host(name)
    if kind in _CTL_KINDS:
        _clear_ctl(host, kind, wait)
    elif kind == "ssh-blackhole":
        _clear_blackhole(host)
    elif kind == "charon-down":
        host.run("/etc/lab/svc enable && /etc/lab/svc start", check=True)
    elif kind == "loss":
        host.run(_unloss_script(), check=True)
    elif kind == "delay":
        host.run("tc qdisc del dev eth0 root 2>/dev/null; true", check=True)
    elif kind == "bad-cert":
        live, pristine = _cert_paths(host)
        host.run(f"cp {shlex.quote(pristine)} {shlex.quote(live)}", check=True)
    else:
        raise LabError(f"unknown fault {kind!r}", hint=f"one of {', '.join(FAULT_KINDS)}")
    _forget(host, kind)


def clear_all(lab: Lab, names: Iterable[str] | None = None) -> None:
    """Undo every fault on the given hosts (default: all): SSH faults first (recorded or not), so the
    hosts are reachable again, then every other recorded fault."""
    hosts = [lab.host(n) for n in names] if names is not None else list(lab.hosts)
    recorded = active_faults(lab)
    for host in hosts:
        ctl_set = [k for k in _CTL_KINDS if (host.paths.ctl_dir(host.short) / k).exists()]
        for kind in _CTL_KINDS:
            clear_fault(lab, host.short, parse_kind(kind), wait=kind in ctl_set)
        clear_fault(lab, host.short, "ssh-blackhole")
    for host in hosts:
        for kind in recorded.get(host.short, ()):
            if kind not in (*_CTL_KINDS, "ssh-blackhole"):
                clear_fault(lab, host.short, parse_kind(kind))
