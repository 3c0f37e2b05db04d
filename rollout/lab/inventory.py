"""The lab as a normal inventory (docs/design.md schema), so every command can run against it."""

from __future__ import annotations

from typing import Any

import yaml

from rollout.lab.paths import LabPaths
from rollout.lab.spec import LabSpec
from rollout.model import Tier

HEADER = "# Written by `ipsec-rollout lab up`: the UML lab as an inventory. Regenerated on every up.\n"


def inventory_data(spec: LabSpec, paths: LabPaths) -> dict[str, Any]:
    return {
        "sites": {s.name: {"tier": s.tier.value} for s in spec.sites},
        "clusters": {c: {"description": f"lab {c.replace('_', ' ')}"} for c in spec.clusters},
        "ssh": {
            "user": "root", "identity": str(paths.identity), "known_hosts": str(paths.known_hosts),
            "netns": spec.netns, "use_ssh_config": False, "connect_timeout": 20, "command_timeout": 60,
        },
        "ipsec": {"profile": "modern"},
        "hosts": {
            h.fqdn: {"site": h.site, "cluster": h.cluster, "ipv4": str(h.ipv4), "ipv6": str(h.ipv6),
                     "os": "lab-uml", "ssh_host": str(h.ipv4)}
            for h in spec.hosts
        },
        "pairing": pairing_rules(spec),
    }


def pairing_rules(spec: LabSpec) -> list[dict[str, Any]]:
    """core<->core across core sites and core<->edge, within each cluster (same_cluster defaults on)."""
    core = [s.name for s in spec.sites if s.tier is Tier.CORE]
    edge = [s.name for s in spec.sites if s.tier is Tier.EDGE]
    rules: list[dict[str, Any]] = []
    if len(core) >= 2:
        rules.append({"name": "core-core", "a": {"sites": core}, "b": {"sites": core}})
    if core and edge:
        rules.append({"name": "core-edge", "a": {"sites": core}, "b": {"sites": edge}})
    return rules


def write_inventory(spec: LabSpec, paths: LabPaths) -> None:
    paths.inventory_dir.mkdir(parents=True, exist_ok=True)
    text = HEADER + yaml.safe_dump(inventory_data(spec, paths), sort_keys=False, default_flow_style=False)
    tmp = paths.inventory_file.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(paths.inventory_file)
