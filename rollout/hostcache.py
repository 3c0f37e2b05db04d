"""The last-known host list: every apply saves it, `ipsec-kill` falls back to it.

The kill switch must work when the inventory is broken (a bad merge, a half-edited file, a missing
checkout). So every successful inventory load by `apply` calls `save_hosts(fleet)`, and `ipsec-kill`
reads `load_hosts()` when the inventory cannot be read. The cache is JSON (no YAML/pydantic needed to
read it), written atomically (temp file + rename), one per control host:

* `/var/lib/ipsec-rollout/hosts.json` when that directory is writable (root on a control host),
* else `~/.cache/ipsec-rollout/hosts.json`;
* `$IPSEC_ROLLOUT_HOST_CACHE` overrides both (tests, odd setups).

Also reads the plain `--hosts-file` format: one host per line, `fqdn [key=value ...]`, keys
site, cluster, os, ssh_host, and any `SshSettings` field (port, user, identity, known_hosts, netns,
proxy_jump, connect_timeout, command_timeout, use_ssh_config); `#` starts a comment.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rollout import errors
from rollout.model import Fleet, Host, SshSettings

CACHE_VERSION = 1
SYSTEM_CACHE = Path("/var/lib/ipsec-rollout/hosts.json")
USER_CACHE = Path("~/.cache/ipsec-rollout/hosts.json")
ENV_OVERRIDE = "IPSEC_ROLLOUT_HOST_CACHE"
_SSH_FIELDS = {f.name: f.type for f in dataclasses.fields(SshSettings)}
_HOST_KEYS = {"site", "cluster", "os", "ssh_host"}


@dataclass(frozen=True, kw_only=True)
class CachedHosts:
    """Hosts read back from a cache or hosts file, and where/when they came from."""

    hosts: tuple[Host, ...]
    path: Path
    saved_at: str = ""
    sources: tuple[str, ...] = ()


def default_cache_path() -> Path:
    """Where `save_hosts`/`load_hosts` read and write by default (see the module docstring)."""
    override = os.environ.get(ENV_OVERRIDE)
    if override:
        return Path(override).expanduser()
    system_dir = SYSTEM_CACHE.parent
    if os.access(system_dir, os.W_OK) or (not system_dir.exists() and os.access(system_dir.parent, os.W_OK)):
        return SYSTEM_CACHE
    return USER_CACHE.expanduser()


def save_hosts(fleet: Fleet, path: Path | None = None) -> Path:
    """Atomically write every host of `fleet` (with its resolved SSH settings); returns the path."""
    target = path or default_cache_path()
    document = {
        "version": CACHE_VERSION,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sources": list(fleet.sources),
        "hosts": [host_to_dict(h) for h in fleet.hosts.values()],
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".hosts.", suffix=".json", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(document, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_hosts(path: Path | None = None) -> CachedHosts:
    """Read the cache; raises errors.InputError (with a hint) when it is missing or unreadable."""
    source = path or default_cache_path()
    try:
        document = json.loads(source.read_text(encoding="utf-8"))
        hosts = tuple(host_from_dict(item) for item in document["hosts"])
    except FileNotFoundError as exc:
        raise errors.InputError("no cached host list", file=str(source),
                                hint="pass --inventory DIR or --hosts-file FILE") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise errors.InputError(f"unreadable cached host list: {exc}", file=str(source),
                                hint="pass --hosts-file FILE") from exc
    return CachedHosts(hosts=hosts, path=source, saved_at=str(document.get("saved_at", "")),
                       sources=tuple(document.get("sources", ())))


def host_to_dict(host: Host) -> dict[str, Any]:
    return {
        "fqdn": host.fqdn, "site": host.site, "cluster": host.cluster, "os": host.os,
        "ipv4": str(host.ipv4) if host.ipv4 else None, "ipv6": str(host.ipv6) if host.ipv6 else None,
        "ssh_host": host.ssh_host, "ssh": dataclasses.asdict(host.ssh),
    }


def host_from_dict(item: dict[str, Any]) -> Host:
    ssh = {k: v for k, v in dict(item.get("ssh") or {}).items() if k in _SSH_FIELDS}
    return Host(
        fqdn=str(item["fqdn"]), site=str(item.get("site", "")), cluster=str(item.get("cluster", "")),
        os=str(item.get("os", "")),
        ipv4=ipaddress.IPv4Address(item["ipv4"]) if item.get("ipv4") else None,
        ipv6=ipaddress.IPv6Address(item["ipv6"]) if item.get("ipv6") else None,
        ssh_host=item.get("ssh_host"), ssh=SshSettings(**ssh),
    )


def read_hosts_file(path: Path, defaults: SshSettings | None = None) -> CachedHosts:
    """`--hosts-file`: the JSON cache format, or plain lines `fqdn [key=value ...]`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise errors.InputError(f"cannot read hosts file: {exc}", file=str(path)) from exc
    if text.lstrip().startswith("{"):
        return load_hosts(path)
    hosts = tuple(_parse_line(line, n, path, defaults or SshSettings())
                  for n, line in _numbered(text.splitlines()))
    return CachedHosts(hosts=hosts, path=path)


def _numbered(lines: Iterable[str]) -> Iterable[tuple[int, str]]:
    for n, line in enumerate(lines, 1):
        stripped = line.split("#", 1)[0].strip()
        if stripped:
            yield n, stripped


def _parse_line(line: str, number: int, path: Path, defaults: SshSettings) -> Host:
    fqdn, *pairs = line.split()
    host_values: dict[str, str] = {}
    ssh_values: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or (key not in _HOST_KEYS and key not in _SSH_FIELDS):
            raise errors.InputError(f"line {number}: expected key=value with a known key, got {pair!r}",
                                    file=str(path))
        if key in _HOST_KEYS:
            host_values[key] = value
        else:
            ssh_values[key] = _convert(key, value, number, path)
    return Host(fqdn=fqdn, site=host_values.get("site", ""), cluster=host_values.get("cluster", ""),
                os=host_values.get("os", ""), ssh_host=host_values.get("ssh_host"),
                ssh=dataclasses.replace(defaults, **ssh_values))  # type: ignore[arg-type]


def _convert(key: str, value: str, number: int, path: Path) -> object:
    kind = str(_SSH_FIELDS[key])
    try:
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "bool":
            return value.lower() in {"1", "yes", "true", "on"}
    except ValueError as exc:
        raise errors.InputError(f"line {number}: {key}={value!r} is not a {kind}", file=str(path)) from exc
    return value
