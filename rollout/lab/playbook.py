"""A lab playbook in the normal playbook schema (rollout.playbook): first pair, core, edge."""

from __future__ import annotations

from typing import Any

import yaml

from rollout.lab.paths import LabPaths
from rollout.lab.spec import LabSpec
from rollout.model import Tier
from rollout.playbook import parse_playbook

HEADER = "# Written by `ipsec-rollout lab up`: a short staged rollout of the lab. Regenerated on up.\n"


def playbook_data(spec: LabSpec) -> dict[str, Any]:
    """Short gates (the lab is small and fast); first pair = one core host + one edge host."""
    core = [s.name for s in spec.sites if s.tier is Tier.CORE]
    edge = [s.name for s in spec.sites if s.tier is Tier.EDGE]
    stages: list[dict[str, Any]] = []
    if core and (edge or len(core) > 1):
        b = {"tiers": [Tier.EDGE.value]} if edge else {"sites": core[1:]}
        stages.append({"name": "first-pair", "description": "one core host and one peer",
                       "select": {"clusters": [spec.clusters[0]], "pair": True,
                                  "a": {"sites": [core[0]]}, "b": b},
                       "batch": 2})
    stages.append({"name": "core", "select": {"tiers": [Tier.CORE.value]}, "batch": "50%"})
    if edge:
        stages.append({"name": "edge", "select": {"tiers": [Tier.EDGE.value]}, "batch": "50%"})
    return {
        "name": "lab", "description": "the UML lab, stage by stage",
        "defaults": {"batch": "50%", "parallelism": 4,
                     "gates": {"timeout": "3m", "soak": "15s", "samples": 2, "rekey": False, "probe": True},
                     "budgets": {"max_unreachable": 0, "max_ipsec_failures": 0},
                     "on_failure": "rollback", "enforce": False},
        "stages": stages,
    }


def write_playbook(spec: LabSpec, paths: LabPaths) -> None:
    text = HEADER + yaml.safe_dump(playbook_data(spec), sort_keys=False, default_flow_style=False)
    parse_playbook(text, source=str(paths.playbook_file))  # schema check before it lands
    paths.playbook_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = paths.playbook_file.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(paths.playbook_file)
