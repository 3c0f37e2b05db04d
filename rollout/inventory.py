"""Load and validate the fleet inventory (`inventory/*.yaml`, merged) into a model.Fleet.

Every problem becomes one InputError subclass naming the file, the key and the fix, raised before
anything else happens. File reading is confined to `load_dir`/`read_yaml`; `build_fleet` is pure.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from rollout import model
from rollout.errors import (
    DuplicateError,
    InputError,
    InventorySchemaError,
    InventoryYamlError,
    NoAddressError,
    ReferenceError_,
)

# Names that reach remote shells, config files and file names: a conservative grammar keeps them inert.
FQDN_RE = r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+$"
NAME_RE = r"^[a-z0-9][a-z0-9_-]{0,62}$"
PATH_RE = r"^[A-Za-z0-9_./{}~@+-]+$"
NETNS_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,30}$"

Name = Annotated[str, StringConstraints(pattern=NAME_RE)]
Fqdn = Annotated[str, StringConstraints(pattern=FQDN_RE)]
SafePath = Annotated[str, StringConstraints(pattern=PATH_RE)]
SshHost = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9.:-]{0,252}$")]
Scalar = str | int | float | bool

SECTIONS = ("sites", "clusters", "ssh", "ipsec", "hosts", "pairing")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteIn(_Strict):
    tier: Literal["core", "edge"]
    description: str = ""


class ClusterIn(_Strict):
    description: str = ""


class SshIn(_Strict):
    user: Name | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    identity: SafePath | None = None
    known_hosts: SafePath | None = None
    proxy_jump: SshHost | None = None
    netns: Annotated[str, StringConstraints(pattern=NETNS_RE)] | None = None
    connect_timeout: float | None = Field(default=None, gt=0, le=600)
    command_timeout: float | None = Field(default=None, gt=0, le=7200)
    use_ssh_config: bool | None = None


class CertSourceIn(_Strict):
    cert: SafePath = model.CertSource.cert
    key: SafePath = model.CertSource.key
    ca: SafePath = model.CertSource.ca
    crl: SafePath | None = None


class IpsecIn(_Strict):
    profile: Literal["modern", "wmf-2015"] = "modern"
    enforce: bool = False
    overrides: dict[Name, Scalar] = Field(default_factory=dict)
    charon: dict[Name, Scalar] = Field(default_factory=dict)
    cert_source: CertSourceIn = Field(default_factory=CertSourceIn)


class HostIn(_Strict):
    site: Name
    cluster: Name
    os: Name = "debian-bookworm"
    ipv4: ipaddress.IPv4Address | None = None
    ipv6: ipaddress.IPv6Address | None = None
    ssh_host: SshHost | None = None
    ssh: SshIn | None = None


class SelectorIn(_Strict):
    sites: list[Name] = Field(default_factory=list)
    tiers: list[Literal["core", "edge"]] = Field(default_factory=list)
    clusters: list[Name] = Field(default_factory=list)
    hosts: list[Annotated[str, StringConstraints(pattern=r"^[a-z0-9.*?\[\]-]+$")]] = Field(
        default_factory=list)


class RuleIn(_Strict):
    name: Name
    a: SelectorIn
    b: SelectorIn
    same_cluster: bool = True
    allow_same_site: bool = False


_SECTION_MODELS: dict[str, type[_Strict]] = {
    "sites": SiteIn, "clusters": ClusterIn, "hosts": HostIn, "ssh": SshIn, "ipsec": IpsecIn,
    "pairing": RuleIn,
}


@dataclass(frozen=True)
class Located:
    """A validated item and the file it came from (for messages)."""

    file: str
    key: str
    value: Any


# --- YAML reading (the only I/O) ------------------------------------------------------------------


# libyaml's parser is ~7x faster than PyYAML's pure-Python one (5,000 hosts: 0.8 s instead of 5 s).
# It composes nested nodes by C recursion, which crashes the process (SIGSEGV) on ~50,000 levels of
# nesting, so `read_yaml` bounds the depth with a flat scan of the event stream before composing.
_SafeBase: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # without libyaml: slow


class _UniqueKeyLoader(_SafeBase):  # type: ignore[valid-type,misc]
    """PyYAML silently keeps the last of two equal keys; a duplicate host must be an error instead."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key].start_mark.line + 1})",
                key_node.start_mark)
        seen[key] = key_node
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


