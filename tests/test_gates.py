"""Which host a failing gate blames (the failure budget counts blamed hosts)."""

from __future__ import annotations

from typing import Any, cast

from rollout.gates import Gate, GateIO, _Bad
from rollout.health import HostObservation
from rollout.model import Pair


def pair(a: str, b: str) -> Pair:
    return Pair(a=a, b=b, families=("v4",), rule="test")


# eqiad e1, e2 x codfw c1, c2: four pairs
E1C1, E1C2, E2C1, E2C2 = pair("e1", "c1"), pair("e1", "c2"), pair("e2", "c1"), pair("e2", "c2")
ALL = [E1C1, E1C2, E2C1, E2C2]


def blamed(pairs: list[Pair], focus: set[str], failing: list[Pair]) -> tuple[str, ...]:
    gate = Gate(cast(GateIO, cast(Any, object())), list(pairs), focus)
    result = gate._fail([_Bad(p, ("not-conn",)) for p in failing])
    assert not result.passed and len(result.failing) == len(failing)
    return result.ipsec_failed


def test_the_host_failing_with_every_peer_is_blamed_not_its_healthy_peers() -> None:
    assert blamed(ALL, {"e1", "e2", "c1", "c2"}, [E1C2, E2C2]) == ("c2",)


def test_a_pair_specific_failure_blames_both_ends() -> None:
    assert blamed(ALL, {"e1", "e2", "c1", "c2"}, [E1C1]) == ("c1", "e1")


def test_only_hosts_of_this_batch_are_blamed() -> None:
    assert blamed(ALL, {"c2"}, [E1C2, E2C2]) == ("c2",)
    assert blamed([E1C1], {"c1"}, [E1C1]) == ("c1",)  # e1 was enabled by an earlier batch


def test_a_lone_pair_that_fails_blames_both() -> None:
    assert blamed([E1C1], {"e1", "c1"}, [E1C1]) == ("c1", "e1")


def test_everything_failing_blames_everyone_in_the_batch() -> None:
    assert blamed(ALL, {"e1", "e2", "c1", "c2"}, ALL) == ("c1", "c2", "e1", "e2")


class _IO:
    """A GateIO whose hosts never change: enough to see which commands a gate sends."""

    def __init__(self, observations: dict[str, HostObservation]) -> None:
        self.fleet: Any = None
        self.poll_interval = 1.0
        self.now = 0.0
        self.observations = observations
        self.commands: list[tuple[str, str]] = []
        self.warnings: list[str] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def checkpoint(self) -> None:
        return None

    def collect(self, hosts: Any) -> dict[str, HostObservation]:
        return {h: self.observations[h] for h in hosts}

    def run_on(self, fqdn: str, command: str, *, timeout: float = 60.0) -> None:
        self.commands.append((fqdn, command))

    def sampled(self, sample: int, pairs: int, bad: int) -> None:
        return None

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def test_forced_rekey_skips_stroke_initiators_and_says_so() -> None:
    io = _IO({"c1": HostObservation(host="c1"), "e1": HostObservation(host="e1", stack="stroke"),
              "e2": HostObservation(host="e2")})
    gate = Gate(cast(GateIO, io), [E1C1, E2C1], {"e1", "e2", "c1"})
    gate._rekey(io.collect(["c1", "e1", "e2"]), timeout=2.0)
    rekeyed = {host for host, command in io.commands if "swanctl --rekey" in command}
    assert rekeyed == {"e2"}  # e1 (stroke) is not sent a swanctl command it does not have
    assert io.warnings == ["forced rekey skipped for pairs initiated by 1 host(s) without swanctl: e1"]
