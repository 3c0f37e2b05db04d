"""What is on the wire: capture on the lab bridge while one host pings another, count ESP vs cleartext."""

from __future__ import annotations

import re
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rollout.errors import LabError
from rollout.lab.lab import Lab
from rollout.lab.proc import netns_argv
from rollout.model import Family

_PING_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")


@dataclass(frozen=True, kw_only=True)
class ProbeResult:
    """Packets seen on the bridge between `a` and `b` (both directions) during the probe."""

    a: str
    b: str
    family: Family
    esp: int  # ESP, raw or UDP-encapsulated
    cleartext_icmp: int  # ICMP/ICMPv6 echo request/reply in the clear
    ike: int
    other: int  # ARP, neighbour discovery, anything else
    pings_sent: int
    pings_received: int

    @property
    def encrypted(self) -> bool:
        """ESP seen and not one echo in the clear."""
        return self.esp > 0 and self.cleartext_icmp == 0

    @property
    def cleartext(self) -> bool:
        return self.cleartext_icmp > 0 and self.esp == 0


@dataclass(frozen=True, kw_only=True)
class PacketCounts:
    esp: int = 0
    cleartext_icmp: int = 0
    ike: int = 0
    other: int = 0


def classify(lines: list[str]) -> PacketCounts:
    """Count tcpdump -nn text lines (pure; tested on captured output)."""
    esp = icmp = ike = other = 0
    for line in lines:
        if " > " not in line:
            continue
        if "ESP(" in line:
            esp += 1
        elif "isakmp" in line:
            ike += 1
        elif re.search(r"ICMP6?,? echo (request|reply)", line):
            icmp += 1
        else:
            other += 1
    return PacketCounts(esp=esp, cleartext_icmp=icmp, ike=ike, other=other)


def _capture_filter(family: Family, addr_a: str, addr_b: str) -> list[str]:
    proto = "ip" if family == "v4" else "ip6"
    # `host` also matches ARP for v4; the proto keeps v6 ND out of the v4 capture and vice versa.
    return [proto, "and", "host", addr_a, "and", "host", addr_b]


def _start_tcpdump(lab: Lab, family: Family, addr_a: str, addr_b: str,
                   errfile: Path) -> subprocess.Popen[str]:
    argv = ["tcpdump", "-i", lab.spec.bridge, "-nn", "-l", "-U", *_capture_filter(family, addr_a, addr_b)]
    with errfile.open("w") as err:
        proc = subprocess.Popen(netns_argv(lab.netns, argv), stdout=subprocess.PIPE, stderr=err, text=True,
                                stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60.0
    while "listening on" not in errfile.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise LabError(f"tcpdump on {lab.spec.bridge} did not start: {errfile.read_text().strip()}")
        time.sleep(0.05)
    return proc


def _stop_tcpdump(proc: subprocess.Popen[str]) -> list[str]:
    time.sleep(0.3)  # let the last replies cross the bridge
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out.splitlines()


def count_packets(lab: Lab, a: str, b: str, family: Family = "v4", seconds: float = 3.0, *,
                  interval: float = 0.2) -> ProbeResult:
    """Capture on the lab bridge while host `a` pings host `b` for about `seconds`; count what was seen."""
    host_a, host_b = lab.host(a), lab.host(b)
    addr_a, addr_b = str(host_a.spec.address(family)), str(host_b.spec.address(family))
    count = max(1, round(seconds / interval))
    ping = f"ping -{family[1]} -n -q -c {count} -i {interval} -W 1 {addr_b}"
    with tempfile.TemporaryDirectory(prefix="lab-probe-") as tmp:
        proc = _start_tcpdump(lab, family, addr_a, addr_b, Path(tmp) / "tcpdump.err")
        try:
            result = host_a.run(ping, timeout=seconds + 60)
        finally:
            lines = _stop_tcpdump(proc)
    sent, received = _ping_counts(result.stdout)
    counts = classify(lines)
    return ProbeResult(a=host_a.fqdn, b=host_b.fqdn, family=family, esp=counts.esp,
                       cleartext_icmp=counts.cleartext_icmp, ike=counts.ike, other=counts.other,
                       pings_sent=sent, pings_received=received)


def _ping_counts(output: str) -> tuple[int, int]:
    match = _PING_SUMMARY.search(output)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)
