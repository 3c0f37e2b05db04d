"""Which hosts protect their traffic with which: pairs and per-family connections (pure)."""

from __future__ import annotations

import fnmatch
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from itertools import compress, repeat
from operator import attrgetter, itemgetter

from rollout.errors import EmptyPairingRuleError, InputError
from rollout.model import Connection, Family, Fleet, Host, Pair, PairingRule, Selector


def matches(selector: Selector, host: Host, fleet: Fleet) -> bool:
    """True when the host satisfies every non-empty criterion of the selector."""
    if selector.sites and host.site not in selector.sites:
        return False
    if selector.tiers and fleet.sites[host.site].tier not in selector.tiers:
        return False
    if selector.clusters and host.cluster not in selector.clusters:
        return False
    return not selector.hosts or any(fnmatch.fnmatchcase(host.fqdn, g) for g in selector.hosts)


def select(selector: Selector, fleet: Fleet, hosts: Iterable[Host] | None = None) -> list[Host]:
    pool = fleet.hosts.values() if hosts is None else hosts
    return [h for h in pool if matches(selector, h, fleet)]


def compute_pairs(fleet: Fleet) -> tuple[Pair, ...]:
    """All pairs from all rules, sorted; a pair found by several rules is kept once (first rule wins)."""
    found: dict[tuple[str, str], Pair] = {}
    index = _Index(fleet)
    for rule in fleet.rules:
        produced = 0
        for pair in _rule_pairs(rule, index):
            produced += 1
            found.setdefault((pair.a, pair.b), pair)
        if produced == 0:
            raise EmptyPairingRuleError(
                "pairing rule selects no host pair", key=f"pairing rule {rule.name!r}",
                file=rule.source or None,
                hint="check its sites/clusters/hosts; pairs are never made within one site or across "
                     "clusters unless the rule sets allow_same_site / same_cluster: false")
    pairs = tuple(sorted(found.values(), key=_PAIR_ORDER))
    _check_connection_names(pairs)
    return pairs


_PAIR_ORDER = attrgetter("a", "b", "families", "rule")  # Pair's own order, compared in C


class _Index:
    """What every rule asks of the fleet, computed once: each host's address families, and the hosts
    each host glob matches (sharded fleets have a rule per shard; matching every rule's globs against
    every host would grow with the square of the fleet)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.families = {h.fqdn: h.families for h in fleet.hosts.values()}
        self._hosts = list(fleet.hosts.values())
        self._names = [h.fqdn for h in self._hosts]
        self._by_glob: dict[str, list[Host]] = {}

    def candidates(self, selector: Selector) -> Iterable[Host]:
        """The hosts the selector's globs allow (every host without globs), in fleet order."""
        for glob in selector.hosts:
            if glob not in self._by_glob:
                self._by_glob[glob] = self._matching(glob)
        if len(selector.hosts) != 1:
            allowed = {h.fqdn for glob in selector.hosts for h in self._by_glob[glob]}
            return [h for h in self._hosts if h.fqdn in allowed] if selector.hosts else self._hosts
        return self._by_glob[selector.hosts[0]]

    def _matching(self, glob: str) -> list[Host]:
        """fnmatch.fnmatchcase(fqdn, glob) over the fleet, with the loops in C: first the names that
        contain the glob's longest literal part (a shard glob keeps a few dozen), then the regex."""
        names, hosts = self._names, self._hosts
        literal = "" if "[" in glob else max(re.split(r"[*?]", glob), key=len)
        if literal:
            keep = list(map(str.__contains__, names, repeat(literal)))
            names, hosts = list(compress(names, keep)), list(compress(hosts, keep))
        match = re.compile(fnmatch.translate(glob)).match  # what fnmatchcase does
        return list(compress(hosts, map(match, names)))


