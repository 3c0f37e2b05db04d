"""The exact remote shell commands for one host's apply / rollback / teardown (pure).

Every step is a complete POSIX-shell string; every interpolated value goes through `shlex.quote`
(flavour commands are constants and are used as they are). Steps print machine-readable lines
starting with `@@` that the parsers here (and the executor) understand. The private key is only
ever handled by commands running on the host: it is copied there, compared there, and nothing
derived from it but a yes/no leaves the host.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from rollout import errors, model, profiles, render
from rollout.render import RenderedFile, RenderedHost

LATCH = "/etc/ipsec-rollout/latched"
SNAPSHOT_ROOT = "/var/lib/ipsec-rollout/snapshot"
DEFAULT_TIMEOUT = 60.0
CHARON_WAIT = 20  # seconds to wait for vici / stroke after starting the service
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_LOAD_ERRORS = "config discarded|invalid value|loading .* failed|parsing .* failed"


@dataclass(frozen=True)
class Step:
    """One remote command. `mutating=False` steps are safe in dry-run and preflight."""

    name: str
    command: str
    stdin: str | None = None
    mutating: bool = True
    timeout: float = DEFAULT_TIMEOUT


def q(value: object) -> str:
    return _quote(str(value))


# Planning quotes ~200 values per host, most of them the same paths and connection names again.
@lru_cache(maxsize=1 << 15)
def _quote(text: str) -> str:
    return shlex.quote(text)


def _lines(*parts: str) -> str:
    return "\n".join(p for p in parts if p)


# Most commands differ from host to host only by the host's certname (in certificate paths) or a
# file digest. They are built once with a stand-in for that value, cached, and the value is
# written in: planning 5,000 hosts built the same scripts 5,000 times.
_STAND_IN = "ipsec-rollout-stand-in-for-a-host-value"
_PLAIN = re.compile(r"^[A-Za-z0-9._-]+$")  # shlex-safe: quoted exactly like the stand-in; no '/'


def _for_host(build: Callable[..., str], value: str, *args: Any) -> str:
    """`build(*args)` (a cached builder) where the args mention one per-host `value`. Exact: the
    builders only concatenate, shlex-quote and split on '/', which commute with putting a plain
    value in place of the plain stand-in."""
    shaped = _shaped(args, value) if _PLAIN.match(value) else None
    if shaped is None:
        return build(*args)
    return build(*shaped).replace(_STAND_IN, value)


def _shaped(args: tuple[Any, ...], value: str) -> tuple[Any, ...] | None:
    """`args` with `value` replaced by the stand-in in every string (None if one has the stand-in)."""
    out: list[Any] = []
    for arg in args:
        if isinstance(arg, tuple):
            arg = _shaped(arg, value)
        elif type(arg) is str:  # not a str enum such as model.Stack
            arg = None if _STAND_IN in arg else arg.replace(value, _STAND_IN)
        if arg is None:
            return None
        out.append(arg)
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# Preflight
# ----------------------------------------------------------------------------------------------


def preflight_steps(fleet: model.Fleet, host: model.Host, *, horizon: int = 86400) -> tuple[Step, ...]:
    """Read-only checks; prints `@@pf <key> <value>` lines ending with `@@pf end`."""
    flavour = fleet.flavour(host)
    src = fleet.ipsec.cert_source
    cert, key, ca = src.cert_path(host.certname), src.key_path(host.certname), src.ca
    key_type = profiles.resolve(fleet.ipsec).key_type
    script = _for_host(_preflight_script, host.certname, flavour.stack, flavour.is_active, cert, key, ca,
                       key_type, int(horizon))
    return (Step("preflight", script, mutating=False, timeout=30.0),)


@lru_cache(maxsize=256)
def _preflight_script(stack: model.Stack, is_active: str, cert: str, key: str, ca: str, key_type: str,
                      horizon: int) -> str:
    swanctl = stack is model.Stack.SWANCTL
    return _lines(
        "echo '@@pf begin'",
        f"echo {q('@@pf stack ' + stack.value)}",
        f"echo {q('@@pf expect_key_type ' + key_type)}",
        _yes_no("swanctl", "command -v swanctl"),
        _yes_no("ipsec", "command -v ipsec"),
        "v=$(swanctl --version 2>/dev/null | head -n 1)" if swanctl
        else "v=$(ipsec --version 2>/dev/null | head -n 1)",
        'echo "@@pf version ${v:-unknown}"',
        _yes_no("charon", "swanctl --stats" if swanctl else "ipsec status"),
        _yes_no("service", is_active),
        _yes_no("cert_present", f"test -r {q(cert)}"),
        _yes_no("key_present", f"test -r {q(key)}"),
        _yes_no("ca_present", f"test -r {q(ca)}"),
        _yes_no("cert_valid", f"openssl x509 -in {q(cert)} -noout -checkend {horizon}"),
        _yes_no("ca_valid", f"openssl x509 -in {q(ca)} -noout -checkend {horizon}"),
        f"nb=$(openssl x509 -in {q(cert)} -noout -startdate 2>/dev/null | cut -d= -f2)",
        'nbs=$(date -u -d "$nb" +%s 2>/dev/null)',
        'echo "@@pf cert_not_before ${nbs:-unknown}"',
        _yes_no("cert_chain", f"openssl verify -CAfile {q(ca)} {q(cert)}"),
        f"a=$(openssl x509 -in {q(cert)} -noout -pubkey 2>/dev/null)",
        f"b=$(openssl pkey -in {q(key)} -pubout 2>/dev/null)",
        _yes_no("key_matches", '[ -n "$a" ] && [ "$a" = "$b" ]'),
        f"kt=$(openssl x509 -in {q(cert)} -noout -text 2>/dev/null"
        " | sed -n 's/^ *Public Key Algorithm: *//p' | head -n 1)",
        'echo "@@pf cert_key_type ${kt:-unknown}"',
        'echo "@@pf now $(date -u +%s)"',
        "s=$(timedatectl show -p NTPSynchronized --value 2>/dev/null)",
        'echo "@@pf clock_synced ${s:-unknown}"',
        _yes_no("latched", f"test -e {q(LATCH)}"),
        "echo '@@pf end'",
    )


def _yes_no(key: str, test: str) -> str:
    return f"if {test} >/dev/null 2>&1; then echo '@@pf {key} yes'; else echo '@@pf {key} no'; fi"


@dataclass(frozen=True, kw_only=True)
class PreflightResult:
    values: tuple[tuple[str, str], ...]
    problems: tuple[str, ...]  # any problem refuses the host
    warnings: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def get(self, key: str, default: str = "") -> str:
        return dict(self.values).get(key, default)

    @property
    def latched(self) -> bool:
        return self.get("latched") == "yes"

    @property
    def charon_running(self) -> bool:
        return self.get("charon") == "yes"

    @property
    def remote_epoch(self) -> int | None:
        now = self.get("now")
        return int(now) if now.isdigit() else None


_PRESENCE = {"cert_present": "certificate", "key_present": "private key", "ca_present": "CA certificate"}
_MUST_BE_YES = {
    "cert_valid": "certificate expires within the gate horizon (or is unreadable)",
    "ca_valid": "CA certificate expires within the gate horizon (or is unreadable)",
    "cert_chain": "certificate does not verify against the CA (openssl verify)",
    "key_matches": "private key does not match the certificate",
}
_KEY_TYPES = {"RSA": "rsaEncryption", "ECDSA": "id-ecPublicKey"}


def parse_preflight(stdout: str) -> PreflightResult:
    """Judge the output of `preflight_steps` (pure)."""
    values: dict[str, str] = {}
    for line in stdout.splitlines():
        if line.startswith("@@pf "):
            key, _, value = line[5:].partition(" ")
            values[key] = value.strip()
    problems, warnings = _judge(values)
    return PreflightResult(values=tuple(values.items()), problems=tuple(problems), warnings=tuple(warnings))


def _judge(v: dict[str, str]) -> tuple[list[str], list[str]]:
    problems: list[str] = []
    warnings: list[str] = []
    if "end" not in v or "begin" not in v:
        problems.append("preflight output incomplete (command cut short?)")
    if v.get("latched") == "yes":
        problems.append(f"host is latched off by ipsec-kill ({LATCH}); clear the latch first")
    stack = v.get("stack", "swanctl")
    if v.get(stack) == "no":
        problems.append(f"{stack} is not installed (the OS flavour expects the {stack} stack)")
    problems += [f"{what} missing or unreadable" for key, what in _PRESENCE.items() if v.get(key) == "no"]
    problems += [why for key, why in _MUST_BE_YES.items() if v.get(key) == "no"]
    _judge_time(v, problems, warnings)
    expected = _KEY_TYPES.get(v.get("expect_key_type", ""))
    if stack == "stroke" and expected and v.get("cert_key_type", "unknown") not in (expected, "unknown"):
        problems.append(f"key type is {v['cert_key_type']} but ipsec.secrets will say "
                        f"{v['expect_key_type']}: set ipsec.overrides.key_type")
    if v.get("charon") == "no":
        warnings.append("charon is not running/reachable; the load step starts it")
    return problems, warnings


def _judge_time(v: dict[str, str], problems: list[str], warnings: list[str]) -> None:
    synced = v.get("clock_synced", "unknown")
    if synced == "no":
        problems.append("clock not synchronised (timedatectl NTPSynchronized=no)")
    elif synced != "yes":
        warnings.append("clock synchronisation unknown (no timedatectl)")
    now, not_before = v.get("now", ""), v.get("cert_not_before", "")
    if now.isdigit() and not_before.isdigit() and int(not_before) > int(now):
        problems.append("certificate is not valid yet (notBefore in the future: clock skew?)")


# ----------------------------------------------------------------------------------------------
# Snapshot / restore
# ----------------------------------------------------------------------------------------------


def snapshot_dir(run_id: str) -> str:
    if not _RUN_ID.match(run_id):
        raise errors.InputError(f"invalid run id {run_id!r}", hint="letters, digits, '.', '_' and '-' only")
    return f"{SNAPSHOT_ROOT}/{run_id}"


def snapshot_steps(rendered: RenderedHost, run_id: str) -> tuple[Step, ...]:
    """Copy the managed files as they are now; record which existed. Never overwrites a snapshot
    (so a resumed run keeps the state from before its first change)."""
    # certname == fqdn: the certificate and key paths are the only per-host managed paths
    script = _for_host(_snapshot_script, rendered.fqdn, snapshot_dir(run_id), rendered.managed_paths)
    return (Step("snapshot", script),)


@lru_cache(maxsize=256)
def _snapshot_script(d: str, paths: tuple[str, ...]) -> str:
    body = []
    for path in paths:
        saved = f"{d}/files{path}"
        body.append(
            f"if [ -e {q(path)} ]; then mkdir -p {q(saved.rsplit('/', 1)[0])} && cp -p {q(path)} {q(saved)}"
            f" && echo {q('present ' + path)} >> {q(d + '/manifest.tmp')}; "
            f"else echo {q('absent ' + path)} >> {q(d + '/manifest.tmp')}; fi")
    return _lines(
        "set -e", "umask 077",
        f"if [ -e {q(d + '/manifest')} ]; then echo '@@snapshot exists'; exit 0; fi",
        f"mkdir -p {q(d + '/files')}", f": > {q(d + '/manifest.tmp')}",
        *body,
        f"mv -f {q(d + '/manifest.tmp')} {q(d + '/manifest')}", "echo '@@snapshot taken'",
    )


def restore_steps(rendered: RenderedHost, run_id: str) -> tuple[Step, ...]:
    """Put the snapshot back (removing files that did not exist), reload, and terminate SAs of
    connections that are no longer configured."""
    script = _for_host(_restore_script, rendered.fqdn, snapshot_dir(run_id), rendered.managed_paths)
    return (Step("restore-files", script), *_reload_steps(rendered.flavour), _terminate_removed(rendered))


@lru_cache(maxsize=256)
def _restore_script(d: str, paths: tuple[str, ...]) -> str:
    body = [f"if grep -qxF {q('present ' + path)} {q(d + '/manifest')}; then "
            f"{_atomic_copy(f'{d}/files{path}', path, preserve=True)}; else rm -f {q(path)}; fi"
            for path in paths]
    return _lines(
        "set -e",
        f"if [ ! -e {q(d + '/manifest')} ]; then echo '@@restore no-snapshot' >&2; exit 1; fi",
        *body, "echo '@@restore done'")


# ----------------------------------------------------------------------------------------------
# Install
# ----------------------------------------------------------------------------------------------


def _atomic_copy(src: str, dest: str, *, preserve: bool = False, mode: int | None = None) -> str:
    directory = dest.rsplit("/", 1)[0] or "/"
    how = f"cp -p {q(src)} \"$t\"" if preserve else f"install -m {mode:04o} {q(src)} \"$t\""
    return (f"t=$(mktemp {q(directory + '/.ipsec-rollout.XXXXXX')}) && {how} && mv -f \"$t\" {q(dest)}"
            f" || {{ rm -f \"$t\"; exit 1; }}")


def _dirs(rendered: RenderedHost) -> tuple[list[str], list[str]]:
    """(directories to create 0755, directories to force to 0700)."""
    paths = [f.path for f in rendered.files] + [m.dest for m in rendered.material]
    dirs = sorted({p.rsplit("/", 1)[0] for p in paths})
    private = sorted({m.dest.rsplit("/", 1)[0] for m in rendered.material if m.kind == "key"})
    return dirs, private


def install_steps(rendered: RenderedHost) -> tuple[Step, ...]:
    """Create directories, write each rendered file atomically (stdin -> temp file in the same
    directory -> chmod -> rename), copy certificate material on the host."""
    dirs, private = _dirs(rendered)
    steps = [_prepare_dirs(tuple(dirs), tuple(private))]
    steps += [_install_file(f) for f in rendered.files]
    steps += [Step(f"copy {m.kind}", _for_host(_copy_script, rendered.fqdn, m.source, m.dest, m.mode))
              for m in rendered.material]
    return tuple(steps)


@lru_cache(maxsize=256)
def _prepare_dirs(dirs: tuple[str, ...], private: tuple[str, ...]) -> Step:
    return Step("prepare-dirs", _lines("set -e", "umask 022", "mkdir -p " + " ".join(q(x) for x in dirs),
                                       *(f"chmod 0700 {q(x)}" for x in private)))


def _install_file(f: RenderedFile) -> Step:
    return Step(f"install {f.path}", _for_host(_install_script, f.sha256, f.path, f.mode, f.sha256),
                stdin=f.content)


@lru_cache(maxsize=256)
def _install_script(path: str, mode: int, sha256: str) -> str:
    directory = path.rsplit("/", 1)[0] or "/"
    return _lines(
        "set -e", "umask 077",
        f"if [ -f {q(path)} ] && [ \"$(sha256sum < {q(path)} | cut -d' ' -f1)\" = {q(sha256)} ]; then "
        f"chmod {mode:04o} {q(path)}; echo {q('@@unchanged ' + path)}; exit 0; fi",
        f"t=$(mktemp {q(directory + '/.ipsec-rollout.XXXXXX')})",
        "trap 'rm -f \"$t\"' EXIT",
        'cat > "$t"', f'chmod {mode:04o} "$t"', f'mv -f "$t" {q(path)}', "trap - EXIT",
        f"echo {q('@@written ' + path)}",
    )


@lru_cache(maxsize=256)
def _copy_script(source: str, dest: str, mode: int) -> str:
    return _lines(
        "set -e", "umask 077",
        f"if [ ! -r {q(source)} ]; then echo {q('@@missing ' + source)} >&2; exit 1; fi",
        f"if cmp -s {q(source)} {q(dest)}; then chmod {mode:04o} {q(dest)}; "
        f"echo {q('@@unchanged ' + dest)}; exit 0; fi",
        _atomic_copy(source, dest, mode=mode),
        f"echo {q('@@copied ' + dest)}",
    )


# ----------------------------------------------------------------------------------------------
# Load / initiate / terminate
# ----------------------------------------------------------------------------------------------


def _alive(stack: model.Stack) -> str:
    return "swanctl --stats" if stack is model.Stack.SWANCTL else "ipsec status"


def _ensure_running(flavour: model.OsFlavour) -> Step:
    alive = _alive(flavour.stack)
    script = _lines(
        f"if ! {alive} >/dev/null 2>&1; then {flavour.start}; fi",
        "i=0",
        f"until {alive} >/dev/null 2>&1; do i=$((i+1)); "
        f"if [ $i -ge {CHARON_WAIT} ]; then echo '@@charon unreachable' >&2; exit 1; fi; sleep 1; done",
        "echo '@@charon up'",
    )
    return Step("ensure-running", script, timeout=CHARON_WAIT + 30.0)


@lru_cache(maxsize=64)
def _reload_steps(flavour: model.OsFlavour) -> tuple[Step, ...]:
    if flavour.stack is model.Stack.SWANCTL:
        load = _checked("swanctl --load-all --noprompt")
        settings = Step("reload-settings", "swanctl --reload-settings")
        return (_ensure_running(flavour), settings, Step("load", load))
    return (_ensure_running(flavour), Step("load", _checked("ipsec rereadall && ipsec reload")))


def _checked(command: str) -> str:
    """Run, echo the output, and fail on any of strongSwan's 'loaded but discarded' messages."""
    return _lines(f"out=$({command} 2>&1); rc=$?", "printf '%s\\n' \"$out\"",
                  f"if printf '%s\\n' \"$out\" | grep -Eq {q(_LOAD_ERRORS)}; then exit 1; fi", "exit $rc")


