"""Inventory validation: each bad-input class gets its own clear message and exit code."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rollout import inventory, pairing
from rollout.errors import (
    DuplicateError,
    EmptyPairingRuleError,
    ExitCode,
    InventorySchemaError,
    InventoryYamlError,
    NoAddressError,
    ReferenceError_,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "inventory"

BASE = """
sites:
  eqiad: {tier: core}
  esams: {tier: edge}
clusters:
  cache_text: {}
hosts:
  cp1.eqiad.example.net: {site: eqiad, cluster: cache_text, ipv4: 192.0.2.1, ipv6: "2001:db8::1"}
  cp3.esams.example.net: {site: esams, cluster: cache_text, ipv4: 203.0.113.3}
pairing:
  - name: core-edge
    a: {tiers: [core]}
    b: {tiers: [edge]}
"""


def write(tmp_path: Path, text: str, name: str = "fleet.yaml") -> Path:
    (tmp_path / name).write_text(text)
    return tmp_path


def load(tmp_path: Path, text: str) -> tuple[object, tuple[object, ...]]:
    fleet = inventory.load_dir(write(tmp_path, text))
    return fleet, pairing.compute_pairs(fleet)


def test_example_fleet_is_valid_and_sized_like_2015() -> None:
    fleet = inventory.load_dir(EXAMPLE)
    assert 40 <= len(fleet.hosts) <= 60
    assert {s.tier.value for s in fleet.sites.values()} == {"core", "edge"}
    assert any(h.ipv6 is None for h in fleet.hosts.values()), "a few hosts are IPv4-only"
    kafka = [h for h in fleet.hosts.values() if h.cluster == "kafka"]
    assert kafka and all(h.site == "eqiad" for h in kafka)


def test_minimal_inventory_pairs(tmp_path: Path) -> None:
    fleet, pairs = load(tmp_path, BASE)
    assert [(p.a, p.b, p.families) for p in pairs] == [
        ("cp1.eqiad.example.net", "cp3.esams.example.net", ("v4",))]


@pytest.mark.parametrize(("text", "error", "needle"), [
    (BASE.replace("tier: core}", "tier: core, retramsmit_tries: 15}"), InventorySchemaError,
     "unknown key 'retramsmit_tries'"),
    (BASE + "ipsec:\n  profil: modern\n", InventorySchemaError, "did you mean 'profile'"),
    (BASE.replace("ipv4: 192.0.2.1,", "ipv4: 192.0.2.300,"), InventorySchemaError, "192.0.2.300"),
    (BASE.replace("ipv4: 203.0.113.3", "ipv4: 192.0.2.1"), DuplicateError, "also used by cp1"),
    (BASE.replace("site: esams", "site: esamz"), ReferenceError_, "did you mean 'esams'"),
    (BASE.replace("cluster: cache_text, ipv4: 203", "cluster: cache_txt, ipv4: 203"), ReferenceError_,
     "unknown cluster 'cache_txt'"),
    (BASE.replace(", ipv4: 203.0.113.3", ""), NoAddressError, "no address"),
    (BASE.replace("b: {tiers: [edge]}", "b: {sites: [esams], clusters: [cache_text], hosts: ['nothing*']}"),
     EmptyPairingRuleError, "core-edge"),
    (BASE + "  cp1.eqiad.example.net: {site: eqiad, cluster: cache_text, ipv4: 192.0.2.9}\n",
     InventoryYamlError, "line"),
    (BASE.replace("sites:\n", "sites:\n eqiad: [\n"), InventoryYamlError, "line"),
    (BASE.replace("cp3.esams.example.net:", "'cp3;reboot.esams.example.net':"), InventorySchemaError,
     "not a lower-case FQDN"),
])
def test_bad_input_is_one_clear_error(tmp_path: Path, text: str, error: type, needle: str) -> None:
    with pytest.raises(error) as excinfo:
        load(tmp_path, text)
    message = str(excinfo.value)
    assert needle in message
    assert "fleet.yaml" in message or "pairing rule" in message


def test_duplicate_host_across_files(tmp_path: Path) -> None:
    write(tmp_path, BASE)
    write(tmp_path, "hosts:\n  cp1.eqiad.example.net: {site: eqiad, cluster: cache_text, ipv4: 192.0.2.7}\n",
          "more.yaml")
    with pytest.raises(DuplicateError, match="duplicate host 'cp1.eqiad.example.net'"):
        inventory.load_dir(tmp_path)


def test_duplicate_key_in_one_file_is_a_duplicate_error(tmp_path: Path) -> None:
    text = BASE.replace("pairing:", "  cp1.eqiad.example.net: {site: eqiad, cluster: cache_text, "
                                    "ipv4: 192.0.2.9}\npairing:")
    with pytest.raises(DuplicateError, match="duplicate key 'cp1.eqiad.example.net'"):
        load(tmp_path, text)


def test_cli_exit_codes_are_distinct_and_no_traceback(tmp_path: Path) -> None:
    from rollout.cli import _register, app, run_guarded

    _register()
    cases = {
        ExitCode.INVENTORY_SCHEMA: BASE.replace("tier: core}", "tier: core, retramsmit_tries: 15}"),
        ExitCode.INVENTORY_DUPLICATE: BASE.replace("ipv4: 203.0.113.3", "ipv4: 192.0.2.1"),
        ExitCode.INVENTORY_REFERENCE: BASE.replace("site: esams", "site: esamz"),
        ExitCode.INVENTORY_NO_ADDRESS: BASE.replace(", ipv4: 203.0.113.3", ""),
        ExitCode.INVENTORY_YAML: BASE.replace("sites:\n", "sites:\n eqiad: [\n"),
    }
    for code, text in cases.items():
        d = tmp_path / code.name
        d.mkdir()
        write(d, text)
        result = CliRunner().invoke(app, ["inventory", "validate", "--inventory", str(d)])
        # CliRunner surfaces the RolloutError; map it exactly as main() does.
        assert result.exception is not None
        rc = run_guarded(lambda exc=result.exception: (_ for _ in ()).throw(exc))
        assert rc == code, (code, result.output)


def test_validate_cli_ok() -> None:
    from rollout.cli import _register, app

    _register()
    result = CliRunner().invoke(app, ["inventory", "validate", "--inventory", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    assert "44 hosts" in result.output


def test_example_copy_is_merged_from_several_files(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLE, tmp_path / "inv")
    assert len(list((tmp_path / "inv").glob("*.yaml"))) > 3
    assert inventory.load_dir(tmp_path / "inv").hosts
