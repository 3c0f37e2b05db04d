"""Which host a failing gate blames (the failure budget counts blamed hosts)."""

from __future__ import annotations

from typing import Any, cast

from rollout.gates import Gate, GateIO, _Bad
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
