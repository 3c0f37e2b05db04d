"""Rendering: golden files per scenario, plus the properties the goldens cannot show at a glance.

Regenerate the goldens with `UPDATE_GOLDEN=1 pytest tests/test_render.py` and review the diff.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from pathlib import Path

import jinja2
import pytest

from rollout import errors, model, render

GOLDEN = Path(__file__).parent / "golden" / "render"
EQIAD_A = "cp1065.eqiad.example.net"
EQIAD_B = "cp1066.eqiad.example.net"
ESAMS_A = "cp3030.esams.example.net"
ESAMS_STROKE = "cp3031.esams.example.net"
ULSFO_V4 = "cp4011.ulsfo.example.net"


def _host(fqdn: str, v4: str, v6: str | None = None, os_: str = "debian-bookworm") -> model.Host:
    site = fqdn.split(".")[1]
    return model.Host(fqdn=fqdn, site=site, cluster="cache_text", os=os_,
                      ipv4=ipaddress.IPv4Address(v4), ipv6=ipaddress.IPv6Address(v6) if v6 else None)


HOSTS = (
    _host(EQIAD_A, "192.0.2.65", "2001:db8:1::65"),
    _host(EQIAD_B, "192.0.2.66", "2001:db8:1::66"),
    _host(ESAMS_A, "198.51.100.30", "2001:db8:3::30"),
    _host(ESAMS_STROKE, "198.51.100.31", "2001:db8:3::31", os_="debian-jessie"),
    _host(ULSFO_V4, "203.0.113.11"),
)


def fleet(profile: str = "modern", *, enforce: bool = False,
          overrides: tuple[tuple[str, object], ...] = ()) -> model.Fleet:
    return model.Fleet(
        sites={s: model.Site(name=s, tier=model.Tier.CORE if s == "eqiad" else model.Tier.EDGE)
               for s in ("eqiad", "esams", "ulsfo")},
        clusters={"cache_text": model.Cluster(name="cache_text")},
        hosts={h.fqdn: h for h in sorted(HOSTS, key=lambda h: h.fqdn)},
        rules=(), ssh=model.SshSettings(),
        ipsec=model.IpsecSettings(profile=profile, enforce=enforce, overrides=overrides),
    )


def pair(a: str, b: str, *families: model.Family) -> model.Pair:
    a, b = sorted((a, b))
    return model.Pair(a=a, b=b, families=families or ("v4", "v6"), rule="test")


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    fleet: model.Fleet
    pairs: tuple[model.Pair, ...]
    hosts: tuple[str, ...]


SCENARIOS = (
    Scenario("modern-dual-stack", fleet(), (pair(EQIAD_A, ESAMS_A),), (EQIAD_A, ESAMS_A)),
    Scenario("ipv4-only-peer", fleet(), (pair(EQIAD_A, ULSFO_V4, "v4"), pair(EQIAD_A, ESAMS_A)),
             (EQIAD_A, ULSFO_V4)),
    Scenario("wmf-2015", fleet("wmf-2015"), (pair(EQIAD_A, ESAMS_A),), (EQIAD_A, ESAMS_A)),
    Scenario("enforce", fleet(enforce=True), (pair(EQIAD_A, ESAMS_A),), (EQIAD_A, ESAMS_A)),
    Scenario("legacy-stroke", fleet("wmf-2015"),
             (pair(EQIAD_B, ESAMS_STROKE), pair(ESAMS_STROKE, ULSFO_V4, "v4")), (ESAMS_STROKE, EQIAD_B)),
)


def rendered_tree(scenario: Scenario) -> dict[str, str]:
    """relative golden path -> content"""
    tree = {}
    for fqdn in scenario.hosts:
        for f in render.render_host(scenario.fleet, scenario.pairs, fqdn).files:
            tree[f"{fqdn}{f.path}"] = f.content
    return tree


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_golden(scenario: Scenario) -> None:
    root = GOLDEN / scenario.name
    tree = rendered_tree(scenario)
    if os.environ.get("UPDATE_GOLDEN"):
        for rel, content in tree.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(content)
    on_disk = {str(p.relative_to(root)): p.read_text() for p in root.rglob("*") if p.is_file()}
    assert sorted(on_disk) == sorted(tree), "golden file set differs (UPDATE_GOLDEN=1 to regenerate)"
    for rel, content in tree.items():
        assert content == on_disk[rel], f"{rel} differs from its golden (UPDATE_GOLDEN=1 to regenerate)"


def test_deterministic_whatever_the_pair_order() -> None:
    pairs = (pair(EQIAD_A, ULSFO_V4, "v4"), pair(EQIAD_A, ESAMS_A))
    one = render.render_host(fleet(), pairs, EQIAD_A)
    two = render.render_host(fleet(), tuple(reversed(pairs)), EQIAD_A)
    assert one == two


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_never_key_material(scenario: Scenario) -> None:
    for content in rendered_tree(scenario).values():
        assert "PRIVATE KEY" not in content and "BEGIN" not in content


def _child_value(content: str, conn: str, key: str) -> str:
    block = content.split(f"\n            {conn} {{", 1)[1]  # the CHILD section
    return next(line.split("=", 1)[1].strip() for line in block.splitlines()
                if line.strip().startswith(f"{key} ="))


def test_fail_open_initiator_starts_responder_waits() -> None:
    f, pairs = fleet(), (pair(EQIAD_A, ESAMS_A),)
    a = render.render_host(f, pairs, EQIAD_A)  # cp1065 < cp3030: the initiator
    b = render.render_host(f, pairs, ESAMS_A)
    assert not a.enforce
    conf_a, conf_b = a.files[0].content, b.files[0].content
    assert _child_value(conf_a, "cp3030_v4", "start_action") == "start"
    assert _child_value(conf_b, "cp1065_v4", "start_action") == "none"
    assert _child_value(conf_a, "cp3030_v4", "dpd_action") == "restart"
    assert _child_value(conf_b, "cp1065_v4", "dpd_action") == "clear"


def test_enforce_traps_both_sides_and_argument_beats_fleet_setting() -> None:
    f, pairs = fleet(), (pair(EQIAD_A, ESAMS_A),)
    for fqdn in (EQIAD_A, ESAMS_A):
        r = render.render_host(f, pairs, fqdn, enforce=True)
        assert r.enforce
        assert r.files[0].content.count("start_action = trap") == 2
        assert r.files[0].content.count("dpd_action = trap") == 2
    assert not render.render_host(fleet(enforce=True), pairs, EQIAD_A, enforce=False).enforce


def test_wmf_dpd_restart_on_greater_fqdn() -> None:
    f, pairs = fleet("wmf-2015"), (pair(EQIAD_A, ESAMS_A),)
    lesser = render.render_host(f, pairs, EQIAD_A).files[0].content
    greater = render.render_host(f, pairs, ESAMS_A).files[0].content
    assert _child_value(lesser, "cp3030_v6", "dpd_action") == "clear"
    assert _child_value(greater, "cp1065_v6", "dpd_action") == "restart"
    assert _child_value(greater, "cp1065_v6", "rekey_time") == "47m"  # 1h - margintime 13m


def test_ipv4_only_peer_gets_only_v4() -> None:
    r = render.render_host(fleet(), (pair(EQIAD_A, ULSFO_V4, "v4"),), ULSFO_V4)
    assert [c.name for c in r.connections] == ["cp1065_v4"]
    assert "_v6" not in r.files[0].content


def test_swanctl_files_and_material() -> None:
    r = render.render_host(fleet(), (pair(EQIAD_A, ESAMS_A),), EQIAD_A)
    assert [f.path for f in r.files] == ["/etc/swanctl/conf.d/ipsec-rollout.conf",
                                         "/etc/strongswan.d/zz-ipsec-rollout.conf"]
    key = next(m for m in r.material if m.kind == "key")
    assert key.dest == f"/etc/swanctl/private/{EQIAD_A}.pem" and key.mode == 0o600
    assert key.source == f"/var/lib/puppet/ssl/private_keys/{EQIAD_A}.pem"
    assert {m.kind for m in r.material} == {"cert", "key", "ca"}
    assert f"/etc/swanctl/x509ca/{render.CA_NAME}" in r.managed_paths


def test_stroke_host_gets_legacy_files() -> None:
    r = render.render_host(fleet(), (pair(EQIAD_B, ESAMS_STROKE),), ESAMS_STROKE)
    assert r.stack is model.Stack.STROKE
    conf = r.file("/etc/ipsec.conf").content
    assert "ike = aes256gcm16-prfsha384-ecp384!" in conf and "esp = aes256gcm16-ecp384!" in conf
    assert "type = transport" in conf and "keyexchange = ikev2" in conf
    assert "auto = add" in conf  # cp3031 > cp1066: responder
    secrets = r.file("/etc/ipsec.secrets")
    assert secrets.mode == 0o600 and f": RSA {ESAMS_STROKE}.pem" in secrets.content
    assert next(m for m in r.material if m.kind == "key").dest == f"/etc/ipsec.d/private/{ESAMS_STROKE}.pem"
    enforced = render.render_host(fleet(), (pair(EQIAD_B, ESAMS_STROKE),), ESAMS_STROKE, enforce=True)
    assert "auto = route" in enforced.file("/etc/ipsec.conf").content
    assert "dpdaction = hold" in enforced.file("/etc/ipsec.conf").content


def test_key_type_override() -> None:
    r = render.render_host(fleet(overrides=(("key_type", "ECDSA"),)), (pair(EQIAD_B, ESAMS_STROKE),),
                           ESAMS_STROKE)
    assert f": ECDSA {ESAMS_STROKE}.pem" in r.file("/etc/ipsec.secrets").content


def test_unknown_and_hostile_hosts_are_render_errors() -> None:
    with pytest.raises(errors.RenderError):
        render.render_host(fleet(), (), "nope.example.net")
    evil = dataclasses.replace(HOSTS[0], fqdn='x";\n} evil {')
    f = dataclasses.replace(fleet(), hosts={**fleet().hosts, evil.fqdn: evil})
    with pytest.raises(errors.RenderError) as info:
        render.render_host(f, (), evil.fqdn)
    assert info.value.exit_code == errors.ExitCode.RENDER_INVALID


def test_duplicate_connection_names_rejected() -> None:
    twin = _host("cp3030.codfw.example.net", "192.0.2.130", "2001:db8:2::30")
    f = dataclasses.replace(fleet(), hosts={**fleet().hosts, twin.fqdn: twin})
    with pytest.raises(errors.RenderError, match="cp3030_v4"):
        render.render_host(f, (pair(EQIAD_A, ESAMS_A), pair(EQIAD_A, twin.fqdn)), EQIAD_A)


def test_templates_are_strict() -> None:
    env = render._environment()
    assert env.undefined is jinja2.StrictUndefined
    with pytest.raises(jinja2.UndefinedError):
        env.get_template("charon.conf.j2").render(fqdn="x", profile="modern")


def test_host_without_pairs_renders_empty_connections() -> None:
    r = render.render_host(fleet(), (), EQIAD_A)
    assert r.connections == ()
    assert "connections {\n}" in r.files[0].content