def load_steps(rendered: RenderedHost) -> tuple[Step, ...]:
    """Start the service if charon is not running, enable it, load everything."""
    return _load_steps(rendered.flavour)


@lru_cache(maxsize=64)
def _load_steps(flavour: model.OsFlavour) -> tuple[Step, ...]:
    running, *rest = _reload_steps(flavour)
    return (running, Step("enable", flavour.enable), *rest)


def initiate_steps(rendered: RenderedHost, conns: Iterable[model.Connection] | None = None, *,
                   timeout: int = 30) -> tuple[Step, ...]:
    """Bring up each connection this host initiates (skipping those already INSTALLED)."""
    chosen = rendered.connections if conns is None else conns
    return initiate_steps_for(rendered.stack, chosen, timeout=timeout)


def initiate_steps_for(stack: model.Stack, conns: Iterable[model.Connection], *,
                       timeout: int = 30) -> tuple[Step, ...]:
    """`initiate_steps` knowing only the host's stack (the planner does not keep rendered hosts)."""
    return tuple(_initiate(stack, c.name, timeout) for c in sorted(c for c in conns if c.initiator))


@lru_cache(maxsize=1 << 14)  # a host's name is initiated by each of its peers
def _initiate(stack: model.Stack, name: str, timeout: int) -> Step:
    return Step(f"initiate {name}", _initiate_command(stack, name, timeout), timeout=timeout + 15.0)


