"""Render one host's strongSwan configuration (pure: fleet + pairs in, file contents out).

swanctl-stack hosts get `/etc/swanctl/conf.d/ipsec-rollout.conf` plus a strongswan.d charon snippet;
stroke-stack hosts get a legacy `/etc/ipsec.conf` + `/etc/ipsec.secrets` plus the same snippet.
Rendered files never contain key material: the certificate, key and CA are copied ON THE HOST from
the paths configuration management already uses (`RenderedHost.material`, carried out by steps.py).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache, cached_property, lru_cache
from typing import Literal

import jinja2

from rollout import errors, model, pairing, profiles
from rollout.profiles import ResolvedSettings, format_duration

SWANCTL_CONF = "conf.d/ipsec-rollout.conf"  # relative to the flavour's swanctl_dir
CHARON_SNIPPET = "zz-ipsec-rollout.conf"  # relative to the flavour's strongswan_conf_dir
CA_NAME = "ipsec-rollout-ca.pem"
CRL_NAME = "ipsec-rollout.crl"
LEGACY_CONF = "/etc/ipsec.conf"
LEGACY_SECRETS = "/etc/ipsec.secrets"
LEGACY_DIR = "/etc/ipsec.d"

_FQDN = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                   r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


@dataclass(frozen=True, kw_only=True)
class RenderedFile:
    """One file the tool writes on a host: absolute path, full content, octal mode."""

    path: str
    content: str
    mode: int

    @cached_property
    def sha256(self) -> str:  # install steps, expected digests and the plan digest all ask for it
        return hashlib.sha256(self.content.encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class MaterialCopy:
    """Certificate material copied on the host itself (never through the orchestrator)."""

    kind: Literal["cert", "key", "ca", "crl"]
    source: str
    dest: str
    mode: int


@dataclass(frozen=True, kw_only=True)
class RenderedHost:
    fqdn: str
    stack: model.Stack
    flavour: model.OsFlavour
    enforce: bool
    settings: ResolvedSettings
    connections: tuple[model.Connection, ...]
    files: tuple[RenderedFile, ...]
    material: tuple[MaterialCopy, ...]

    @property
    def managed_paths(self) -> tuple[str, ...]:
        """Every path the tool writes on this host (snapshot, restore and teardown cover these)."""
        return tuple(sorted({f.path for f in self.files} | {m.dest for m in self.material}))

    def file(self, path: str) -> RenderedFile:
        return next(f for f in self.files if f.path == path)


def render_host(fleet: model.Fleet, pairs: tuple[model.Pair, ...], fqdn: str, *,
                enforce: bool | None = None) -> RenderedHost:
    """All files for `fqdn`. `enforce=None` takes the fleet setting (False = fail-open)."""
    host = _host(fleet, fqdn)
    flavour = fleet.flavour(host)
    settings = profiles.resolve(fleet.ipsec)
    enforce = fleet.ipsec.enforce if enforce is None else enforce
    conns = pairing.connections_for(fleet, pairs, fqdn)
    values = _host_values(host)
    layout = _layout(flavour.stack, settings, enforce)
    blocks = _connection_blocks(fleet, host, conns, settings, enforce, layout, values)
    _check_unique_names(fqdn, conns)
    values["connections"] = layout.separator.join(blocks)
    return RenderedHost(fqdn=fqdn, stack=flavour.stack, flavour=flavour, enforce=enforce, settings=settings,
                        connections=conns, files=_files(flavour, layout, values),
                        material=_material(fleet, host, flavour))


def posture(enforce: bool) -> str:
    return "enforce (trap policies)" if enforce else "fail-open (start, cleartext while down)"


# ----------------------------------------------------------------------------------------------


def _host(fleet: model.Fleet, fqdn: str) -> model.Host:
    host = fleet.hosts.get(fqdn)
    if host is None:
        raise errors.RenderError(f"unknown host {fqdn!r}", key="hosts")
    if not _plain_dns_name(fqdn):
        raise errors.RenderError(f"host name {fqdn!r} is not a plain DNS name", key=f"hosts.{fqdn}",
                                 hint="letters, digits, '-' and '.' only")
    return host


@lru_cache(maxsize=1 << 16)
def _plain_dns_name(fqdn: str) -> bool:
    return _FQDN.match(fqdn) is not None


@lru_cache(maxsize=1 << 16)
def _address_text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return str(address)  # ~5 us for IPv6; every address is written once per peer


def _check_unique_names(fqdn: str, conns: tuple[model.Connection, ...]) -> None:
    seen: dict[str, str] = {}
    for c in conns:
        if seen.setdefault(c.name, c.peer) != c.peer:
            raise errors.RenderError(
                f"{fqdn}: peers {seen[c.name]} and {c.peer} would both get connection {c.name}",
                key=f"hosts.{fqdn}", hint="host short names must be unique among one host's peers")


def _host_values(host: model.Host) -> dict[str, str]:
    return {"fqdn": host.fqdn, "local_cert": f"{host.certname}.pem", "local_id": f"CN={host.certname}"}


def _connection_blocks(fleet: model.Fleet, host: model.Host, conns: tuple[model.Connection, ...],
                       s: ResolvedSettings, enforce: bool, layout: _Layout,
                       host_values: Mapping[str, str]) -> list[str]:
    """One filled connection block per connection (the hot loop: ~20 per host)."""
    local_addr = {f: _address_text(a) for f in model.FAMILIES if (a := host.address(f)) is not None}
    stroke = layout.stack is model.Stack.STROKE
    blocks = []
    for conn in conns:
        peer = _host(fleet, conn.peer)
        remote_addr = peer.address(conn.family)
        if conn.family not in local_addr or remote_addr is None:
            raise errors.RenderError(f"{conn.local} -> {conn.peer}: no {conn.family} address on both ends",
                                     key=f"hosts.{conn.local}")
        start, auto = _START[enforce, conn.initiator]
        dpd = s.dpd_action_for(conn.local, conn.peer, initiator=conn.initiator, enforce=enforce)
        blocks.append(layout.connection % {
            **host_values, "c_name": conn.name, "c_family": conn.family,
            "c_local_addr": local_addr[conn.family], "c_remote_addr": _address_text(remote_addr),
            "c_local_id": host_values["local_id"], "c_remote_id": f"CN={peer.certname}",
            "c_start_action": start, "c_auto": auto, "c_dpd_action": _STROKE_ACTION[dpd] if stroke else dpd,
        })
    return blocks


# (enforce, initiator) -> (swanctl start_action, ipsec.conf auto)
_START = {(True, True): ("trap", "route"), (True, False): ("trap", "route"),
          (False, True): ("start", "start"), (False, False): ("none", "add")}
_CONN_FIELDS = ("name", "family", "local_addr", "remote_addr", "local_id", "remote_id", "start_action",
                "auto", "dpd_action")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _swanctl_settings(s: ResolvedSettings) -> dict[str, object]:
    t = s.timing
    return {
        "version": 2, "ike_proposals": s.ike_proposals, "esp_proposals": s.esp_proposals,
        "mobike": _yes(s.mobike), "encap": _yes(s.encap), "fragmentation": _yes(s.fragmentation),
        "dpd_delay": format_duration(s.dpd_delay),
        "rekey_time": format_duration(t.rekey_time), "reauth_time": format_duration(t.reauth_time),
        "over_time": format_duration(t.over_time) if t.over_time else None,
        "rand_time": format_duration(t.rand_time) if t.rand_time else None,
        "keyingtries": s.keyingtries, "unique": s.unique, "send_certreq": _yes(s.send_certreq),
        "send_cert": s.send_cert, "revocation": s.revocation, "close_action": s.close_action,
        "child_rekey_time": format_duration(t.child_rekey_time),
        "child_life_time": format_duration(t.child_life_time),
        "child_rand_time": format_duration(t.child_rand_time), "replay_window": s.replay_window,
    }


_STROKE_ACTION = {"trap": "hold", "start": "restart", "clear": "clear", "restart": "restart", "none": "none"}
_UNIQUEIDS = {"no": "no", "never": "never", "replace": "yes", "keep": "keep"}
_STRICTCRL = {"strict": "yes", "ifuri": "ifuri", "relaxed": "no"}


def _stroke_settings(s: ResolvedSettings) -> dict[str, object]:
    legacy = s.timing.legacy
    return {
        "uniqueids": _UNIQUEIDS[s.unique], "strictcrlpolicy": _STRICTCRL[s.revocation],
        "ike_proposals": s.ike_proposals, "esp_proposals": s.esp_proposals,
        "mobike": _yes(s.mobike), "encap": _yes(s.encap), "fragmentation": _yes(s.fragmentation),
        "ikelifetime": format_duration(legacy.ikelifetime), "lifetime": format_duration(legacy.lifetime),
        "margintime": format_duration(legacy.margintime), "rekeyfuzz": legacy.rekeyfuzz,
        "reauth": _yes(legacy.reauth), "keyingtries": s.keyingtries or "%forever",
        "dpd_delay": format_duration(s.dpd_delay), "close_action": _STROKE_ACTION[s.close_action],
        "send_cert": s.send_cert,
    }


# ----------------------------------------------------------------------------------------------
# Layouts: the templates rendered once per (stack, settings, posture), with placeholders where the
# per-host and per-connection values go. A host is then a few `pattern % values`, not a template
# render per connection (jinja's attribute lookups were ~3 ms per host).
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Layout:
    """printf-style patterns (`%(name)s`) of one stack's files, with placeholders fqdn, local_cert,
    local_id and connections; `connection` is one connection block (those plus c_<field> for the
    template's c.<field>)."""

    stack: model.Stack
    conf: str  # swanctl.conf or ipsec.conf
    secrets: str  # ipsec.secrets (stroke only)
    charon: str
    connection: str
    separator: str  # between connection blocks


_PLACEHOLDER = re.compile(r"\x00(\w+)\x00")  # NUL appears in no template and no validated value


def _placeholders(*names: str, prefix: str = "") -> dict[str, str]:
    return {name: f"\x00{prefix}{name}\x00" for name in names}


def _pattern(template: str, **context: object) -> str:
    """Render `template` with placeholders among its values -> a `%(name)s` pattern ('%' doubled).
    printf-style, because `pattern % values` is ~5x faster than str.format_map on these blocks."""
    text = _render(template, **context).replace("%", "%%")
    return _PLACEHOLDER.sub(r"%(\1)s", text)


@lru_cache(maxsize=64)
def _layout(stack: model.Stack, s: ResolvedSettings, enforce: bool) -> _Layout:
    ctx = {**_placeholders("fqdn", "local_cert", "local_id", "connections"), "profile": s.profile,
           "posture": posture(enforce), "ca_cert": CA_NAME, "key_type": s.key_type, "charon": s.charon}
    conn = _placeholders(*_CONN_FIELDS, prefix="c_")
    if stack is model.Stack.SWANCTL:
        settings = _swanctl_settings(s)
        return _Layout(stack=stack, conf=_pattern("swanctl.conf.j2", **ctx), secrets="",
                       charon=_pattern("charon.conf.j2", **ctx), separator="\n",
                       connection=_pattern("swanctl-connection.j2", **ctx, c=conn, s=settings))
    settings = _stroke_settings(s)
    return _Layout(stack=stack, conf=_pattern("ipsec.conf.j2", **ctx, s=settings),
                   secrets=_pattern("ipsec.secrets.j2", **ctx), charon=_pattern("charon.conf.j2", **ctx),
                   separator="", connection=_pattern("ipsec-connection.j2", **ctx, c=conn, s=settings))


def _files(flavour: model.OsFlavour, layout: _Layout, values: Mapping[str, str]) -> tuple[RenderedFile, ...]:
    charon = RenderedFile(path=f"{flavour.strongswan_conf_dir}/{CHARON_SNIPPET}",
                          content=layout.charon % values, mode=0o644)
    if layout.stack is model.Stack.SWANCTL:
        conf = layout.conf % values
        return (RenderedFile(path=f"{flavour.swanctl_dir}/{SWANCTL_CONF}", content=conf, mode=0o644), charon)
    return (RenderedFile(path=LEGACY_CONF, content=layout.conf % values, mode=0o644),
            RenderedFile(path=LEGACY_SECRETS, content=layout.secrets % values, mode=0o600), charon)


def _material(fleet: model.Fleet, host: model.Host, flavour: model.OsFlavour) -> tuple[MaterialCopy, ...]:
    src = fleet.ipsec.cert_source
    name = f"{host.certname}.pem"
    if flavour.stack is model.Stack.SWANCTL:
        base = flavour.swanctl_dir
        dirs = {"cert": "x509", "key": "private", "ca": "x509ca", "crl": "x509crl"}
    else:
        base = LEGACY_DIR
        dirs = {"cert": "certs", "key": "private", "ca": "cacerts", "crl": "crls"}
    copies = [
        MaterialCopy(kind="cert", source=src.cert_path(host.certname), dest=f"{base}/{dirs['cert']}/{name}",
                     mode=0o644),
        MaterialCopy(kind="key", source=src.key_path(host.certname), dest=f"{base}/{dirs['key']}/{name}",
                     mode=0o600),
        MaterialCopy(kind="ca", source=src.ca, dest=f"{base}/{dirs['ca']}/{CA_NAME}", mode=0o644),
    ]
    if src.crl:
        copies.append(MaterialCopy(kind="crl", source=src.crl, dest=f"{base}/{dirs['crl']}/{CRL_NAME}",
                                   mode=0o644))
    return tuple(copies)


@cache
def _environment() -> jinja2.Environment:
    # Not HTML: autoescaping would corrupt config files. Every interpolated value is validated first
    # (DNS names, IP addresses, proposal tokens, enumerated choices).
    return jinja2.Environment(
        loader=jinja2.PackageLoader("rollout", "templates"),
        undefined=jinja2.StrictUndefined, autoescape=False,  # noqa: S701
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
    )


def _render(template: str, **context: object) -> str:
    return _environment().get_template(template).render(**context)
