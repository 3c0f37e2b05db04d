"""Pairing: golden output for the example fleet, plus the invariants every fleet must keep."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rollout import inventory, pairing

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden" / "pairing" / "example.json"


def example() -> tuple[object, tuple[object, ...]]:
    fleet = inventory.load_dir(REPO / "inventory")
    return fleet, pairing.compute_pairs(fleet)


def test_example_pairs_match_golden() -> None:
    _, pairs = example()
    got = [{"a": p.a, "b": p.b, "families": list(p.families), "rule": p.rule} for p in pairs]
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    assert got == json.loads(GOLDEN.read_text())


def test_invariants() -> None:
    fleet, pairs = example()
    keys = [(p.a, p.b) for p in pairs]
    assert keys == sorted(keys) and len(set(keys)) == len(keys), "deterministic, no duplicates"
    for p in pairs:
        a, b = fleet.hosts[p.a], fleet.hosts[p.b]
        assert p.a < p.b and p.initiator == p.a, "one designated initiator: the smaller FQDN"
        assert a.site != b.site, "never within one site"
        if p.rule != "caches-kafka":
            assert a.cluster == b.cluster, "never across clusters unless a rule says so"
        assert ("v4" in p.families) == (a.ipv4 is not None and b.ipv4 is not None)
        assert ("v6" in p.families) == (a.ipv6 is not None and b.ipv6 is not None)


def test_2016_topology() -> None:
    fleet, pairs = example()
    sites = {frozenset((fleet.hosts[p.a].site, fleet.hosts[p.b].site)) for p in pairs}
    assert frozenset(("eqiad", "codfw")) in sites
    assert frozenset(("esams", "ulsfo")) not in sites, "edge sites do not pair with each other"
    kafka = {p.a if "kafka" in p.b else p.b for p in pairs if "kafka" in p.a + p.b}
    assert kafka and all(fleet.hosts[h].site != "eqiad" for h in kafka), "only non-eqiad caches <-> kafka"


def test_connections_are_symmetric_and_named_after_peer() -> None:
    fleet, pairs = example()
    by_host = pairing.connections_by_host(pairs)
    for host, conns in by_host.items():
        assert conns == pairing.connections_for(fleet, pairs, host)
        for c in conns:
            mirror = [m for m in by_host[c.peer] if m.peer == host and m.family == c.family]
            assert len(mirror) == 1 and mirror[0].initiator != c.initiator
            assert c.name == f"{c.peer.split('.')[0]}_{c.family}"
