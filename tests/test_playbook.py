"""Playbooks: schema, validation messages (one data file per bad case), cumulative selection."""

from __future__ import annotations

from pathlib import Path

import pytest

from rollout import model
from rollout.errors import ExitCode, PlaybookError
from rollout.inventory import load_dir
from rollout.pairing import compute_pairs
from rollout.playbook import (
    Playbook,
    Size,
    load_playbook,
    parse_duration,
    parse_playbook,
    playbook_from_json,
    playbook_to_json,
    resolve_stages,
)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "playbooks"
BAD = sorted((DATA / "bad").glob("*.yaml"))
# The playbooks written for the example inventory (playbooks/lab.yaml targets the lab's own inventory).
SHIPPED = ("first-pair", "wmf-2015-text", "wmf-2015")


@pytest.fixture(scope="module")
def fleet() -> model.Fleet:
    return load_dir(DATA / "inventory")


@pytest.fixture(scope="module")
def pairs(fleet: model.Fleet) -> tuple[model.Pair, ...]:
    return compute_pairs(fleet)


def expectations(path: Path) -> list[str]:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} needs an '# expect: a | b' first line"
    return [part.strip() for part in first.removeprefix("# expect: ").split("|")]


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_playbook_gives_one_clear_message(path: Path, fleet: model.Fleet) -> None:
    with pytest.raises(PlaybookError) as info:
        load_playbook(path, fleet)
    err = info.value
    assert err.exit_code == ExitCode.PLAYBOOK_INVALID
    text = str(err)
    assert str(path) in text, "the message names the file"
    assert err.hint, "every message says how to fix it"
    for expected in expectations(path):
        assert expected in text, f"{expected!r} not in {text!r}"
    assert "Traceback" not in text


def test_unreadable_playbook(tmp_path: Path, fleet: model.Fleet) -> None:
    with pytest.raises(PlaybookError, match="cannot read"):
        load_playbook(tmp_path / "missing.yaml", fleet)


def test_schema_error_has_line_number(fleet: model.Fleet) -> None:
    with pytest.raises(PlaybookError) as info:
        load_playbook(DATA / "bad" / "unknown-nested-key.yaml", fleet)
    assert "unknown-nested-key.yaml:6:" in str(info.value)


@pytest.mark.parametrize(("value", "total", "up", "expected"), [
    (3, 10, True, 3), ("25%", 10, True, 3), ("25%", 2, True, 1), ("100%", 7, True, 7),
    ("50%", 5, False, 2), ("10%", 5, False, 0), (0, 5, False, 0), ("33.3%", 3, True, 1),
])
def test_size_resolution(value: int | str, total: int, up: bool, expected: int) -> None:
    assert Size.parse(value).of(total, round_up=up) == expected


@pytest.mark.parametrize(("value", "seconds"), [(90, 90.0), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0),
                                                ("1.5m", 90.0), ("45", 45.0)])
def test_durations(value: float | str, seconds: float) -> None:
    assert parse_duration(value) == seconds


def test_defaults_merge_field_by_field() -> None:
    book = parse_playbook("""
name: x
defaults: {batch: 3, gates: {soak: 2m, samples: 4}, budgets: {max_unreachable: 1}, enforce: true}
stages:
  - {name: a, select: {}, gates: {soak: 10m}}
  - {name: b, select: {}, batch: "10%", enforce: false, on_failure: pause}
""")
    a, b = book.stages
    assert (a.batch, a.gates.soak, a.gates.samples, a.gates.timeout) == (Size(count=3), 600.0, 4, 300.0)
    assert a.budgets.max_unreachable == Size(count=1) and a.budgets.max_ipsec_failures == Size(count=0)
    assert (a.enforce, a.on_failure) == (True, "rollback")
    assert (b.batch, b.enforce, b.on_failure, b.gates.soak) == (Size(percent=10.0), False, "pause", 120.0)


def _book(stages: str) -> Playbook:
    return parse_playbook(f"name: t\nstages:\n{stages}")


def test_stages_are_cumulative_and_fraction_counts_enabled_hosts(
        fleet: model.Fleet, pairs: tuple[model.Pair, ...]) -> None:
    book = _book("""
  - {name: pair, select: {clusters: [cache_text], pair: true, a: {sites: [esams]}, b: {sites: [eqiad]}}}
  - {name: half, select: {sites: [eqiad], clusters: [cache_text], fraction: 0.5}}
  - {name: all, select: {clusters: [cache_text]}}
""")
    pair, half, rest = resolve_stages(book, fleet, pairs)
    assert pair == ("cp1001.eqiad.example.net", "cp3001.esams.example.net")
    # eqiad text has 3 hosts: half rounds up to 2, and cp1001 (already enabled) is one of them.
    assert half == ("cp1002.eqiad.example.net",)
    assert set(rest) == {"cp1003.eqiad.example.net", "cp2001.codfw.example.net", "cp3002.esams.example.net"}
    everything = pair + half + rest
    assert len(everything) == len(set(everything)), "a host appears in one stage only"


def test_pair_selection_is_deterministic_and_a_real_pair(
        fleet: model.Fleet, pairs: tuple[model.Pair, ...]) -> None:
    book = _book("  - {name: p, select: {pair: true, a: {tiers: [edge]}, b: {sites: [codfw]}}}\n")
    chosen = resolve_stages(book, fleet, pairs)[0]
    assert chosen == resolve_stages(book, fleet, tuple(reversed(pairs)))[0]
    assert any({p.a, p.b} == set(chosen) for p in pairs)
    sites = {fleet.hosts[h].site for h in chosen}
    assert sites == {"esams", "codfw"}


def test_count_takes_lowest_fqdns(fleet: model.Fleet) -> None:
    book = _book("  - {name: c, select: {clusters: [cache_text], count: 2}}\n")
    assert resolve_stages(book, fleet) == (("cp1001.eqiad.example.net", "cp1002.eqiad.example.net"),)


def test_host_globs_and_tiers(fleet: model.Fleet) -> None:
    book = _book("  - {name: g, select: {hosts: ['cp3*'], tiers: [edge], clusters: [cache_upload]}}\n")
    assert resolve_stages(book, fleet) == (("cp3003.esams.example.net",),)


def test_playbook_json_round_trip(fleet: model.Fleet) -> None:
    book = load_playbook(DATA / "good" / "staged.yaml", fleet)
    data = playbook_to_json(book)
    assert "source" not in data
    assert playbook_from_json(data) == book


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_playbooks_load_against_shipped_inventory(name: str) -> None:
    fleet = load_dir(ROOT / "inventory")
    book = load_playbook(ROOT / "playbooks" / f"{name}.yaml", fleet)
    assert book.stages
    added = resolve_stages(book, fleet, compute_pairs(fleet))
    assert all(added)


def test_wmf_2015_replays_the_sequence() -> None:
    fleet = load_dir(ROOT / "inventory")
    book = load_playbook(ROOT / "playbooks" / "wmf-2015.yaml", fleet)
    stages = dict(zip((s.name for s in book.stages), resolve_stages(book, fleet, compute_pairs(fleet)),
                      strict=True))
    assert stages["first-pair"] == ("cp1065.eqiad.example.net", "cp3030.esams.example.net")
    assert stages["first-esams-upload"] == ("cp3034.esams.example.net",)
    assert stages["kafka-pair"] == ("kafka1012.eqiad.example.net",)
    names = list(stages)
    assert names.index("all-eqiad-text") < names.index("edge-text") < names.index("all-upload")
    assert names[-1] == "all-kafka"
