"""Keys, certificates and per-host files the guests read at boot (from <state>/hosts/<short>/)."""

from __future__ import annotations

import shlex
from importlib import resources
from pathlib import Path

from rollout.lab.paths import LabPaths
from rollout.lab.proc import run
from rollout.lab.spec import HostSpec, LabSpec

GUEST_SCRIPTS = ("svc", "run-charon", "run-sshd", "labd")


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)


def install_guest_scripts(paths: LabPaths) -> None:
    """Copy init.sh and the guest's supervisor scripts into the state dir (what guests boot from)."""
    package = resources.files("rollout.lab")
    _write(paths.init_script, package.joinpath("init.sh").read_text(), 0o755)
    for name in GUEST_SCRIPTS:
        _write(paths.guest_dir / f"{name}.sh", package.joinpath(f"{name}.sh").read_text(), 0o755)


def ensure_client_key(paths: LabPaths) -> None:
    """The lab's SSH client key (0600), authorised on every lab host."""
    if not paths.identity.exists():
        _ssh_keygen(paths.identity, "ipsec-rollout-lab-client")
    paths.identity.chmod(0o600)


def _ssh_keygen(path: Path, comment: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, path.with_name(path.name + ".pub")):
        stale.unlink(missing_ok=True)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


def _pki(args: list[str], out: Path, mode: int = 0o644) -> None:
    pem = run(["pki", *args, "--outform", "pem"]).stdout
    _write(out, pem, mode)


def ensure_ca(paths: LabPaths) -> None:
    """A throwaway CA (ECDSA P-256) that signs every lab host's certificate."""
    key, cert = paths.ca_dir / "ca.key", paths.ca_dir / "ca.pem"
    if key.exists() and cert.exists():
        return
    paths.ca_dir.mkdir(parents=True, exist_ok=True)
    paths.ca_dir.chmod(0o700)
    _pki(["--gen", "--type", "ecdsa", "--size", "256"], key, 0o600)
    _pki(["--self", "--ca", "--lifetime", "3650", "--in", str(key), "--type", "ecdsa",
          "--dn", "C=XX, O=ipsec-rollout lab, CN=ipsec-rollout lab CA"], cert)


def ensure_host_material(paths: LabPaths, spec: LabSpec, host: HostSpec) -> None:
    """SSH host key, certificate and key (where Puppet keeps them), boot settings for one host."""
    hdir = paths.host_dir(host.short)
    for sub in ("puppet", "ctl", "faults"):
        (hdir / sub).mkdir(parents=True, exist_ok=True)
    hostkey = hdir / "ssh_host_ed25519_key"
    if not hostkey.exists():
        _ssh_keygen(hostkey, host.fqdn)
    _ensure_cert(paths, host)
    _write(hdir / "authorized_keys", paths.identity.with_name("id_ed25519.pub").read_text(), 0o600)
    _write(hdir / "host.env", host_env(spec, host))
    _write(hdir / "hosts", etc_hosts(spec))


def _ensure_cert(paths: LabPaths, host: HostSpec) -> None:
    """Key and certificate (CN=<fqdn>, SANs: fqdn and addresses); reissued if the host's identity changed."""
    pdir = paths.host_dir(host.short) / "puppet"
    key, cert, issued_for = pdir / "key.pem", pdir / "cert.pem", pdir / "issued-for"
    identity = f"{host.fqdn} {host.ipv4} {host.ipv6}\n"
    if not key.exists():
        _pki(["--gen", "--type", "ecdsa", "--size", "256"], key, 0o600)
        cert.unlink(missing_ok=True)
    if not cert.exists() or not issued_for.exists() or issued_for.read_text() != identity:
        _pki(["--issue", "--lifetime", "730", "--in", str(key), "--type", "ecdsa",
              "--cacert", str(paths.ca_dir / "ca.pem"), "--cakey", str(paths.ca_dir / "ca.key"),
              "--dn", f"CN={host.fqdn}", "--san", host.fqdn,
              "--san", str(host.ipv4), "--san", str(host.ipv6),
              "--flag", "serverAuth", "--flag", "clientAuth"], cert)
        _write(issued_for, identity)
    _write(pdir / "ca.pem", (paths.ca_dir / "ca.pem").read_text())


def host_env(spec: LabSpec, host: HostSpec) -> str:
    """Shell assignments sourced by the guest's init script."""
    values = {
        "LAB_SHORT": host.short, "LAB_FQDN": host.fqdn, "LAB_SITE": host.site,
        "LAB_IPV4": str(host.ipv4), "LAB_IPV6": str(host.ipv6),
        "LAB_PREFIX4": str(spec.prefix4), "LAB_PREFIX6": str(spec.prefix6),
    }
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items())


def etc_hosts(spec: LabSpec) -> str:
    """/etc/hosts for every guest: lab names resolve without DNS."""
    lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
    for h in spec.hosts:
        lines.append(f"{h.ipv4} {h.fqdn} {h.short}")
        lines.append(f"{h.ipv6} {h.fqdn} {h.short}")
    return "\n".join(lines) + "\n"


def write_known_hosts(paths: LabPaths, spec: LabSpec) -> None:
    """Each host's key under its IPv4, IPv6 and FQDN (the inventory SSHes to the IPv4)."""
    lines = []
    for h in spec.hosts:
        pub = (paths.host_dir(h.short) / "ssh_host_ed25519_key.pub").read_text().split()
        lines.append(f"{h.ipv4},{h.ipv6},{h.fqdn} {pub[0]} {pub[1]}")
    _write(paths.known_hosts, "\n".join(lines) + "\n")


def prepare_state_dir(paths: LabPaths, spec: LabSpec) -> None:
    """Everything the guests need, created once and reused on later `up`s."""
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.root.chmod(0o700)  # CA key and the lab's client key live here (guests read it as root)
    for sub in (paths.uml_dir, paths.control_dir, paths.inventory_dir):
        sub.mkdir(parents=True, exist_ok=True)
    paths.control_dir.chmod(0o700)
    install_guest_scripts(paths)
    ensure_client_key(paths)
    ensure_ca(paths)
    for host in spec.hosts:
        ensure_host_material(paths, spec, host)
    write_known_hosts(paths, spec)
