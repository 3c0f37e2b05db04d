"""S4: no key material in anything the tool prints or writes, with SAs up on the lab.

The first stage of the lab playbook is applied through the real CLI (`--json`), then `status`,
`status --json`, `check`, `runs --json` and `ipsec-kill --json` run; their stdout/stderr, the journal,
the audit log and the kill report are grepped for hex keys and PEM private-key markers. A positive
control proves the grep would catch the kernel's keys: `ip xfrm state` without `nokeys` on the same
host, at the same time, does match.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab_fixture import LabHandle

pytestmark = pytest.mark.lab
KEYS = re.compile(r"0x[0-9a-f]{32,}|PRIVATE KEY|(?:enc|aead|auth|auth-trunc) \S+ 0x[0-9a-f]{16,}", re.I)


def _cli(main: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run([sys.executable, "-c", f"from {main} import main; main()", *args],
                          capture_output=True, text=True, timeout=900, env=env, stdin=subprocess.DEVNULL)


@pytest.mark.drill
def test_outputs_logs_journal_audit_and_report_never_carry_keys(lab: LabHandle, tmp_path: Path) -> None:
    from tests.faults.test_lab_faults import _plan

    _, plan, (a, b) = _plan(lab)
    state = tmp_path / "state"
    inv = ["-i", str(lab.inventory_dir)]
    outputs: dict[str, str] = {}
    with lab.exclusive():
        lab.reset([a, b])
        try:
            applied = _cli("rollout.cli", "apply", str(lab.playbook_file), "--stage", plan.stages[0].name,
                           "--json", "--yes", "--state-dir", str(state), *inv)
            outputs["apply --json"] = applied.stdout + applied.stderr
            assert applied.returncode == 0, applied.stderr[-3000:]
            control = lab.host(a).run("ip xfrm state", check=True, timeout=120).stdout
            assert KEYS.search(control), "positive control: the kernel shows keys without nokeys"
            for name, args in {"status": ["status", *inv], "status --json": ["status", "--json", *inv],
                               "check": ["check", a, *inv], "check --with-peers": ["check", a, "--with-peers",
                                                                                   *inv],
                               "runs --json": ["runs", "--json", "--state-dir", str(state)]}.items():
                done = _cli("rollout.cli", *args)
                outputs[name] = done.stdout + done.stderr
            killed = _cli("rollout.cli.kill", "--host", a, "--host", b, "--yes", "--json", *inv,
                          "--report", str(tmp_path / "kill.json"), "--state-dir", str(tmp_path / "kill"),
                          "--connect-timeout", "40", "--command-timeout", "150", "--deadline", "600")
            outputs["ipsec-kill --json"] = killed.stdout + killed.stderr
        finally:
            lab.reset([a, b])
    files = [*state.rglob("*"), *(tmp_path / "kill").rglob("*"), tmp_path / "kill.json"]
    assert all(outputs.values()), [k for k, v in outputs.items() if not v]  # every command printed something
    outputs |= {str(p): p.read_text(errors="replace") for p in files if p.is_file()}
    assert any("journal.jsonl" in k for k in outputs) and any("audit" in k for k in outputs)
    leaks = {name: KEYS.findall(text)[:3] for name, text in outputs.items() if KEYS.search(text)}
    assert leaks == {}
    assert "Traceback" not in "".join(outputs.values())