def _initiate_command(stack: model.Stack, name: str, timeout: int) -> str:
    n = q(name)
    if stack is model.Stack.SWANCTL:
        return (f"if swanctl --list-sas --noblock --ike {n} 2>/dev/null | grep -q INSTALLED; then "
                f"echo {q('@@up ' + name)}; "
                f"else swanctl --initiate --ike {n} --child {n} --timeout {timeout}; fi")
    return (f"if ipsec status {n} 2>/dev/null | grep -q INSTALLED; then echo {q('@@up ' + name)}; "
            f"else timeout {timeout} ipsec up {n}; fi")


def _terminate(stack: model.Stack, name: str) -> str:
    # No SA to terminate is the usual case and not an error; the health check verifies afterwards.
    n = q(name)
    if stack is model.Stack.SWANCTL:
        return f"swanctl --terminate --ike {n} --force --timeout 10 >/dev/null 2>&1 || true"
    return f"ipsec down {n} >/dev/null 2>&1 || true"


def _untrap(stack: model.Stack, name: str) -> str:
    n = q(name)
    if stack is model.Stack.SWANCTL:
        return f"swanctl --uninstall --child {n} >/dev/null 2>&1 || true"
    return f"ipsec unroute {n} >/dev/null 2>&1 || true"


def _still_configured(stack: model.Stack, name: str) -> str:
    if stack is model.Stack.SWANCTL:
        return f"swanctl --list-conns 2>/dev/null | grep -q {q('^' + name + ':')}"
    return f"grep -Eq {q('^conn[[:space:]]+' + name + '[[:space:]]*$')} {q(render.LEGACY_CONF)}"


