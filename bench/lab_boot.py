"""Lab boot benchmark: time to all-sshd-ready, memory per host, and the largest lab that fits.

    python bench/lab_boot.py [--sizes 8,16,32] [--timeout 300] [--state-dir /tmp/ipsec-lab-bench]

Uses its own state dir and namespace (ipsec-lab-bench), so it never touches a running lab. Prints
numbers only (no asserts). The machine's load average is printed too: UML is CPU-bound, and other work
on the machine changes every figure here.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

from rollout import lab as labmod
from rollout.errors import LabError
from rollout.lab import boot, proc
from rollout.lab.spec import build_spec

SITES = ("core1", "core2", "edge1", "edge2")


def pss_kib(pid: int) -> int:
    """Proportional set size of one process (shared UML memory counted once across its processes)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    match = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else 0


def host_pss_mib(lab: labmod.Lab, short: str) -> float:
    leader = boot.host_running(lab.paths, short)
    if leader is None:
        return 0.0
    group = [p for p in proc.uml_pids(lab.paths.uml_dir) if proc.process_group(p) == leader]
    return sum(pss_kib(p) for p in group) / 1024


def guest_used_mib(host: labmod.LabHost) -> float | None:
    result = host.run("free -k | awk '/^Mem:/ {print $3}'", timeout=60)
    return int(result.stdout.strip()) / 1024 if result.ok and result.stdout.strip().isdigit() else None


def mem_available_mib() -> float:
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"^MemAvailable:\s+(\d+)", text, re.M).group(1)) / 1024  # type: ignore[union-attr]


def one_size(n: int, state_dir: Path, timeout: float) -> dict[str, object] | None:
    per = max(1, n // len(SITES))
    spec = build_spec(SITES, hosts_per_cluster=per, netns="ipsec-lab-bench")
    marks: dict[str, float] = {}

    def progress(message: str) -> None:
        marks.setdefault("boot" if message.startswith("booted") else message, time.monotonic())

    start = time.monotonic()
    try:
        lab = labmod.up(spec, state_dir=state_dir, boot_timeout=timeout, progress=progress)
    except LabError as exc:
        print(f"  {len(spec.hosts)} hosts: FAILED: {exc}")
        labmod.down(state_dir)
        return None
    ready = time.monotonic()
    pss = [host_pss_mib(lab, h.short) for h in lab.hosts]
    used = [u for u in (guest_used_mib(h) for h in lab.hosts[:4]) if u is not None]
    lab.close()
    t_down = time.monotonic()
    labmod.down(state_dir)
    return {
        "hosts": len(spec.hosts), "prepare_s": marks.get("boot", start) - start,
        "boot_to_ready_s": ready - marks.get("boot", start), "down_s": time.monotonic() - t_down,
        "pss_mib": sum(pss) / len(pss), "guest_used_mib": sum(used) / len(used) if used else float("nan"),
        "load": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="8,16,32", help="lab sizes to try, ascending")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to reach all-sshd-ready")
    parser.add_argument("--state-dir", type=Path, default=Path("/tmp/ipsec-lab-bench"))
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, {mem_available_mib():.0f} MiB available, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'hosts':>5} {'prepare':>8} {'boot->ready':>11} {'down':>6} {'PSS/host':>9} {'guest used':>10} "
          f"{'load':>6}")
    largest = 0
    for n in (int(s) for s in args.sizes.split(",")):
        if mem_available_mib() < n * 128 * 1.5:
            print(f"  {n} hosts: skipped, not enough memory available")
            break
        row = one_size(n, args.state_dir, args.timeout)
        if row is None:
            break
        largest = int(str(row["hosts"]))
        print(f"{row['hosts']:>5} {row['prepare_s']:>7.1f}s {row['boot_to_ready_s']:>10.1f}s "
              f"{row['down_s']:>5.1f}s {row['pss_mib']:>6.0f}MiB {row['guest_used_mib']:>7.0f}MiB "
              f"{row['load']:>6.1f}")
    print(f"largest lab that booted within {args.timeout:.0f} s: {largest} hosts")


if __name__ == "__main__":
    main()
