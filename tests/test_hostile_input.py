"""Hostile and broken input (issue 7).

1. Inventory values that try to reach a shell (`;`, `$()`, backticks, newlines, quotes, leading `-`)
   in every field that ends up in a remote command: either validation rejects them with an InputError,
   or every command generated for the host, run by `sh` in a sandbox with stub tools, creates no
   marker file (hypothesis property).
2. Broken files through the real CLI in a subprocess: truncated / invalid YAML, wrong types, huge and
   deeply nested files: a clear error, the documented exit code, no traceback, bounded time.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rollout import errors, steps
from rollout.errors import ExitCode
from rollout.inventory import build_fleet
from rollout.pairing import compute_pairs, pairs_by_host
from rollout.render import render_host
from tests.test_executor import INVENTORY
from tests.test_steps import sandboxed

H1 = "cp1001.eqiad.example.net"
FRAGMENTS = ["; touch {m}", "$(touch {m})", "`touch {m}`", "\ntouch {m}\n", "' ; touch {m} '",
             '" ; touch {m} "', "-oProxyCommand=touch {m}", "--", "*", "&& touch {m}", "| touch {m}",
             "$HOME", "\\", "a", "-", ".", "/"]

# Where a value sits in the inventory -> how to put it there. Host/site/cluster names are keys.
FIELDS = {
    "host": lambda inv, v: inv["hosts"].__setitem__(v, inv["hosts"].pop(H1)),
    "site": lambda inv, v: (inv["sites"].__setitem__(v, inv["sites"].pop("eqiad")),
                            [h.__setitem__("site", v) for h in inv["hosts"].values() if h["site"] == "eqiad"],
                            inv["pairing"][0]["a"].__setitem__("sites", [v])),
    "cluster": lambda inv, v: (inv["clusters"].__setitem__(v, {}),
                               [h.__setitem__("cluster", v) for h in inv["hosts"].values()]),
    "ssh_host": lambda inv, v: inv["hosts"][H1].__setitem__("ssh_host", v),
    "ssh.user": lambda inv, v: inv.__setitem__("ssh", {"user": v}),
    "ssh.identity": lambda inv, v: inv.__setitem__("ssh", {"identity": v}),
    "ssh.known_hosts": lambda inv, v: inv.__setitem__("ssh", {"known_hosts": v}),
    "ssh.proxy_jump": lambda inv, v: inv.__setitem__("ssh", {"proxy_jump": v}),
    "ssh.netns": lambda inv, v: inv.__setitem__("ssh", {"netns": v}),
    "cert": lambda inv, v: inv.__setitem__("ipsec", {"cert_source": {"cert": v}}),
    "key": lambda inv, v: inv.__setitem__("ipsec", {"cert_source": {"key": v + "/{certname}.pem"}}),
    "ca": lambda inv, v: inv.__setitem__("ipsec", {"cert_source": {"ca": "/" + v}}),
    "pairing.name": lambda inv, v: inv["pairing"][0].__setitem__("name", v),
    "ipv4": lambda inv, v: inv["hosts"][H1].__setitem__("ipv4", v),
}


@st.composite
def hostile(draw: st.DrawFn) -> str:
    return "".join(draw(st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=4)))


def _stubs(work: Path) -> dict[str, str]:
    stubs = work / "bin"
    stubs.mkdir(exist_ok=True)
    for tool in ("swanctl", "ipsec", "openssl", "systemctl", "timedatectl", "ip"):
        (stubs / tool).write_text("#!/bin/sh\nexit 0\n")
        (stubs / tool).chmod(0o755)
    return {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"}


def _run_everything(inv: dict[str, Any], work: Path) -> None:
    """Every command the tool would send to every host, run by sh with paths moved under `work`."""
    fleet = build_fleet([("inv.yaml", inv)])
    by_host = pairs_by_host(compute_pairs(fleet))
    env = _stubs(work)
    with mock.patch.object(steps, "SNAPSHOT_ROOT", str(work / "snap")):
        for fqdn, host in fleet.hosts.items():
            r = sandboxed(render_host(fleet, by_host.get(fqdn, ()), fqdn), work / "root")
            for step in (*steps.preflight_steps(fleet, host), *steps.apply_steps(r, "run-1"),
                         *steps.check_current_steps(r), *steps.restore_steps(r, "run-1"),
                         *steps.teardown_steps(r)):
                subprocess.run(["sh", "-c", step.command], input=step.stdin, cwd=work, env=env,
                               capture_output=True, text=True, timeout=60)
                assert not (work / "PWNED").exists(), (step.name, step.command)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(sorted(FIELDS)), value=hostile())
def test_hostile_inventory_values_are_rejected_or_inert(field: str, value: str,
                                                        tmp_path_factory: pytest.TempPathFactory) -> None:
    work = tmp_path_factory.mktemp("hostile")
    value = value.replace("{m}", str(work / "PWNED"))
    inv = copy.deepcopy(INVENTORY)
    FIELDS[field](inv, value)
    try:
        build_fleet([("inv.yaml", inv)])
    except errors.InputError as exc:
        assert exc.exit_code >= ExitCode.USAGE and str(exc)  # rejected with a message, nothing ran
        return
    _run_everything(inv, work)


def test_plain_inventory_runs_in_the_sandbox(tmp_path: Path) -> None:
    """The property above is not vacuous: accepted inventories really run through the sandbox."""
    _run_everything(copy.deepcopy(INVENTORY), tmp_path)
    assert (tmp_path / "snap" / "run-1" / "manifest").exists()  # the steps really ran in the sandbox
    assert (tmp_path / "root" / "etc" / "swanctl").is_dir()


# ----------------------------------------------------------------------------------------- broken files
def _write(d: Path, name: str, text: str | bytes) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return d


GOOD = yaml.safe_dump(INVENTORY, sort_keys=False)


def _huge(d: Path) -> Path:
    """~50 MB of syntactically valid YAML (a long list of hosts-like mappings)."""
    d.mkdir(parents=True, exist_ok=True)
    line = "  - {name: cp9999.eqiad.example.net, ipv4: 198.18.9.9, ipv6: 'fd00::9', site: eqiad}\n"
    with (d / "inv.yaml").open("w") as fh:
        fh.write("junk:\n")
        fh.write(line * (50_000_000 // len(line)))
    return d


INVENTORY_CASES = {
    "truncated": (lambda d: _write(d, "inv.yaml", GOOD[: len(GOOD) // 2] + "  cp1: {site: [")),
    "invalid": (lambda d: _write(d, "inv.yaml", "hosts:\n\tcp1: x\n")),
    "binary": (lambda d: _write(d, "inv.yaml", b"\xff\xfe\x00garbage")),
    "wrong-types": (lambda d: _write(d, "inv.yaml", GOOD.replace("site: eqiad", "site: [1, 2]", 1))),
    "hosts-is-a-list": (lambda d: _write(d, "inv.yaml", "hosts: [a, b]\n")),
    "scalar-document": (lambda d: _write(d, "inv.yaml", "42\n")),
    "deeply-nested": (lambda d: _write(d, "inv.yaml", "a: " + "[" * 50_000 + "]" * 50_000 + "\n")),
    "alias-bomb": (lambda d: _write(d, "inv.yaml", "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)))),
    "huge": _huge,
}


def _cli(*args: str, cwd: Path, timeout: float = 240) -> tuple[int, str, float]:
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-c", "from rollout.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    return done.returncode, done.stdout + done.stderr, time.monotonic() - began


@pytest.mark.parametrize("case", sorted(INVENTORY_CASES))
def test_broken_inventory_is_one_clear_error(case: str, tmp_path: Path) -> None:
    inv = INVENTORY_CASES[case](tmp_path / "inventory")
    code, output, took = _cli("inventory", "validate", "-i", str(inv), cwd=tmp_path)
    assert "Traceback" not in output, output[-3000:]
    assert code != 0 and code != ExitCode.FAILURE, (code, output[-2000:])
    assert "error:" in output and "inv.yaml" in output, output[-2000:]
    assert took < 120, took  # generous: CI machines share their 2 cores with the UML lab


PLAYBOOK_CASES = {
    "truncated": "name: x\nstages:\n  - name: a\n    select: {sites: [eqiad",
    "wrong-types": "name: x\nstages: 5\n",
    "unknown-key": "name: x\nstagez: []\n",
    "deeply-nested": "name: " + "[" * 50_000 + "]" * 50_000 + "\n",
}


@pytest.mark.parametrize("case", sorted(PLAYBOOK_CASES))
def test_broken_playbook_is_one_clear_error(case: str, tmp_path: Path) -> None:
    inv = _write(tmp_path / "inventory", "inv.yaml", GOOD)
    book = _write(tmp_path / "pb", "book.yaml", PLAYBOOK_CASES[case]) / "book.yaml"
    code, output, took = _cli("plan", str(book), "-i", str(inv), cwd=tmp_path)
    assert "Traceback" not in output, output[-3000:]
    assert code == ExitCode.PLAYBOOK_INVALID, (code, output[-2000:])
    assert took < 120, took  # generous: CI machines share their 2 cores with the UML lab
