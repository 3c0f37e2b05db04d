"""The guided tour on the built-in lab: boot -> plan -> staged rollout -> proof of ESP -> kill -> proof
of cleartext -> lab down. Every step runs the real command a newcomer would type, so the tour doubles as
an end-to-end drill of the main job."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from rollout import inventory, pairing
from rollout.errors import ExitCode, LabError
from rollout.model import Family, Pair


class Narrator(Protocol):
    def chapter(self, number: int, title: str, why: str) -> None: ...
    def command(self, argv: Sequence[str]) -> None: ...
    def output(self, text: str) -> None: ...
    def verdict(self, ok: bool, text: str) -> None: ...


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    keep: bool = False
    state_dir: Path | None = None  # lab state dir; default: the lab's own default
    playbooks: Path = Path("playbooks")
    playbook: str = "lab"


@dataclass(frozen=True, kw_only=True)
class Evidence:
    title: str
    ok: bool
    detail: str


def tool(name: str) -> list[str]:
    """The installed console script next to this interpreter (works in a venv without activation)."""
    sibling = Path(sys.executable).with_name(name)
    if sibling.exists():
        return [str(sibling)]
    found = shutil.which(name)
    if not found:
        raise LabError(f"{name} is not installed", hint="run scripts/bootstrap (pip install -e .)")
    return [found]


class Tour:
    """Runs the chapters in order; stops at the first failed proof and leaves the lab up to inspect."""

    def __init__(self, options: DemoOptions, narrator: Narrator) -> None:
        self.options = options
        self.say = narrator
        self.evidence: list[Evidence] = []
        self.env = dict(os.environ)
        self.env.setdefault("COLUMNS", "110")
        if options.state_dir:
            self.env["ROLLOUT_LAB_DIR"] = str(options.state_dir)

    # --- helpers ---------------------------------------------------------------------------------

    def run(self, argv: list[str], *, ok_codes: tuple[int, ...] = (0,), timeout: float = 1800) -> str:
        """Run one real command, streaming its output as it comes (a tour, not a batch job)."""
        self.say.command(argv)
        started = time.monotonic()
        proc = subprocess.Popen(argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.start()
        lines: list[str] = []
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                self.say.output(lines[-1])
            returncode = proc.wait()
        finally:
            watchdog.cancel()
        if returncode not in ok_codes:
            raise LabError(f"`{' '.join(argv[:3])} ...` exited {returncode} after "
                           f"{time.monotonic() - started:.0f}s",
                           hint="the lab is left up for inspection: ipsec-rollout lab status; "
                                "ipsec-rollout lab down when done")
        return "\n".join(lines)

    def prove(self, title: str, ok: bool, detail: str) -> None:
        self.evidence.append(Evidence(title=title, ok=ok, detail=detail))
        self.say.verdict(ok, f"{title}: {detail}")
        if not ok:
            raise LabError(f"demo check failed: {title} ({detail})",
                           hint="the lab is left up for inspection: ipsec-rollout lab status")

    def lab_dirs(self) -> tuple[Path, Path]:
        from rollout.lab.paths import LabPaths, default_state_dir

        root = self.options.state_dir or default_state_dir()
        paths = LabPaths(root)
        return paths.inventory_dir, self.options.playbooks

    def probe(self, pair: Pair, family: Family) -> tuple[int, int, int]:
        from rollout import lab as labmod
        from rollout.lab import probe

        self.say.command(["ipsec-rollout", "lab", "probe", pair.a, pair.b, "--family", family])
        r = probe.count_packets(labmod.load(self.options.state_dir), pair.a, pair.b, family, 3.0)
        self.say.output(f"{pair.a} -> {pair.b} ({family}): ESP {r.esp}, cleartext ICMP {r.cleartext_icmp}, "
                        f"pings {r.pings_received}/{r.pings_sent} answered")
        return r.esp, r.cleartext_icmp, r.pings_received

    # --- chapters --------------------------------------------------------------------------------

    def chapters(self) -> list[tuple[str, str, Callable[[], None]]]:
        return [
            ("Boot the lab", "Real UML kernels with ESP, sshd and charon, in a private network namespace "
             "(198.18.0.0/15, fd00::/8); a throwaway CA puts certificates where Puppet keeps them.",
             self.boot),
            ("Validate the fleet", "Nothing touches a host before the inventory and pairing check out.",
             self.validate),
            ("Plan (the dry run a change review reads)", "Stages, batches, the SAs each stage brings up, "
             "the files and commands; no SSH, nothing changes.", self.plan),
            ("Staged rollout with health gates", "One pair, then half the cluster, then the rest; after "
             "every batch both ends of every pair must show INSTALLED transport SAs in IKE and the kernel, "
             "with traffic raising the counters.", self.apply),
            ("Fleet status", "The same health code as the gates, from every host.", self.status),
            ("Proof from the wire", "tcpdump on the lab bridge while one host pings its peer.",
             self.wire_esp),
            ("The kill switch", "ipsec-kill --all: latch off, stop IPsec, flush xfrm, verify, on every "
             "host in parallel.", self.kill),
            ("Traffic after the kill", "Cleartext again, and still flowing.", self.wire_clear),
            ("Status after the kill", "Killed hosts show as latched, not as failures.", self.status_after),
            ("The latch holds", "A rollout is refused while the kill's stop flag stands, and then on "
             "every host still latched, until an operator lifts the latch with ipsec-kill --rearm.",
             self.latch_holds),
            ("Clean up", "Stop every UML host and remove the namespace.", self.cleanup),
        ]

    def boot(self) -> None:
        self.run([*tool("ipsec-rollout"), "lab", "up"])
        self.run([*tool("ipsec-rollout"), "lab", "status"])

    def validate(self) -> None:
        inv, _ = self.lab_dirs()
        self.run([*tool("ipsec-rollout"), "inventory", "validate", "--inventory", str(inv)])
        self.run([*tool("ipsec-rollout"), "inventory", "pairs", "--inventory", str(inv)])

    def plan(self) -> None:
        inv, books = self.lab_dirs()
        self.run([*tool("ipsec-rollout"), "plan", self.options.playbook, "--inventory", str(inv),
                  "--playbooks", str(books)])

    def apply(self) -> None:
        inv, books = self.lab_dirs()
        self.run([*tool("ipsec-rollout"), "apply", self.options.playbook, "--inventory", str(inv),
                  "--playbooks", str(books), "--yes", "--reason", "demo: staged rollout on the lab"])

    def status(self) -> None:
        inv, _ = self.lab_dirs()
        self.run([*tool("ipsec-rollout"), "status", "--inventory", str(inv)])

    def first_pair(self) -> Pair:
        inv, _ = self.lab_dirs()
        pairs = pairing.compute_pairs(inventory.load_dir(inv))
        return next(p for p in pairs if "v6" in p.families)

    def wire_esp(self) -> None:
        pair = self.first_pair()
        for family in pair.families:
            esp, clear, answered = self.probe(pair, family)
            self.prove(f"ESP on the wire ({family})", esp > 0 and clear == 0 and answered > 0,
                       f"{esp} ESP packets, {clear} cleartext ICMP, {answered} pings answered")

    def kill(self) -> None:
        inv, _ = self.lab_dirs()
        report = (self.options.state_dir or self.lab_dirs()[0].parent) / "ipsec-kill-demo.json"
        self.run([*tool("ipsec-kill"), "--all", "--yes", "--inventory", str(inv), "--report", str(report),
                  "--reason", "demo: kill switch drill"])
        self.run([*tool("ipsec-kill"), "--all", "--yes", "--inventory", str(inv),
                  "--report", str(report.with_name("ipsec-kill-demo-again.json")),
                  "--reason", "demo: second run is idempotent"])

    def wire_clear(self) -> None:
        pair = self.first_pair()
        for family in pair.families:
            esp, clear, answered = self.probe(pair, family)
            self.prove(f"cleartext and flowing ({family})", esp == 0 and clear > 0 and answered > 0,
                       f"{esp} ESP packets, {clear} cleartext ICMP, {answered} pings answered")

    def status_after(self) -> None:
        inv, _ = self.lab_dirs()
        # status exits non-zero while hosts are latched; that is the point of the latch.
        self.run([*tool("ipsec-rollout"), "status", "--inventory", str(inv)], ok_codes=(0, 1, 2))

    def latch_holds(self) -> None:
        """Two layers: the fleet-wide stop flag (any rearm lifts it), then each host's own latch."""
        inv, books = self.lab_dirs()
        apply = [*tool("ipsec-rollout"), "apply", self.options.playbook, "--inventory", str(inv),
                 "--playbooks", str(books), "--yes", "--reason", "demo: must be refused"]
        self.run(apply, ok_codes=(int(ExitCode.KILLED_DURING_APPLY),))
        self.prove("apply refused while the kill's stop flag stands", True,
                   f"exit {int(ExitCode.KILLED_DURING_APPLY)}")
        first = self.first_pair().a
        self.run([*tool("ipsec-kill"), "--rearm", "--host", first, "--yes", "--inventory", str(inv),
                  "--report", str(inv.parent / "ipsec-rearm-demo-one.json")])
        self.run(apply, ok_codes=(int(ExitCode.HOST_LATCHED),))
        self.prove("apply refused on the hosts still latched", True, f"exit {int(ExitCode.HOST_LATCHED)}")
        self.run([*tool("ipsec-kill"), "--rearm", "--all", "--yes", "--inventory", str(inv),
                  "--report", str(inv.parent / "ipsec-rearm-demo.json")])

    def cleanup(self) -> None:
        if self.options.keep:
            self.say.output("--keep: the lab stays up (ipsec-rollout lab down when done)")
            return
        self.run([*tool("ipsec-rollout"), "lab", "down"])

    def run_all(self) -> list[Evidence]:
        for number, (title, why, step) in enumerate(self.chapters(), start=1):
            self.say.chapter(number, title, why)
            step()
        return self.evidence