def _rule_pairs(rule: PairingRule, index: _Index) -> Iterable[Pair]:
    side_a = _group(select(rule.a, index.fleet, index.candidates(rule.a)), rule.same_cluster)
    side_b = _group(select(rule.b, index.fleet, index.candidates(rule.b)), rule.same_cluster)
    for group, hosts_a in side_a.items():
        for x in hosts_a:
            for y in side_b.get(group, ()):
                pair = _pair(x, y, rule, index.families)
                if pair is not None:
                    yield pair


def _group(hosts: list[Host], by_cluster: bool) -> dict[str, list[Host]]:
    groups: dict[str, list[Host]] = defaultdict(list)
    for h in hosts:
        groups[h.cluster if by_cluster else ""].append(h)
    return groups


def _pair(x: Host, y: Host, rule: PairingRule, families: Mapping[str, tuple[Family, ...]]) -> Pair | None:
    if x.fqdn == y.fqdn or (x.site == y.site and not rule.allow_same_site):
        return None
    fx, fy = families[x.fqdn], families[y.fqdn]
    shared = fx if fx == fy else tuple(f for f in fx if f in fy)
    if not shared:
        return None
    a, b = (x.fqdn, y.fqdn) if x.fqdn < y.fqdn else (y.fqdn, x.fqdn)
    return Pair(a=a, b=b, families=shared, rule=rule.name)


def _check_connection_names(pairs: tuple[Pair, ...]) -> None:
    """Connections are named after the peer's short name: two peers of one host must not share it."""
    shorts: dict[tuple[str, str], str] = {}
    for pair in pairs:
        for local, peer in ((pair.a, pair.b), (pair.b, pair.a)):
            short = peer.split(".", 1)[0]
            other = shorts.setdefault((local, short), peer)
            if other != peer:
                raise InputError(
                    f"{local} would get two connections named {short}_v4/_v6 (peers {other} and {peer})",
                    key="hosts", hint="host short names must be unique among one host's peers")


def pairs_by_host(pairs: Iterable[Pair]) -> dict[str, tuple[Pair, ...]]:
    index: dict[str, list[Pair]] = defaultdict(list)
    for p in pairs:
        index[p.a].append(p)
        index[p.b].append(p)
    return {h: tuple(ps) for h, ps in index.items()}


def connections_of(fqdn: str, host_pairs: Iterable[Pair]) -> tuple[Connection, ...]:
    rows = sorted(((p.peer_of(fqdn), f, p.initiator == fqdn) for p in host_pairs for f in p.families),
                  key=itemgetter(0, 1))  # by peer, then family
    return tuple(Connection(local=fqdn, peer=peer, family=f, initiator=init) for peer, f, init in rows)


def connections_for(fleet: Fleet, pairs: Iterable[Pair], fqdn: str) -> tuple[Connection, ...]:
    """The connections `fqdn` carries (one per peer and family). Linear in pairs; use
    `connections_by_host` for the whole fleet."""
    return connections_of(fqdn, (p for p in pairs if fqdn in (p.a, p.b)))


def connections_by_host(pairs: Iterable[Pair]) -> dict[str, tuple[Connection, ...]]:
    return {h: connections_of(h, ps) for h, ps in pairs_by_host(pairs).items()}


def filter_pairs(pairs: Iterable[Pair], fleet: Fleet, *, host: str | None = None,
                 site: str | None = None) -> tuple[Pair, ...]:
    def keep(p: Pair) -> bool:
        if host and host not in (p.a, p.b):
            return False
        return not site or site in (fleet.hosts[p.a].site, fleet.hosts[p.b].site)
    return tuple(p for p in pairs if keep(p))


def sa_count(pairs: Iterable[Pair]) -> int:
    """CHILD SAs in the fleet: one per pair and family (each SA has an in and an out kernel state per end)."""
    return sum(len(p.families) for p in pairs)


def family_counts(pairs: Iterable[Pair]) -> Mapping[Family, int]:
    counts: dict[Family, int] = {"v4": 0, "v6": 0}
    for p in pairs:
        for f in p.families:
            counts[f] += 1
    return counts