def _terminate_removed(rendered: RenderedHost) -> Step:
    body = [_terminate_if_removed(rendered.stack, c.name) for c in rendered.connections]
    return Step("terminate-removed", _lines(*body, "echo '@@terminated'"), timeout=120.0)


@lru_cache(maxsize=1 << 14)  # a host's name is in the restore step of each of its peers
def _terminate_if_removed(stack: model.Stack, name: str) -> str:
    return f"if ! {_still_configured(stack, name)}; then {_terminate(stack, name)}; fi"


def unload_steps(rendered: RenderedHost, conns: Iterable[model.Connection] | None = None) -> tuple[Step, ...]:
    """Terminate the given connections' SAs (all of this host's by default), forcing. An enforcing
    host also drops its trap policies for them, or it would hold its traffic to those peers."""
    chosen = sorted(rendered.connections if conns is None else conns)
    body = [_terminate(rendered.stack, c.name) for c in chosen]
    if rendered.enforce:
        body += [_untrap(rendered.stack, c.name) for c in chosen]
    return (Step("terminate", _lines(*body, "echo '@@terminated'"), timeout=120.0),)


# ----------------------------------------------------------------------------------------------
# Teardown
# ----------------------------------------------------------------------------------------------

_STUBS = {
    render.LEGACY_CONF: "# ipsec-rollout: IPsec removed by teardown\nconfig setup\n",
    render.LEGACY_SECRETS: "# ipsec-rollout: IPsec removed by teardown\n",
}


