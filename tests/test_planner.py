"""Planner: golden plans (JSON + markdown), SA-delta invariants, digests, plan files, the CLI.

Regenerate the golden files after an intended change with `UPDATE_GOLDEN=1 pytest tests/test_planner.py`
and review the diff: it is exactly what a change review of that plan would see change.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from rollout import model, planformat
from rollout.errors import ExitCode, PlanStaleError
from rollout.inventory import load_dir
from rollout.pairing import compute_pairs
from rollout.planner import (
    PLAN_RUN_ID,
    Plan,
    bind_run_id,
    build_plan,
    plan_from_json,
    plan_to_json,
    verify_digest,
)
from rollout.playbook import Playbook, load_playbook

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "playbooks"
GOLDEN = ROOT / "tests" / "golden" / "plan"
SCENARIOS = sorted(p.stem for p in (DATA / "good").glob("*.yaml"))
SHIPPED = ("first-pair", "wmf-2015-text", "wmf-2015")


@pytest.fixture(scope="module")
def fleet() -> model.Fleet:
    return load_dir(DATA / "inventory")


@pytest.fixture(scope="module")
def pairs(fleet: model.Fleet) -> tuple[model.Pair, ...]:
    return compute_pairs(fleet)


def plan_for(name: str, fleet: model.Fleet, pairs: tuple[model.Pair, ...]) -> Plan:
    return build_plan(fleet, pairs, load_playbook(DATA / "good" / f"{name}.yaml", fleet, pairs))


def check_golden(path: Path, actual: str) -> None:
    if os.environ.get("UPDATE_GOLDEN") or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual)
        if not os.environ.get("UPDATE_GOLDEN"):
            pytest.fail(f"created missing golden file {path.name}; review and commit it")
    assert actual == path.read_text(), f"{path.name} differs (UPDATE_GOLDEN=1 regenerates it)"


# ---------------------------------------------------------------------------------------------------
# Golden plans
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCENARIOS)
def test_golden_plan_json(name: str, fleet: model.Fleet, pairs: tuple[model.Pair, ...]) -> None:
    check_golden(GOLDEN / f"{name}.json", planformat.to_json(plan_for(name, fleet, pairs)))


@pytest.mark.parametrize("name", SCENARIOS)
def test_golden_plan_markdown(name: str, fleet: model.Fleet, pairs: tuple[model.Pair, ...]) -> None:
    check_golden(GOLDEN / f"{name}.md", planformat.to_markdown(plan_for(name, fleet, pairs)))


# ---------------------------------------------------------------------------------------------------
# Invariants
# ---------------------------------------------------------------------------------------------------
def all_sas(pairs: tuple[model.Pair, ...]) -> set[tuple[str, str, str]]:
    return {(p.a, p.b, f) for p in pairs for f in p.families}


@pytest.mark.parametrize("name", SCENARIOS)
def test_sa_delta_accounts_for_every_sa(name: str, fleet: model.Fleet,
                                        pairs: tuple[model.Pair, ...]) -> None:
    plan = plan_for(name, fleet, pairs)
    enabled: set[str] = set()
    seen_up: set[tuple[str, str, str]] = set()
    for stage in plan.stages:
        for batch in stage.batches:
            enabled.update(batch.fqdns)
            batch_up = {(r.host, r.peer, r.family) for r in batch.sa_up}
            assert not batch_up & seen_up, "an SA comes up once"
            seen_up |= batch_up
            # An SA comes up exactly in the batch that enables its second end.
            both_enabled = {sa for sa in all_sas(pairs) if sa[0] in enabled and sa[1] in enabled}
            expected = both_enabled - (seen_up - batch_up)
            assert batch_up == expected
            batch_waiting = {(r.host, r.peer, r.family) for r in batch.sa_waiting}
            assert batch_waiting == {(h, p, f) for a, b, f in all_sas(pairs) for h, p in ((a, b), (b, a))
                                     if h in batch.fqdns and p not in enabled}
        assert {(r.host, r.peer, r.family) for r in stage.sa_up} <= seen_up
        assert stage.sas_up_after == len(seen_up)
        assert stage.hosts_enabled_after == len(enabled)
        waiting = {(r.host, r.peer, r.family) for r in stage.sa_waiting}
        assert all(h in enabled and p not in enabled for h, p, _ in waiting)
        touched = {sa for sa in all_sas(pairs) if (sa[0] in enabled) != (sa[1] in enabled)}
        assert len(waiting) == len(touched)
    assert plan.never_up == plan.stages[-1].sa_waiting


def test_initiator_initiates_and_peers_act_when_their_peer_arrives(
        fleet: model.Fleet, pairs: tuple[model.Pair, ...]) -> None:
    plan = plan_for("staged", fleet, pairs)
    first = plan.stages[0].batches[0]
    assert first.fqdns == ("cp1001.eqiad.example.net", "cp3001.esams.example.net")
    a, b = first.hosts
    assert [s.name for s in a.initiate] == ["initiate cp3001_v4", "initiate cp3001_v6"]
    assert b.initiate == ()
    # cp1002 arrives later; cp1001 < cp1002?  No pair (same site): but cp3001 (enabled) pairs with it
    # and cp1002 < cp3001, so cp1002 initiates itself and no peer action is needed.
    half = plan.stages[1].batches[0]
    assert half.fqdns == ("cp1002.eqiad.example.net",)
    assert {s.name for s in half.hosts[0].initiate} == {"initiate cp3001_v4", "initiate cp3001_v6"}
    # cp2001 (codfw) pairs with cp1001 (eqiad, enabled earlier, initiator as the lower FQDN).
    actions = [a for s in plan.stages for b in s.batches for a in b.peer_actions]
    assert any(x.host == "cp1001.eqiad.example.net" and "initiate cp2001_v4" in [s.name for s in x.steps]
               for x in actions)


def test_forward_steps_are_in_phase_order(fleet: model.Fleet, pairs: tuple[model.Pair, ...]) -> None:
    host = plan_for("staged", fleet, pairs).stages[0].batches[0].hosts[0]
    names = [s.name for s in host.steps]
    assert names[0] == "preflight" and names[1] == "snapshot"
    assert names.index("load") < names.index("initiate cp3001_v4")
    assert not host.preflight[0].mutating
    assert {f.path for f in host.files} == {p for p, _ in host.digests}
    assert host.restore, "every host carries its rollback"


def test_stage_settings_resolved(fleet: model.Fleet, pairs: tuple[model.Pair, ...]) -> None:
    plan = plan_for("staged", fleet, pairs)
    pair, _half, text, upload = plan.stages
    assert (pair.batch_size, len(pair.batches), pair.stage.on_failure) == (2, 1, "pause")
    assert (text.batch_size, text.max_unreachable, text.max_ipsec_failures) == (2, 1, 1)
    assert upload.enforce is True and pair.enforce is False
    assert all(h.enforce for h in upload.hosts)
    assert "start_action = trap" in upload.hosts[0].files[0].content


def test_stroke_host_gets_legacy_files(fleet: model.Fleet, pairs: tuple[model.Pair, ...]) -> None:
    plan = plan_for("staged", fleet, pairs)
    host = plan.host("cp3002.esams.example.net")
    assert host is not None and "/etc/ipsec.conf" in [f.path for f in host.files]


# ---------------------------------------------------------------------------------------------------
# Digest, plan files, staleness
# ---------------------------------------------------------------------------------------------------
def test_digest_is_stable_and_path_free(tmp_path: Path, fleet: model.Fleet,
                                        pairs: tuple[model.Pair, ...]) -> None:
    one = plan_for("staged", fleet, pairs)
    assert one.digest == plan_for("staged", fleet, pairs).digest
    shutil.copytree(DATA / "inventory", tmp_path / "elsewhere")
    shutil.copy(DATA / "good" / "staged.yaml", tmp_path / "renamed.yaml")
    moved = load_dir(tmp_path / "elsewhere")
    book = load_playbook(tmp_path / "renamed.yaml", moved)
    assert build_plan(moved, compute_pairs(moved), book).digest == one.digest
    assert str(tmp_path) not in planformat.to_json(one)


def test_plan_json_round_trip(fleet: model.Fleet, pairs: tuple[model.Pair, ...]) -> None:
    plan = plan_for("staged", fleet, pairs)
    data = json.loads(planformat.to_json(plan))
    assert data["schema_version"] == 1 and data["kind"] == "ipsec-rollout-plan"
    assert plan_from_json(data) == plan
    verify_digest(data, fleet, plan.playbook)


def test_stale_plan_names_what_changed(fleet: model.Fleet, pairs: tuple[model.Pair, ...]) -> None:
    plan = plan_for("staged", fleet, pairs)
    data = plan_to_json(plan)
    changed_book = replace(plan.playbook, stages=(replace(plan.playbook.stages[0], parallelism=9),
                                                  *plan.playbook.stages[1:]))
    with pytest.raises(PlanStaleError, match="playbook changed") as info:
        verify_digest(data, fleet, changed_book)
    assert info.value.exit_code == ExitCode.PLAN_STALE
    moved_host = replace(fleet.hosts["cp2001.codfw.example.net"],
                         ipv4=model.ipaddress.IPv4Address("198.51.100.9"))
    changed_fleet = replace(fleet, hosts={**fleet.hosts, moved_host.fqdn: moved_host})
    with pytest.raises(PlanStaleError, match="inventory, configs changed") as info:
        verify_digest(data, changed_fleet, plan.playbook)
    assert "cp2001.codfw.example.net" in str(info.value)


def test_other_schema_version_is_refused(fleet: model.Fleet, pairs: tuple[model.Pair, ...]) -> None:
    data = plan_to_json(plan_for("partial", fleet, pairs))
    with pytest.raises(PlanStaleError, match="schema_version"):
        plan_from_json({**data, "schema_version": 99})


def test_bind_run_id(fleet: model.Fleet, pairs: tuple[model.Pair, ...]) -> None:
    plan = plan_for("partial", fleet, pairs)
    bound = bind_run_id(plan, "20260101-abc")
    host = bound.stages[0].hosts[0]
    assert "/snapshot/20260101-abc/" in host.snapshot[0].command
    assert PLAN_RUN_ID not in host.restore[0].command
    assert bound.digest == plan.digest


def test_partial_playbook_leaves_sas_waiting(fleet: model.Fleet, pairs: tuple[model.Pair, ...]) -> None:
    plan = plan_for("partial", fleet, pairs)
    assert plan.stages[0].sa_up == () and plan.never_up
    assert "SAs this playbook leaves waiting" in planformat.to_markdown(plan)


# ---------------------------------------------------------------------------------------------------
# Formats and the CLI (on the shipped inventory and playbooks)
# ---------------------------------------------------------------------------------------------------
def cli(*args: str) -> subprocess.CompletedProcess[str]:
    code = "from rollout.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("fmt", ["text", "markdown", "json"])
@pytest.mark.parametrize("name", SHIPPED)
def test_plan_cli_all_formats_on_shipped_playbooks(name: str, fmt: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from rollout.cli import _register, app

    _register()  # every command module, as `main` does (one registered command would become the root)

    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(app, ["plan", name, "--format", fmt])
    assert result.exit_code == 0, result.output
    if fmt == "json":
        assert json.loads(result.stdout)["playbook"]["name"] == name
    elif fmt == "markdown":
        assert result.stdout.startswith(f"# IPsec rollout plan: {name}")
    else:
        assert f"Plan {name}" in result.stdout and "Stage 1/" in result.stdout


def test_plan_cli_out_show_config_show_commands(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    result = cli("plan", "playbooks/first-pair.yaml", "--format", "json", "--out", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    host = data["stages"][0]["batches"][0]["hosts"][0]["fqdn"]
    shown = cli("plan", "first-pair", "--show-config", host)
    assert shown.returncode == 0 and "connections {" in shown.stdout
    commands = cli("plan", "first-pair", "--show-commands", host.split(".")[0])
    assert commands.returncode == 0 and "swanctl --load-all" in commands.stdout
    assert "# rollback" in commands.stdout


def test_plan_cli_errors_have_their_exit_codes() -> None:
    bad = cli("plan", str(DATA / "bad" / "unknown-key.yaml"), "--inventory", str(DATA / "inventory"))
    assert bad.returncode == ExitCode.PLAYBOOK_INVALID and "did you mean 'select'" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = cli("plan", "wmf-2051")
    assert missing.returncode == ExitCode.PLAYBOOK_INVALID and "wmf-2015" in missing.stderr
    host = cli("plan", "first-pair", "--show-config", "cp9999")
    assert host.returncode == ExitCode.USAGE and "not enabled by any stage" in host.stderr


def test_text_format_is_valid_console_markup(fleet: model.Fleet,
                                             pairs: tuple[model.Pair, ...]) -> None:
    from rich.console import Console

    console = Console(record=True, width=200, force_terminal=False)
    console.print(planformat.to_text(plan_for("staged", fleet, pairs)))
    plain = console.export_text()
    assert "Stage 1/4: pair" in plain and "[/]" not in plain and "[bold" not in plain
    console.print(planformat.esc("[ -f x ] [bold]"))
    assert "[ -f x ] [bold]" in console.export_text()


def test_playbook_model_is_what_the_plan_carries(fleet: model.Fleet, pairs: tuple[model.Pair, ...]) -> None:
    plan = plan_for("staged", fleet, pairs)
    assert isinstance(plan.playbook, Playbook)
    assert [s.name for s in plan.stages] == [s.name for s in plan.playbook.stages]
