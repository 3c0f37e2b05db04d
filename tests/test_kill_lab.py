"""ipsec-kill against the UML lab (issue 5 "done means"), through the real CLI and SSH code path.

With transport-mode SAs up on every lab pair: `ipsec-kill --all --yes` leaves every host with zero
xfrm states and dir in/out/fwd policies and no charon (and the lab supervisor does NOT restart it),
traffic still flows in cleartext with no ESP; a second run reports already-clean; with one host's
sshd down the others are killed, the exit code is PARTIAL and the report names that host; --rearm
lifts the latch.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from rollout.errors import ExitCode
from tests.lab_fixture import LabHandle

pytestmark = pytest.mark.lab

KEYS = re.compile(r"0x[0-9a-f]{32,}|PRIVATE KEY", re.I)
SLOW = ["--connect-timeout", "40", "--command-timeout", "150", "--deadline", "600", "--parallel", "8"]


def _deploy_all(lab: LabHandle) -> None:
    """Render every pair of the lab inventory, install and load on every host (rollout.render).

    In waves, responders first (hosts that initiate fewer pairs), so that no initiator's first attempt
    meets a peer with nothing loaded; then every initiator (re)initiates its connections explicitly.
    """
    from concurrent.futures import ThreadPoolExecutor

    from rollout import pairing, render

    fleet = lab.fleet()
    pairs = pairing.compute_pairs(fleet)
    initiated = {h: sum(1 for p in pairs if p.initiator == h) for h in fleet.hosts}
    children: dict[str, list[str]] = {}

    def install(fqdn: str) -> None:
        rendered = render.render_host(fleet, pairs, fqdn)
        script = ["install -d -m 0700 /etc/swanctl/private"]
        script += [f"install -m {m.mode:o} {shlex.quote(m.source)} {shlex.quote(m.dest)}"
                   for m in rendered.material]
        script += [f"cat > {shlex.quote(f.path)} <<'LABEOF'\n{f.content}LABEOF" for f in rendered.files]
        script.append("swanctl --reload-settings && swanctl --load-all")
        lab.host(fqdn).run("\n".join(script), check=True, timeout=180)
        children[fqdn] = [c.name for c in rendered.connections if c.initiator]

    with ThreadPoolExecutor(max_workers=8) as pool:
        for wave in sorted(set(initiated.values())):
            list(pool.map(install, sorted(h for h, n in initiated.items() if n == wave)))
        list(pool.map(_initiate, [(lab, h, children[h]) for h in sorted(fleet.hosts) if children[h]]))


def _initiate(args: tuple[LabHandle, str, list[str]]) -> None:
    lab, fqdn, names = args
    script = "; ".join(f"swanctl --initiate --child {shlex.quote(n)} --timeout 30 >/dev/null 2>&1"
                       for n in names)
    lab.host(fqdn).run(script, timeout=60 + 35 * len(names))


def _counts(lab: LabHandle, short: str) -> dict[str, int]:
    script = ("ip xfrm state count; ip xfrm policy list | grep -cE '^[[:space:]]*dir (in|out|fwd) ' || true; "
              "pgrep -x charon | wc -l")
    out = lab.host(short).run(script, check=True, timeout=120).stdout
    assert not KEYS.search(out)
    lines = out.split("\n")
    return {"states": int(lines[0].split()[-1]), "policies": int(lines[1]), "charon": int(lines[2])}


def _wait_for_states(lab: LabHandle, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    pending = set(lab.hosts)
    while pending and time.monotonic() < deadline:
        pending = {s for s in pending if _counts(lab, s)["states"] < 4}
        if pending:
            time.sleep(3)
    assert not pending, f"no SAs on {sorted(pending)} after {timeout:.0f} s"


def _kill(args: list[str], tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> tuple[int, Any]:
    from rollout.cli import kill as kill_cli

    report = tmp_path / f"{name}.json"
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    argv = ["ipsec-kill", *args, "--yes", "--report", str(report), "--state-dir", str(tmp_path / "state"),
            "--reason", f"lab drill {name}"]
    monkeypatch.setattr(sys, "argv", argv)
    try:
        kill_cli.main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, json.loads(report.read_text())


def test_kill_drill(clean_lab: LabHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rollout.lab import faults, probe

    lab = clean_lab
    inv = ["--inventory", str(lab.inventory_dir)]
    shorts = list(lab.hosts)
    _deploy_all(lab)
    _wait_for_states(lab)
    before = probe.count_packets(lab.lab, shorts[0], shorts[2], "v4", seconds=2.0)
    assert before.esp > 0, before

    # 1. kill everything
    code, report = _kill(["--all", *inv, *SLOW], tmp_path, "first", monkeypatch)
    assert code == ExitCode.OK, report
    assert report["summary"]["killed"] == len(shorts) and report["not_clean"] == []
    assert (tmp_path / "state" / "kill-requested").exists()
    time.sleep(6)  # several supervisor periods: charon must stay down (disabled, not just stopped)
    for short in shorts:
        assert _counts(lab, short) == {"states": 0, "policies": 0, "charon": 0}, short
        latch = json.loads(lab.host(short).run("cat /etc/ipsec-rollout/latched", check=True).stdout)
        assert latch["reason"] == "lab drill first" and latch["tool"] == "ipsec-kill"
    for a, b, family in ((shorts[0], shorts[2], "v4"), (shorts[1], shorts[-1], "v6")):
        after = probe.count_packets(lab.lab, a, b, family, seconds=2.0)
        assert after.pings_received > 0 and after.esp == 0 and after.cleartext_icmp > 0, after

    # 2. idempotent
    code, report = _kill(["--all", *inv, *SLOW], tmp_path, "second", monkeypatch)
    assert code == ExitCode.OK and report["summary"]["already-clean"] == len(shorts), report

    # 3. one host unreachable: the others are done, PARTIAL, the report names it
    victim = lab.host(shorts[3])
    faults.set_fault(lab.lab, victim.short, "ssh-down")
    try:
        code, report = _kill(["--all", *inv, "--connect-timeout", "10", "--retries", "1", "--deadline", "300",
                              "--parallel", "8"], tmp_path, "partial", monkeypatch)
    finally:
        faults.clear_fault(lab.lab, victim.short, "ssh-down")
    assert code == ExitCode.PARTIAL, report
    assert report["not_clean"] == [victim.fqdn]
    [row] = [h for h in report["hosts"] if h["host"] == victim.fqdn]
    assert row["outcome"] == "unreachable" and row["attempts"] == 2
    assert report["summary"]["already-clean"] == len(shorts) - 1

    # 4. rearm lifts the latch (and does not start SAs)
    code, report = _kill(["--all", "--rearm", *inv, *SLOW], tmp_path, "rearm", monkeypatch)
    assert code == ExitCode.OK and report["summary"]["rearmed"] == len(shorts), report
    assert not (tmp_path / "state" / "kill-requested").exists()
    for short in shorts:
        assert lab.host(short).run("test -e /etc/ipsec-rollout/latched").exit_code == 1
        assert lab.host(short).run("/etc/lab/svc is-enabled").exit_code == 0
    assert not KEYS.search(json.dumps(report))