def teardown_steps(rendered: RenderedHost) -> tuple[Step, ...]:
    """Remove everything the tool installed, reload, terminate this host's SAs. Stroke hosts get
    an empty ipsec.conf/ipsec.secrets (starter needs the files)."""
    stubs = [RenderedFile(path=f.path, content=_STUBS[f.path], mode=f.mode)
             for f in rendered.files if f.path in _STUBS]
    removed = [p for p in rendered.managed_paths if p not in _STUBS]
    remove = Step("remove-files", _lines("rm -f " + " ".join(q(p) for p in removed), "echo '@@removed'"))
    reload = Step("reload", _lines(f"if {_alive(rendered.stack)} >/dev/null 2>&1; then",
                                   _checked(_reload_command(rendered)), "fi"))
    return (remove, *(_install_file(s) for s in stubs), reload, *unload_steps(rendered))


def _reload_command(rendered: RenderedHost) -> str:
    if rendered.stack is model.Stack.SWANCTL:
        return "swanctl --load-all --noprompt"
    return "ipsec rereadall && ipsec reload"


# ----------------------------------------------------------------------------------------------
# Idempotence: what is on the host now?
# ----------------------------------------------------------------------------------------------


def expected_digests(rendered: RenderedHost) -> dict[str, str]:
    return {f.path: f.sha256 for f in rendered.files}


