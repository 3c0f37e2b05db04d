"""The lab's "done means" (issue 3): real SSH with host keys, real ESP on the wire, clean teardown."""

from __future__ import annotations

import re
import shlex
import shutil
import time
from pathlib import Path

import pytest

from tests.lab_fixture import LabHandle, lab_skip_reason

A, B = "cp1001", "cp3001"  # a core <-> edge pair of cache_text in the default lab


# --- pure parts (no lab needed) ----------------------------------------------------------------------
def test_layout_and_inventory_are_valid(tmp_path: Path) -> None:
    from rollout import inventory, pairing, playbook
    from rollout.lab.inventory import write_inventory
    from rollout.lab.paths import LabPaths
    from rollout.lab.playbook import write_playbook
    from rollout.lab.spec import build_spec

    spec = build_spec()
    paths = LabPaths(tmp_path)
    write_inventory(spec, paths)
    write_playbook(spec, paths)
    fleet = inventory.load_dir(paths.inventory_dir)
    pairs = pairing.compute_pairs(fleet)
    assert len(fleet.hosts) == 8
    assert {p.rule for p in pairs} == {"core-core", "core-edge"}
    assert all(p.families == ("v4", "v6") for p in pairs)
    assert all(h.os == "lab-uml" and h.ssh.netns == "ipsec-lab" for h in fleet.hosts.values())
    for host in fleet.hosts.values():
        assert str(host.ipv4).startswith("198.18.0.") and str(host.ipv6).startswith("fd00:1ab::")
    stages = playbook.resolve_stages(playbook.load_playbook(paths.playbook_file, fleet, pairs), fleet, pairs)
    assert sum(len(s) for s in stages) == 8


