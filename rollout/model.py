"""The fleet as immutable values. No I/O here: loaders build these, everything else reads them."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

Family = Literal["v4", "v6"]
FAMILIES: tuple[Family, ...] = ("v4", "v6")


class Tier(str, Enum):
    CORE = "core"
    EDGE = "edge"


class Stack(str, Enum):
    SWANCTL = "swanctl"  # vici / swanctl.conf (strongSwan >= 5.2)
    STROKE = "stroke"  # legacy starter: ipsec.conf / ipsec.secrets


@dataclass(frozen=True, kw_only=True)
class OsFlavour:
    """How to drive strongSwan on one kind of host. Commands are argv-free shell snippets
    with no interpolated values (they are constants), so they need no quoting."""

    name: str
    stack: Stack
    service_manager: Literal["systemd", "sysvinit", "upstart", "lab"]
    service: str
    start: str
    stop: str
    enable: str
    disable: str  # also masks, where the manager can
    is_active: str
    swanctl_dir: str = "/etc/swanctl"
    strongswan_conf_dir: str = "/etc/strongswan.d"


def _systemd(name: str, stack: Stack, service: str) -> OsFlavour:
    return OsFlavour(
        name=name, stack=stack, service_manager="systemd", service=service,
        start=f"systemctl start {service}", stop=f"systemctl stop {service}",
        enable=f"systemctl unmask {service} && systemctl enable {service}",
        disable=f"systemctl disable {service} && systemctl mask {service}",
        is_active=f"systemctl is-active --quiet {service}",
    )


OS_FLAVOURS: dict[str, OsFlavour] = {
    f.name: f
    for f in (
        _systemd("debian-bookworm", Stack.SWANCTL, "strongswan"),
        _systemd("debian-bullseye", Stack.SWANCTL, "strongswan"),
        _systemd("debian-jessie", Stack.STROKE, "strongswan"),
        OsFlavour(
            name="ubuntu-trusty", stack=Stack.STROKE, service_manager="upstart", service="strongswan",
            start="service strongswan start", stop="service strongswan stop",
            enable="rm -f /etc/init/strongswan.override",
            disable="echo manual > /etc/init/strongswan.override",
            is_active="service strongswan status | grep -q running",
        ),
        # The UML lab: a tiny supervisor script in the guest stands in for the service manager
        # (it restarts charon unless disabled, as systemd + Puppet would).
        OsFlavour(
            name="lab-uml", stack=Stack.SWANCTL, service_manager="lab", service="charon",
            start="/etc/lab/svc start", stop="/etc/lab/svc stop", enable="/etc/lab/svc enable",
            disable="/etc/lab/svc disable", is_active="/etc/lab/svc status",
        ),
    )
}


@dataclass(frozen=True, kw_only=True)
class SshSettings:
    user: str = "root"
    port: int = 22
    identity: str | None = None
    known_hosts: str = "~/.ssh/known_hosts"
    proxy_jump: str | None = None
    netns: str | None = None  # run SSH from inside this network namespace (the lab)
    connect_timeout: float = 10.0
    command_timeout: float = 60.0
    use_ssh_config: bool = True

    def merged(self, **overrides: object) -> SshSettings:
        values = {k: v for k, v in overrides.items() if v is not None}
        return SshSettings(**{**self.__dict__, **values})


@dataclass(frozen=True, kw_only=True)
class CertSource:
    """Where configuration management already keeps each host's certificate material.
    `{certname}` is replaced by the host's certname (its FQDN)."""

    cert: str = "/var/lib/puppet/ssl/certs/{certname}.pem"
    key: str = "/var/lib/puppet/ssl/private_keys/{certname}.pem"
    ca: str = "/var/lib/puppet/ssl/certs/ca.pem"
    crl: str | None = None

    def cert_path(self, certname: str) -> str:
        return self.cert.replace("{certname}", certname)

    def key_path(self, certname: str) -> str:
        return self.key.replace("{certname}", certname)


@dataclass(frozen=True, kw_only=True)
class IpsecSettings:
    """Profile name plus explicit overrides; resolution into concrete values is the renderer's job."""

    profile: str = "modern"
    overrides: tuple[tuple[str, object], ...] = ()
    charon_overrides: tuple[tuple[str, object], ...] = ()
    cert_source: CertSource = field(default_factory=CertSource)
    enforce: bool = False  # False = fail-open (start SAs, cleartext if down); True = trap policies


@dataclass(frozen=True, kw_only=True)
class Site:
    name: str
    tier: Tier


@dataclass(frozen=True, kw_only=True)
class Cluster:
    name: str
    description: str = ""


@dataclass(frozen=True, kw_only=True)
class Host:
    fqdn: str
    site: str
    cluster: str
    os: str
    ipv4: ipaddress.IPv4Address | None = None
    ipv6: ipaddress.IPv6Address | None = None
    ssh: SshSettings = field(default_factory=SshSettings)
    ssh_host: str | None = None  # address/name to SSH to, if not the fqdn

    @property
    def short(self) -> str:
        return self.fqdn.split(".", 1)[0]

    @property
    def certname(self) -> str:
        return self.fqdn

    @property
    def families(self) -> tuple[Family, ...]:
        return tuple(f for f in FAMILIES if self.address(f) is not None)

    def address(self, family: Family) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        return self.ipv4 if family == "v4" else self.ipv6

    @property
    def connect_address(self) -> str:
        if self.ssh_host:
            return self.ssh_host
        return self.fqdn


@dataclass(frozen=True, kw_only=True)
class Selector:
    """Selects hosts: every given criterion must match (empty criterion = any)."""

    sites: tuple[str, ...] = ()
    tiers: tuple[Tier, ...] = ()
    clusters: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()  # fnmatch globs on the FQDN


@dataclass(frozen=True, kw_only=True)
class PairingRule:
    name: str
    a: Selector
    b: Selector
    same_cluster: bool = True  # pair only hosts of one cluster (the default; cross-cluster must be asked for)
    allow_same_site: bool = False
    source: str = ""  # the file that defined it (for messages)


@dataclass(frozen=True, kw_only=True)
class Fleet:
    sites: dict[str, Site]
    clusters: dict[str, Cluster]
    hosts: dict[str, Host]  # by fqdn, sorted
    rules: tuple[PairingRule, ...]
    ipsec: IpsecSettings
    ssh: SshSettings
    sources: tuple[str, ...] = ()  # the files it was read from (for messages and digests)

    def host(self, fqdn: str) -> Host:
        return self.hosts[fqdn]

    def flavour(self, host: Host) -> OsFlavour:
        return OS_FLAVOURS[host.os]


@dataclass(frozen=True, kw_only=True, order=True)
class Pair:
    """Two hosts that protect their traffic with each other. `a` < `b` by FQDN; `initiator` is `a`."""

    a: str
    b: str
    families: tuple[Family, ...]
    rule: str

    @property
    def initiator(self) -> str:
        return self.a

    def peer_of(self, fqdn: str) -> str:
        return self.b if fqdn == self.a else self.a


@dataclass(frozen=True, kw_only=True, order=True)
class Connection:
    """One IKE/CHILD connection as seen from `local`: named `<peer-short>_<family>`."""

    local: str
    peer: str
    family: Family
    initiator: bool

    @property
    def name(self) -> str:
        return f"{self.peer.split('.', 1)[0]}_{self.family}"