MAX_YAML_BYTES = 8 * 1024 * 1024  # a 5,000-host inventory is under 1 MiB; parsing is ~1 s/MiB
MAX_YAML_DEPTH = 64  # an inventory is at most ~6 levels deep


def _too_deep(text: str) -> bool:
    """True when collections nest deeper than MAX_YAML_DEPTH (a flat pass over the parser's events)."""
    depth = 0
    for event in yaml.parse(text, Loader=_SafeBase):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                return True
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return False


def read_yaml(path: Path) -> Any:
    """Parse one YAML file; errors name the file and line."""
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise InventoryYamlError(f"file too large ({size} bytes, limit {MAX_YAML_BYTES})", file=str(path),
                                     hint="an inventory file is a few hundred KiB; is this the right file?")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InventoryYamlError(f"cannot read file: {exc}", file=str(path),
                                 hint="check the path and permissions") from None
    try:
        if _too_deep(text):
            raise RecursionError
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - (C)SafeLoader subclass
    except RecursionError:  # from the depth check, or from the constructor's recursion
        raise InventoryYamlError("nesting too deep", file=str(path),
                                 hint="inventory YAML is at most a few levels deep") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        error_cls = DuplicateError if "duplicate key" in str(problem) else InventoryYamlError
        raise error_cls(f"{line}{problem}", file=str(path),
                        hint="fix the YAML syntax (indentation, quoting, ':' after keys)") from None
    except yaml.YAMLError as exc:
        raise InventoryYamlError(f"invalid YAML: {exc}", file=str(path)) from None


def load_dir(path: Path) -> model.Fleet:
    """Read every `*.yaml`/`*.yml` in `path` (sorted), merge and validate them."""
    if not path.is_dir():
        raise InventoryYamlError("inventory directory not found", file=str(path),
                                 hint="pass --inventory DIR pointing at a directory of *.yaml files")
    files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
    if not files:
        raise InventoryYamlError("no *.yaml files in the inventory directory", file=str(path),
                                 hint="add at least sites, clusters and hosts")
    return build_fleet([(str(f), read_yaml(f)) for f in files])


# --- validation (pure) ----------------------------------------------------------------------------


def build_fleet(documents: Iterable[tuple[str, Any]]) -> model.Fleet:
    """Validate parsed documents (file name, data) and build the fleet."""
    docs = list(documents)
    merged = _merge_sections(docs)
    sites = {k.key: _site(k) for k in merged["sites"]}
    clusters = {k.key: model.Cluster(name=k.key, description=k.value.description) for k in merged["clusters"]}
    ssh = _fleet_ssh(merged["ssh"])
    hosts = {h.key: _host(h, ssh) for h in merged["hosts"]}
    rules = tuple(_rule(r) for r in merged["pairing"])
    _check_references(merged, sites, clusters)
    _check_addresses(merged["hosts"])
    return model.Fleet(
        sites=dict(sorted(sites.items())), clusters=dict(sorted(clusters.items())),
        hosts=dict(sorted(hosts.items())), rules=rules, ipsec=_ipsec(merged["ipsec"]), ssh=ssh,
        sources=tuple(name for name, _ in docs),
    )


def _merge_sections(docs: list[tuple[str, Any]]) -> dict[str, list[Located]]:
    merged: dict[str, list[Located]] = {s: [] for s in SECTIONS}
    for file, data in docs:
        if data is None:
            continue
        if not isinstance(data, Mapping):
            raise InventorySchemaError("the top level must be a mapping of sections", file=file,
                                       hint=f"use some of: {', '.join(SECTIONS)}")
        for section, body in data.items():
            if section not in SECTIONS:
                raise InventorySchemaError(f"unknown section {section!r}", file=file, key=str(section),
                                           hint=_did_you_mean(str(section), SECTIONS))
            merged[section].extend(_section_items(file, section, body))
    _reject_duplicates(merged)
    return merged