def test_xstate_guard_only_on_amx_hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rollout.lab import boot

    monkeypatch.delenv("ROLLOUT_LAB_XSTATE_GUARD", raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx512f amx_bf16 amx_tile amx_int8\n")
    assert boot.needs_xstate_guard(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f\n")
    assert not boot.needs_xstate_guard(cpuinfo)
    monkeypatch.setenv("ROLLOUT_LAB_XSTATE_GUARD", "1")
    assert boot.needs_xstate_guard(cpuinfo)


def test_xstate_guard_refuses_only_the_xstate_regset() -> None:
    """The seccomp program, run by the kernel's own interpreter in a child: the guarded ptrace
    requests get EIO, any other ptrace request and any other syscall go through."""
    import subprocess
    import sys

    from rollout.lab import boot

    child = """
import ctypes, errno, os, runpy, sys
guard = runpy.run_path(sys.argv[1])
guard["install"]()
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
def errno_of(request, regset):
    ctypes.set_errno(0)
    libc.ptrace(request, os.getpid(), ctypes.c_void_p(regset), None)
    return ctypes.get_errno()
print(errno_of(0x4204, 0x202), errno_of(0x4205, 0x202), errno_of(0x4204, 1), os.getpid() > 0)
"""
    out = subprocess.run([sys.executable, "-c", child, str(boot.XSTATE_GUARD)], capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    assert out[:2] == ["5", "5"]  # EIO from the filter for GETREGSET/SETREGSET NT_X86_XSTATE
    assert out[2] != "5" and out[3] == "True"  # the kernel's own answer (ESRCH: not our tracee)


def test_console_verdict_names_the_panic(tmp_path: Path) -> None:
    from rollout.lab import boot
    from rollout.lab.paths import LabPaths

    paths = LabPaths(tmp_path)
    paths.console("cp1001").parent.mkdir(parents=True)
    paths.console("cp1001").write_text(
        "Run /x/init.sh as init process\nuserspace - ptrace set fp regs failed, errno = 14\n"
        "Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b\n [<606931e5>] panic\n")
    verdict = boot.console_verdict(paths, "cp1001")
    assert "ptrace set fp regs failed" in verdict and "Kernel panic" in verdict
    paths.console("cp1001").write_text("lab-init: ready to hand over to busybox init\n")
    assert boot.console_verdict(paths, "cp1001") == ""


def test_probe_classifies_tcpdump_lines() -> None:
    from rollout.lab.probe import classify

    lines = [
        "10:00:00.1 IP 198.18.0.11 > 198.18.0.15: ESP(spi=0xc1,seq=0x1), length 120",
        "10:00:00.2 IP6 fd00:1ab::11 > fd00:1ab::15: ESP(spi=0xc2,seq=0x1), length 140",
        "10:00:00.3 IP 198.18.0.11 > 198.18.0.15: ICMP echo request, id 1, seq 1, length 64",
        "10:00:00.4 IP6 fd00:1ab::15 > fd00:1ab::11: ICMP6, echo reply, id 1, seq 1, length 64",
        "10:00:00.5 IP 198.18.0.11.4500 > 198.18.0.15.4500: NONESP-encap: isakmp: child_sa  inf2",
        "10:00:00.6 ARP, Request who-has 198.18.0.15 tell 198.18.0.11, length 28",
    ]
    counts = classify(lines)
    assert (counts.esp, counts.cleartext_icmp, counts.ike) == (2, 2, 1)


def test_cli_status_without_a_lab_says_what_to_do(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from rollout.cli import _register, app, run_guarded

    _register()
    runner = CliRunner()
    result = runner.invoke(app, ["lab", "status", "--state-dir", str(tmp_path)])
    assert isinstance(result.exception, Exception) and "no lab in" in str(result.exception)
    argv = ["lab", "fault", "list", "--state-dir", str(tmp_path)]
    code = run_guarded(lambda: app(argv, standalone_mode=False))
    assert code == 30


def test_spec_addresses_names_and_json_round_trip() -> None:
    from rollout.lab.spec import LabSpec, build_spec

    spec = build_spec(("core1", "edge1", "x:edge"), hosts_per_cluster=3,
                      clusters=("cache_text", "cache_upload"))
    assert len(spec.hosts) == 18 and len({h.short for h in spec.hosts}) == 18
    assert spec.host("cu3103").tier.value == "edge"
    assert str(spec.host("cp1001").ipv6) == "fd00:1ab::11" and spec.host("198.18.0.12").short == "cp1002"
    assert LabSpec.from_json(spec.to_json()) == spec


# --- the running lab ---------------------------------------------------------------------------------
@pytest.mark.lab
def test_ssh_to_every_host_with_strict_host_keys(lab: LabHandle) -> None:
    with lab.exclusive():  # another session's test may be stopping charon somewhere right now
        for short, host in lab.hosts.items():
            result = host.run("hostname; cat /etc/lab/fqdn; /etc/lab/svc status && echo charon-active")
            assert result.exit_code == 0, result.stderr
            assert result.stdout.split() == [short, host.fqdn, "charon-active"]


@pytest.mark.lab
def test_unknown_host_key_is_refused(lab: LabHandle, tmp_path: Path) -> None:
    host = lab.host(A)
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    argv = host.ssh_argv("true", multiplex=False)
    argv = [a.replace(str(lab.state_dir / "known_hosts"), str(empty)) for a in argv]
    import subprocess

    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 255
    assert "Host key verification failed" in done.stderr


@pytest.mark.lab
def test_guest_starts_clean(clean_lab: LabHandle) -> None:
    host = clean_lab.host(A)
    out = host.run("ls -A /etc/swanctl/conf.d; swanctl --list-conns; ip xfrm state list nokeys", check=True)
    assert out.stdout.strip() == ""
    ssl = "/var/lib/puppet/ssl"
    perms = host.run(f"stat -c %a {ssl}/private_keys/{host.fqdn}.pem {ssl}/certs/ca.pem", check=True)
    assert perms.stdout.split() == ["600", "644"]


@pytest.mark.lab
def test_charon_supervisor_restarts_unless_disabled(clean_lab: LabHandle) -> None:
    host = clean_lab.host(B)
    host.run("/etc/lab/svc stop", check=True)
    assert host.run("/etc/lab/svc start", timeout=60).ok  # the supervisor brought it back
    host.run("/etc/lab/svc disable && /etc/lab/svc stop", check=True)
    time.sleep(3)
    assert host.run("/etc/lab/svc status").exit_code != 0
    assert host.run("/etc/lab/svc start").exit_code != 0  # masked
    host.run("/etc/lab/svc enable && /etc/lab/svc start", check=True, timeout=60)


def _deploy_pair(lab: LabHandle, a: str, b: str) -> list[str]:
    """Render (rollout.render) both ends of one pair, install with the certificate copies, load."""
    from rollout import pairing, render

    fleet = lab.fleet()
    fa, fb = lab.host(a).fqdn, lab.host(b).fqdn
    pairs = tuple(p for p in pairing.compute_pairs(fleet) if {p.a, p.b} == {fa, fb})
    assert len(pairs) == 1
    names = []
    for fqdn in (fb, fa):  # responder first, so the initiator's start finds a loaded peer
        rendered = render.render_host(fleet, pairs, fqdn)
        script = ["install -d -m 0700 /etc/swanctl/private"]
        for m in rendered.material:
            script.append(f"install -m {m.mode:o} {shlex.quote(m.source)} {shlex.quote(m.dest)}")
        for f in rendered.files:
            script.append(f"cat > {shlex.quote(f.path)} <<'LABEOF'\n{f.content}LABEOF")
        script.append("swanctl --reload-settings && swanctl --load-all")
        lab.host(fqdn).run("\n".join(script), check=True, timeout=90)
        names += [c.name for c in rendered.connections]
    return names


def _transport_sas(host, peer_v4: str, peer_v6: str) -> tuple[int, int]:
    out = host.run("ip xfrm state list nokeys", check=True).stdout
    assert not re.search(r"0x[0-9a-f]{32,}", out), "key material printed"
    blocks = re.split(r"\n(?=src )", out.strip())
    v4 = sum(1 for blk in blocks if peer_v4 in blk and "mode transport" in blk and "proto esp" in blk)
    v6 = sum(1 for blk in blocks if peer_v6 in blk and "mode transport" in blk and "proto esp" in blk)
    return v4, v6


def _wait_for_sas(lab: LabHandle, a: str, b: str, timeout: float = 120.0) -> None:
    ha, hb = lab.host(a), lab.host(b)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sa = _transport_sas(ha, str(hb.spec.ipv4), str(hb.spec.ipv6))
        sb = _transport_sas(hb, str(ha.spec.ipv4), str(ha.spec.ipv6))
        if min(*sa, *sb) >= 2:  # one inbound + one outbound SA per family, on both ends
            return
        time.sleep(2)
    logs = ha.run("tail -30 /var/log/charon.log").stdout
    pytest.fail(f"no transport-mode SAs between {a} and {b} after {timeout:.0f} s\n{logs}")


@pytest.mark.lab
def test_esp_on_the_wire_then_cleartext_after_teardown(clean_lab: LabHandle) -> None:
    from rollout.lab.probe import count_packets

    lab = clean_lab
    names = _deploy_pair(lab, A, B)
    _wait_for_sas(lab, A, B)
    for family in ("v4", "v6"):
        seen = count_packets(lab.lab, A, B, family, 2.0)
        assert seen.encrypted, seen
        assert seen.pings_received > 0, seen
    for short in (A, B):
        terminate = "; ".join(f"swanctl --terminate --force --ike {n} --timeout 5" for n in names)
        lab.host(short).run(
            "rm -f /etc/swanctl/conf.d/ipsec-rollout.conf; swanctl --load-all; "
            f"{terminate}; ip xfrm state flush; ip xfrm policy flush", timeout=90)
    for family in ("v4", "v6"):
        seen = count_packets(lab.lab, A, B, family, 2.0)
        assert seen.cleartext and seen.pings_received > 0, seen


# --- life cycle on a small private lab ----------------------------------------------------------------
@pytest.fixture(scope="module")
def small_lab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = lab_skip_reason()
    if reason:
        pytest.skip(reason)
    return Path("/tmp") / f"ipsec-lab-small-{tmp_path_factory.getbasetemp().name}"


@pytest.mark.lab
def test_up_recovers_and_down_leaves_nothing(small_lab_dir: Path) -> None:
    from rollout import lab as labmod
    from rollout.errors import LabError
    from rollout.lab import boot, net, proc
    from rollout.lab.spec import build_spec

    spec = build_spec(("core1", "edge1"), hosts_per_cluster=1, netns="ipsec-lab-small")
    try:
        lab = labmod.up(spec, state_dir=small_lab_dir, boot_timeout=240)
        first, second = (boot.host_running(lab.paths, h.short) for h in lab.hosts)
        assert first and second
        with pytest.raises(LabError, match="belongs to the running lab"):  # a second lab, same namespace
            labmod.up(spec, state_dir=small_lab_dir.with_name(small_lab_dir.name + "-other"))
        proc.kill_group(second)  # half-dead lab: one kernel gone
        proc.wait_gone([second], 10)
        lab = labmod.up(spec, state_dir=small_lab_dir, boot_timeout=240)
        again = [boot.host_running(lab.paths, h.short) for h in lab.hosts]
        assert again[0] == first and again[1] not in (None, second)
        assert all(h.run("true").ok for h in lab.hosts)
    finally:
        report = labmod.down(small_lab_dir, purge=True)
        shutil.rmtree(small_lab_dir.with_name(small_lab_dir.name + "-other"), ignore_errors=True)
    assert not report.leftover_pids and report.netns_removed
    assert proc.uml_pids(small_lab_dir / "uml") == []
    assert not net.netns_exists("ipsec-lab-small")


@pytest.mark.lab
def test_faults_break_and_restore(clean_lab: LabHandle) -> None:
    from rollout.lab import faults

    lab, victim, peer = clean_lab.lab, "cp1002", "cp1001"
    host = lab.host(victim)
    cert = f"/var/lib/puppet/ssl/certs/{host.fqdn}.pem"
    verify = f"pki --verify --in {cert} --cacert /var/lib/puppet/ssl/certs/ca.pem"
    ping = f"ping -c 3 -i 0.3 -W 1 {host.spec.ipv4}"

    faults.set_fault(lab, victim, "charon-down")
    time.sleep(3)  # the supervisor would have restarted it by now
    assert host.run("/etc/lab/svc status").exit_code == 1
    faults.clear_fault(lab, victim, "charon-down")
    assert host.run("/etc/lab/svc status").ok

    for mode in ("garbage", "wrong-ca"):
        faults.set_fault(lab, victim, "bad-cert", cert_mode=mode)
        assert host.run(verify).exit_code != 0, mode
    faults.clear_fault(lab, victim, "bad-cert")
    assert host.run(verify).ok

    faults.set_fault(lab, victim, "loss", percent=100)
    assert " 0 received" in lab.host(peer).run(ping, timeout=60).stdout
    assert host.run("true").ok  # SSH is spared by default
    faults.set_fault(lab, victim, "delay", delay_ms=300)
    assert faults.active_faults(lab) == {victim: ("delay", "loss")}
    faults.clear_fault(lab, victim, "loss")
    rtt = lab.host(peer).run(ping, timeout=60).stdout
    assert " 3 received" in rtt and float(rtt.rsplit("=", 1)[1].split("/")[1]) >= 300, rtt
    faults.clear_fault(lab, victim, "delay")

    for kind in ("ssh-down", "ssh-hang", "ssh-blackhole"):
        faults.set_fault(lab, victim, kind)
        assert not host.reachable(timeout=8), kind
        faults.clear_fault(lab, victim, kind)
        assert host.reachable(timeout=120), kind

    faults.set_fault(lab, victim, "loss", percent=50)
    faults.set_fault(lab, victim, "ssh-down")
    faults.clear_all(lab)
    assert faults.active_faults(lab) == {}
    assert host.reachable(timeout=120)
