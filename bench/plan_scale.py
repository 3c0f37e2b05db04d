"""Scale benchmark: validate + pair + render + plan on a synthetic fleet.

    python bench/plan_scale.py                 # 1,000, 2,500 and 5,000 hosts, one process each
    python bench/plan_scale.py --hosts 5000    # one size
    python bench/plan_scale.py --shard 16      # denser pairing (peers per host grow with --shard)

The fleet: 6 sites (2 core, 4 edge), 8 clusters, hosts spread evenly, written as inventory YAML in a
temporary directory so that "validate" is the real `inventory.load_dir`. Pairing is WMF-shaped
(core <-> core and core <-> edge, within a cluster) but sharded, as large fleets are: hosts carry a
shard number in their name and a host pairs only with hosts of its own shard (rules use host globs).
Peers per host, and so connections, grow with --shard; connections grow linearly with hosts.
Every size runs in its own process so that peak RSS (ru_maxrss) belongs to that size alone.
Wall and CPU seconds are both printed: on a loaded machine CPU time is the steadier figure.
"render" renders every host of the fleet on its own (informational); "plan" loads the playbook and
builds the plan, which renders every enabled host again, builds its steps, SA delta and digest.
Target: validate+pair+plan of 5,000 hosts (~108k connections) in under 10 s and 1 GiB on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import math
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rollout import inventory, pairing, planner, playbook, render

SITES = {"core1": "core", "core2": "core", "edge1": "edge", "edge2": "edge", "edge3": "edge", "edge4": "edge"}
CLUSTERS = [f"cluster{i}" for i in range(1, 9)]
DEFAULT_SIZES = (1000, 2500, 5000)


def host_name(site_index: int, cluster_index: int, n: int, shard_size: int) -> str:
    return f"c{cluster_index}s{n // shard_size}n{site_index}{n:04d}.{list(SITES)[site_index]}.example.net"


def fleet_yaml(hosts: int, shard_size: int) -> dict[str, object]:
    """The inventory as one YAML document (documentation/benchmark address ranges only)."""
    cells = len(SITES) * len(CLUSTERS)
    entries: dict[str, dict[str, object]] = {}
    v4 = ipaddress.IPv4Address("198.18.0.0")  # RFC 2544 benchmarking range: room for 131k hosts
    v6 = ipaddress.IPv6Address("2001:db8::")
    for i in range(hosts):
        site_index, cluster_index = i % len(SITES), (i // len(SITES)) % len(CLUSTERS)
        fqdn = host_name(site_index, cluster_index, i // cells, shard_size)
        entries[fqdn] = {"site": list(SITES)[site_index], "cluster": CLUSTERS[cluster_index],
                         "ipv4": str(v4 + i + 1), "os": "debian-bookworm"}
        if i % 10:  # every tenth host is IPv4-only
            entries[fqdn]["ipv6"] = str(v6 + i + 1)
    shards = math.ceil(math.ceil(hosts / cells) / shard_size)
    rules = []
    for s in range(shards):
        glob = [f"*s{s}n*"]
        rules.append({"name": f"core-core-s{s}", "a": {"sites": ["core1"], "hosts": glob},
                      "b": {"sites": ["core2"], "hosts": glob}})
        rules.append({"name": f"core-edge-s{s}", "a": {"tiers": ["core"], "hosts": glob},
                      "b": {"tiers": ["edge"], "hosts": glob}})
    return {
        "sites": {name: {"tier": tier} for name, tier in SITES.items()},
        "clusters": {name: {"description": f"synthetic {name}"} for name in CLUSTERS},
        "ipsec": {"profile": "modern", "enforce": False},
        "hosts": entries, "pairing": rules,
    }


PLAYBOOK = """
name: bench
stages:
  - {name: first-pair, select: {pair: true, a: {tiers: [core]}, b: {tiers: [edge]}}, batch: 2}
  - {name: tenth-core1, select: {sites: [core1], fraction: 0.1}, batch: "25%"}
  - {name: core, select: {tiers: [core]}, batch: "10%"}
  - {name: everything, select: {}, batch: "5%", budgets: {max_unreachable: "1%"}}
"""


def run_one(hosts: int, shard_size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        inv_dir = Path(tmp, "inventory")
        inv_dir.mkdir()
        inv_dir.joinpath("fleet.yaml").write_text(yaml.safe_dump(fleet_yaml(hosts, shard_size)))
        book_path = Path(tmp, "bench.yaml")
        book_path.write_text(PLAYBOOK)
        times: dict[str, tuple[float, float]] = {}  # phase -> (wall, cpu) seconds
        with _timed(times, "validate"):
            fleet = inventory.load_dir(inv_dir)
        with _timed(times, "pair"):
            pairs = pairing.compute_pairs(fleet)
        with _timed(times, "render"):
            by_host = pairing.pairs_by_host(pairs)
            renderer = render.FleetRenderer(fleet)  # as the planner renders: one per fleet
            rendered = sum(len(renderer.render(by_host.get(h, ()), h).files) for h in fleet.hosts)
        with _timed(times, "plan"):
            book = playbook.load_playbook(book_path, fleet, pairs)
            plan = planner.build_plan(fleet, pairs, book)
    connections = 2 * pairing.sa_count(pairs)  # each SA is a connection at both ends
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    wall = sum(times[k][0] for k in ("validate", "pair", "plan"))
    cpu = sum(times[k][1] for k in ("validate", "pair", "plan"))
    print(f"{hosts:>6} hosts {len(pairs):>7} pairs {connections:>7} connections {rendered:>6} files | "
          + " ".join(f"{k} {w:5.2f}s ({c:5.2f} cpu)" for k, (w, c) in times.items())
          + f" | validate+pair+plan {wall:6.2f}s ({cpu:6.2f} cpu) | peak RSS {peak_mib:6.1f} MiB"
          + f" | {len(plan.stages)} stages, digest {plan.digest[:12]}", flush=True)


@contextlib.contextmanager
def _timed(times: dict[str, tuple[float, float]], phase: str) -> Iterator[None]:
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    times[phase] = (time.perf_counter() - wall, time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, action="append", help="fleet size (repeatable)")
    parser.add_argument("--shard", type=int, default=4, help="hosts per shard per site and cluster")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = args.hosts or list(DEFAULT_SIZES)
    if args.child:
        run_one(sizes[0], args.shard)
        return
    note = "plan = select + batch + render every enabled host + steps + SA delta + digest"
    print(f"synthetic fleet: {len(SITES)} sites, {len(CLUSTERS)} clusters, shard {args.shard}; {note}")
    for size in sizes:
        argv = [sys.executable, __file__, "--child", "--hosts", str(size), "--shard", str(args.shard)]
        subprocess.run(argv, check=True)


if __name__ == "__main__":
    main()
