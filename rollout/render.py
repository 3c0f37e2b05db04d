"""Render one host's strongSwan configuration (pure: fleet + pairs in, file contents out).

swanctl-stack hosts get `/etc/swanctl/conf.d/ipsec-rollout.conf` plus a strongswan.d charon snippet;
stroke-stack hosts get a legacy `/etc/ipsec.conf` + `/etc/ipsec.secrets` plus the same snippet.
Rendered files never contain key material: the certificate, key and CA are copied ON THE HOST from
the paths configuration management already uses (`RenderedHost.material`, carried out by steps.py).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
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

    @property
    def sha256(self) -> str:
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
    views = tuple(_conn_view(fleet, c, settings, enforce) for c in conns)
    _check_unique_names(fqdn, conns)
    ctx = _context(fleet, host, settings, enforce)
    if flavour.stack is model.Stack.SWANCTL:
        files = _swanctl_files(flavour, ctx, views, settings)
    else:
        files = _stroke_files(flavour, ctx, views, settings)
    return RenderedHost(fqdn=fqdn, stack=flavour.stack, flavour=flavour, enforce=enforce, settings=settings,
                        connections=conns, files=files, material=_material(fleet, host, flavour))


def posture(enforce: bool) -> str:
    return "enforce (trap policies)" if enforce else "fail-open (start, cleartext while down)"


# ----------------------------------------------------------------------------------------------


def _host(fleet: model.Fleet, fqdn: str) -> model.Host:
    if fqdn not in fleet.hosts:
        raise errors.RenderError(f"unknown host {fqdn!r}", key="hosts")
    host = fleet.hosts[fqdn]
    if not _FQDN.match(fqdn):
        raise errors.RenderError(f"host name {fqdn!r} is not a plain DNS name", key=f"hosts.{fqdn}",
                                 hint="letters, digits, '-' and '.' only")
    return host


def _check_unique_names(fqdn: str, conns: tuple[model.Connection, ...]) -> None:
    seen: dict[str, str] = {}
    for c in conns:
        if seen.setdefault(c.name, c.peer) != c.peer:
            raise errors.RenderError(
                f"{fqdn}: peers {seen[c.name]} and {c.peer} would both get connection {c.name}",
                key=f"hosts.{fqdn}", hint="host short names must be unique among one host's peers")


def _conn_view(fleet: model.Fleet, conn: model.Connection, s: ResolvedSettings,
               enforce: bool) -> dict[str, str]:
    local, peer = _host(fleet, conn.local), _host(fleet, conn.peer)
    local_addr, remote_addr = local.address(conn.family), peer.address(conn.family)
    if local_addr is None or remote_addr is None:
        raise errors.RenderError(f"{conn.local} -> {conn.peer}: no {conn.family} address on both ends",
                                 key=f"hosts.{conn.local}")
    if enforce:
        start, auto = "trap", "route"
    else:
        start, auto = ("start", "start") if conn.initiator else ("none", "add")
    return {
        "name": conn.name, "family": conn.family,
        "local_addr": str(local_addr), "remote_addr": str(remote_addr),
        "local_id": f"CN={local.certname}", "remote_id": f"CN={peer.certname}",
        "start_action": start, "auto": auto,
        "dpd_action": s.dpd_action_for(conn.local, conn.peer, initiator=conn.initiator, enforce=enforce),
    }


def _context(fleet: model.Fleet, host: model.Host, s: ResolvedSettings, enforce: bool) -> dict[str, object]:
    return {"fqdn": host.fqdn, "profile": s.profile, "posture": posture(enforce),
            "local_cert": f"{host.certname}.pem", "local_id": f"CN={host.certname}", "ca_cert": CA_NAME,
            "key_type": s.key_type, "charon": s.charon}


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


def _swanctl_files(flavour: model.OsFlavour, ctx: dict[str, object], views: tuple[dict[str, str], ...],
                   s: ResolvedSettings) -> tuple[RenderedFile, ...]:
    conf = _render("swanctl.conf.j2", **ctx, conns=views, s=_swanctl_settings(s))
    return (
        RenderedFile(path=f"{flavour.swanctl_dir}/{SWANCTL_CONF}", content=conf, mode=0o644),
        RenderedFile(path=f"{flavour.strongswan_conf_dir}/{CHARON_SNIPPET}",
                     content=_render("charon.conf.j2", **ctx), mode=0o644),
    )


def _stroke_files(flavour: model.OsFlavour, ctx: dict[str, object], views: tuple[dict[str, str], ...],
                  s: ResolvedSettings) -> tuple[RenderedFile, ...]:
    stroke_views = [{**v, "dpd_action": _STROKE_ACTION[v["dpd_action"]]} for v in views]
    return (
        RenderedFile(path=LEGACY_CONF, mode=0o644,
                     content=_render("ipsec.conf.j2", **ctx, conns=stroke_views, s=_stroke_settings(s))),
        RenderedFile(path=LEGACY_SECRETS, mode=0o600, content=_render("ipsec.secrets.j2", **ctx)),
        RenderedFile(path=f"{flavour.strongswan_conf_dir}/{CHARON_SNIPPET}",
                     content=_render("charon.conf.j2", **ctx), mode=0o644),
    )


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