def check_current_steps(rendered: RenderedHost) -> tuple[Step, ...]:
    """Read-only: sha256 of each rendered file, whether each material copy equals its source,
    and the modes. The key is compared on the host (cmp), never hashed out."""
    body = [f"if [ -f {q(f.path)} ]; then printf '@@digest %s %s\\n' \"$(sha256sum < {q(f.path)}"
            f" | cut -d' ' -f1)\" {q(f.path)}; else printf '@@digest absent %s\\n' {q(f.path)}; fi"
            for f in rendered.files]
    body += [f"if cmp -s {q(m.source)} {q(m.dest)}; then s=same; else s=differs; fi; "
             f"printf '@@material %s %s %s\\n' \"$s\" \"$(stat -c %a {q(m.dest)} 2>/dev/null || echo -)\" "
             f"{q(m.dest)}" for m in rendered.material]
    return (Step("check-current", _lines(*body, "echo '@@end'"), mutating=False, timeout=30.0),)


@dataclass(frozen=True, kw_only=True)
class CurrentState:
    digests: tuple[tuple[str, str], ...]  # path -> sha256 or "absent"
    material: tuple[tuple[str, str, str], ...]  # (dest, same|differs, octal mode or "-")
    complete: bool

    def unchanged(self, rendered: RenderedHost) -> bool:
        """True when the host already has exactly what `rendered` would install."""
        if not self.complete or dict(self.digests) != expected_digests(rendered):
            return False
        found = {dest: (state, mode) for dest, state, mode in self.material}
        return all(found.get(m.dest) == ("same", f"{m.mode:o}") for m in rendered.material)


def parse_current(stdout: str) -> CurrentState:
    digests: list[tuple[str, str]] = []
    material: list[tuple[str, str, str]] = []
    for line in stdout.splitlines():
        parts = line.split(" ", 3)
        if parts[0] == "@@digest" and len(parts) == 3:
            digests.append((parts[2], parts[1]))
        elif parts[0] == "@@material" and len(parts) == 4:
            material.append((parts[3], parts[1], parts[2]))
    return CurrentState(digests=tuple(digests), material=tuple(material),
                        complete="@@end" in stdout.splitlines())


def apply_steps(rendered: RenderedHost, run_id: str) -> tuple[Step, ...]:
    """The whole per-host apply after preflight, in order: snapshot, install, load, initiate."""
    return (*snapshot_steps(rendered, run_id), *install_steps(rendered), *load_steps(rendered),
            *initiate_steps(rendered))