def _section_items(file: str, section: str, body: Any) -> list[Located]:
    schema = _SECTION_MODELS[section]
    if section in ("ssh", "ipsec"):
        return [Located(file, section, _validate(schema, body or {}, file, section))]
    if section == "pairing":
        if not isinstance(body, list):
            raise InventorySchemaError("must be a list of rules", file=file, key=section,
                                       hint="write each rule as '- name: ...'")
        return [Located(file, f"pairing[{i}]", _validate(schema, r, file, f"pairing[{i}]"))
                for i, r in enumerate(body)]
    if not isinstance(body, Mapping):
        raise InventorySchemaError("must be a mapping of name: settings", file=file, key=section)
    return [Located(file, str(name), _validate(schema, item or {}, file, f"{section}.{name}"))
            for name, item in body.items()]


def _validate(schema: type[_Strict], data: Any, file: str, where: str) -> Any:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise _schema_error(exc, schema, file, where) from None


def _schema_error(exc: ValidationError, schema: type[_Strict], file: str, where: str) -> InputError:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    key = f"{where}.{loc}" if loc else where
    if err["type"] == "extra_forbidden":
        field = str(err["loc"][-1])
        valid = _fields_at(schema, err["loc"][:-1])
        return InventorySchemaError(f"unknown key {field!r}", file=file, key=key,
                                    hint=_did_you_mean(field, valid))
    if err["type"] == "string_pattern_mismatch":
        return InventorySchemaError(f"invalid value {err.get('input')!r}", file=file, key=key,
                                    hint="use lower-case letters, digits, '-', '_' and '.' only "
                                         "(names reach shells and config files)")
    if err["type"] == "missing":
        return InventorySchemaError("required key is missing", file=file, key=key,
                                    hint=f"add '{err['loc'][-1]}:'")
    return InventorySchemaError(f"{err['msg']} (got {err.get('input')!r})", file=file, key=key,
                                hint=_type_hint(err["type"]))


def _type_hint(error_type: str) -> str | None:
    if error_type.startswith("ip_v4"):
        return "write an IPv4 address like 192.0.2.10"
    if error_type.startswith("ip_v6"):
        return "write an IPv6 address like 2001:db8::10"
    return None


