"""The lab's layout as values: sites, hosts, addresses, interface names. Pure: no I/O here."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from rollout.errors import LabError
from rollout.model import Tier

DEFAULT_SITES: tuple[str, ...] = ("core1", "core2", "edge1", "edge2")
DEFAULT_CLUSTERS: tuple[str, ...] = ("cache_text",)
DEFAULT_NETNS = "ipsec-lab"
DOMAIN = "lab.example"
# Lab addresses live only in the benchmarking range 198.18.0.0/15 and the ULA fd00::/8.
NET4 = ipaddress.IPv4Network("198.18.0.0/24")
NET6 = ipaddress.IPv6Network("fd00:1ab::/64")
BRIDGE4 = ipaddress.IPv4Address("198.18.0.1")
BRIDGE6 = ipaddress.IPv6Address("fd00:1ab::1")
MAX_HOSTS = 240
_CLUSTER_PREFIX = {"cache_text": "cp", "cache_upload": "cu"}


@dataclass(frozen=True, kw_only=True)
class SiteSpec:
    name: str
    tier: Tier


@dataclass(frozen=True, kw_only=True)
class HostSpec:
    """One lab host. `index` (1-based) numbers its addresses, tap and MAC."""

    index: int
    short: str
    fqdn: str
    site: str
    tier: Tier
    cluster: str
    ipv4: ipaddress.IPv4Address
    ipv6: ipaddress.IPv6Address

    @property
    def tap(self) -> str:
        return f"ul{self.index}"

    @property
    def mac(self) -> str:
        return f"02:1a:b0:00:{self.index >> 8:02x}:{self.index & 0xFF:02x}"

    def address(self, family: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return self.ipv4 if family == "v4" else self.ipv6


@dataclass(frozen=True, kw_only=True)
class LabSpec:
    """Everything needed to (re)build the same lab: saved as lab.json in the state dir."""

    sites: tuple[SiteSpec, ...]
    clusters: tuple[str, ...]
    hosts: tuple[HostSpec, ...]
    netns: str = DEFAULT_NETNS
    bridge: str = "labbr0"
    mem_mb: int = 128
    domain: str = DOMAIN
    bridge_ipv4: ipaddress.IPv4Address = field(default=BRIDGE4)
    bridge_ipv6: ipaddress.IPv6Address = field(default=BRIDGE6)
    prefix4: int = NET4.prefixlen
    prefix6: int = NET6.prefixlen

    def host(self, name: str) -> HostSpec:
        """Find a host by short name, FQDN or address."""
        for host in self.hosts:
            if name in (host.short, host.fqdn, str(host.ipv4), str(host.ipv6)):
                return host
        known = ", ".join(h.short for h in self.hosts)
        raise LabError(f"no lab host {name!r}", hint=f"lab hosts: {known}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str, indent=2, sort_keys=True) + "\n"

    @staticmethod
    def from_json(text: str) -> LabSpec:
        raw = json.loads(text)
        return LabSpec(
            sites=tuple(SiteSpec(name=s["name"], tier=Tier(s["tier"])) for s in raw["sites"]),
            clusters=tuple(raw["clusters"]),
            hosts=tuple(_host_from_dict(h) for h in raw["hosts"]),
            netns=raw["netns"], bridge=raw["bridge"], mem_mb=raw["mem_mb"], domain=raw["domain"],
            bridge_ipv4=ipaddress.IPv4Address(raw["bridge_ipv4"]),
            bridge_ipv6=ipaddress.IPv6Address(raw["bridge_ipv6"]),
            prefix4=raw["prefix4"], prefix6=raw["prefix6"],
        )


def _host_from_dict(raw: dict[str, object]) -> HostSpec:
    return HostSpec(
        index=int(str(raw["index"])), short=str(raw["short"]), fqdn=str(raw["fqdn"]),
        site=str(raw["site"]), tier=Tier(str(raw["tier"])), cluster=str(raw["cluster"]),
        ipv4=ipaddress.IPv4Address(str(raw["ipv4"])), ipv6=ipaddress.IPv6Address(str(raw["ipv6"])),
    )


def parse_site(text: str) -> SiteSpec:
    """`name` or `name:tier`; without a tier, names containing 'edge' are edge sites, others core."""
    name, _, tier = text.strip().partition(":")
    if not name or not all(c.isalnum() or c == "-" for c in name):
        raise LabError(f"bad lab site name {text!r}", hint="use letters, digits and hyphens, e.g. core1")
    if not tier:
        tier = Tier.EDGE.value if "edge" in name else Tier.CORE.value
    if tier not in (Tier.CORE.value, Tier.EDGE.value):
        raise LabError(f"bad tier {tier!r} for lab site {name!r}", hint="tier is core or edge")
    return SiteSpec(name=name, tier=Tier(tier))


def build_spec(
    sites: Sequence[str] = DEFAULT_SITES,
    *,
    hosts_per_cluster: int = 2,
    clusters: Sequence[str] = DEFAULT_CLUSTERS,
    netns: str = DEFAULT_NETNS,
    mem_mb: int = 128,
) -> LabSpec:
    """Lay out `hosts_per_cluster` hosts per (site, cluster): short names cp<site><cluster><nn>."""
    site_specs = tuple(parse_site(s) for s in sites)
    _check_layout(site_specs, clusters, hosts_per_cluster, netns)
    hosts: list[HostSpec] = []
    for s_idx, site in enumerate(site_specs, start=1):
        for c_idx, cluster in enumerate(clusters):
            for n in range(1, hosts_per_cluster + 1):
                hosts.append(_make_host(len(hosts) + 1, site, cluster, f"{s_idx}{c_idx}{n:02d}"))
    return LabSpec(sites=site_specs, clusters=tuple(clusters), hosts=tuple(hosts), netns=netns, mem_mb=mem_mb)


def _check_layout(sites: Sequence[SiteSpec], clusters: Sequence[str], per: int, netns: str) -> None:
    names = [s.name for s in sites]
    if not sites or len(set(names)) != len(names):
        raise LabError(f"lab sites must be distinct and non-empty, got {names}")
    if per < 1 or not clusters:
        raise LabError("a lab needs at least one cluster and one host per cluster")
    total = len(sites) * len(clusters) * per
    if total > MAX_HOSTS:
        raise LabError(f"{total} lab hosts requested; the lab's /24 holds at most {MAX_HOSTS}")
    if not netns or not all(c.isalnum() or c in "-_" for c in netns):
        raise LabError(f"bad network namespace name {netns!r}")


def _make_host(index: int, site: SiteSpec, cluster: str, number: str) -> HostSpec:
    short = f"{_CLUSTER_PREFIX.get(cluster, 'lab')}{number}"
    return HostSpec(
        index=index, short=short, fqdn=f"{short}.{site.name}.{DOMAIN}", site=site.name, tier=site.tier,
        cluster=cluster, ipv4=NET4.network_address + 10 + index,
        ipv6=ipaddress.IPv6Address(f"fd00:1ab::{10 + index}"),
    )