def _fields_at(schema: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    current: Any = schema
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return list(getattr(current, "model_fields", {}))
        current = field.annotation
        for arg in getattr(current, "__args__", ()):  # Optional[Model]
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                current = arg
    return list(getattr(current, "model_fields", {}))


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    close = difflib.get_close_matches(word, choices, n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"valid keys: {', '.join(sorted(choices))}"


def _reject_duplicates(merged: dict[str, list[Located]]) -> None:
    for section in ("sites", "clusters", "hosts", "pairing"):
        seen: dict[str, str] = {}
        for item in merged[section]:
            name = item.value.name if section == "pairing" else item.key
            if name in seen:
                raise DuplicateError(f"duplicate {section[:-1] if section != 'pairing' else 'rule'} "
                                     f"{name!r} (also defined in {seen[name]})", file=item.file,
                                     key=f"{section}.{name}", hint="keep one definition and delete the other")
            seen[name] = item.file
    for section in ("ssh", "ipsec"):
        if len(merged[section]) > 1:
            first, second = merged[section][:2]
            raise DuplicateError(f"section {section!r} is defined twice (also in {first.file})",
                                 file=second.file, key=section, hint="merge them into one file")
    for host in merged["hosts"]:
        if not re.match(FQDN_RE, host.key):
            raise InventorySchemaError(f"host name {host.key!r} is not a lower-case FQDN", file=host.file,
                                       key=f"hosts.{host.key}",
                                       hint="use the fully qualified name, e.g. cp1065.eqiad.example.net")


def _site(item: Located) -> model.Site:
    _check_name(item, "sites")
    return model.Site(name=item.key, tier=model.Tier(item.value.tier))


def _check_name(item: Located, section: str) -> None:
    if not re.match(NAME_RE, item.key):
        raise InventorySchemaError(f"invalid name {item.key!r}", file=item.file, key=f"{section}.{item.key}",
                                   hint="use lower-case letters, digits, '-' and '_'")


def _ssh_settings(base: model.SshSettings, data: SshIn | None) -> model.SshSettings:
    if data is None:
        return base
    return base.merged(**data.model_dump())


def _fleet_ssh(items: list[Located]) -> model.SshSettings:
    return _ssh_settings(model.SshSettings(), items[0].value if items else None)


def _ipsec(items: list[Located]) -> model.IpsecSettings:
    data: IpsecIn = items[0].value if items else IpsecIn()
    src = data.cert_source
    return model.IpsecSettings(
        profile=data.profile, enforce=data.enforce,
        overrides=tuple(sorted(data.overrides.items())),
        charon_overrides=tuple(sorted(data.charon.items())),
        cert_source=model.CertSource(cert=src.cert, key=src.key, ca=src.ca, crl=src.crl),
    )


def _host(item: Located, fleet_ssh: model.SshSettings) -> model.Host:
    data: HostIn = item.value
    if data.ipv4 is None and data.ipv6 is None:
        raise NoAddressError("host has no address", file=item.file, key=f"hosts.{item.key}",
                             hint="add 'ipv4:' and/or 'ipv6:'")
    return model.Host(
        fqdn=item.key, site=data.site, cluster=data.cluster, os=data.os, ipv4=data.ipv4, ipv6=data.ipv6,
        ssh=_ssh_settings(fleet_ssh, data.ssh), ssh_host=data.ssh_host,
    )


def _rule(item: Located) -> model.PairingRule:
    data: RuleIn = item.value
    return model.PairingRule(name=data.name, a=_selector(data.a), b=_selector(data.b),
                             same_cluster=data.same_cluster, allow_same_site=data.allow_same_site,
                             source=item.file)


def _selector(data: SelectorIn) -> model.Selector:
    return model.Selector(sites=tuple(data.sites), tiers=tuple(model.Tier(t) for t in data.tiers),
                          clusters=tuple(data.clusters), hosts=tuple(data.hosts))


def _check_references(merged: dict[str, list[Located]], sites: Mapping[str, model.Site],
                      clusters: Mapping[str, model.Cluster]) -> None:
    for h in merged["hosts"]:
        key = f"hosts.{h.key}"
        _ref(h.value.site, sites, "site", h.file, f"{key}.site", "sites")
        _ref(h.value.cluster, clusters, "cluster", h.file, f"{key}.cluster", "clusters")
        _ref(h.value.os, model.OS_FLAVOURS, "OS flavour", h.file, f"{key}.os", None)
    for r in merged["pairing"]:
        for side in ("a", "b"):
            sel: SelectorIn = getattr(r.value, side)
            for s in sel.sites:
                _ref(s, sites, "site", r.file, f"{r.key} ({r.value.name}).{side}.sites", "sites")
            for c in sel.clusters:
                _ref(c, clusters, "cluster", r.file, f"{r.key} ({r.value.name}).{side}.clusters", "clusters")


def _ref(name: str, known: Mapping[str, Any], what: str, file: str, key: str, section: str | None) -> None:
    if name in known:
        return
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(sorted(known)) or 'none'}"
    if section:
        hint += f" (or define it under '{section}:')"
    raise ReferenceError_(f"unknown {what} {name!r}", file=file, key=key, hint=hint)


def _check_addresses(hosts: list[Located]) -> None:
    owner: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str] = {}  # equal exactly when str() is
    for h in hosts:
        for family in ("ipv4", "ipv6"):
            addr = getattr(h.value, family)
            if addr is None:
                continue
            if addr in owner:
                raise DuplicateError(f"address {addr} is also used by {owner[addr]}", file=h.file,
                                     key=f"hosts.{h.key}.{family}",
                                     hint="every host needs its own addresses")
            owner[addr] = h.key
