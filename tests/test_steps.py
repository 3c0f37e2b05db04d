"""Per-host steps: order, read-only-ness, quoting (proved by running them), idempotence."""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rollout import errors, model, render, steps
from tests.test_render import EQIAD_A, EQIAD_B, ESAMS_A, ESAMS_STROKE, fleet, pair

PAIRS = (pair(EQIAD_A, ESAMS_A), pair(EQIAD_B, ESAMS_STROKE))


def rendered(fqdn: str = EQIAD_A, f: model.Fleet | None = None) -> render.RenderedHost:
    return render.render_host(f or fleet(), PAIRS, fqdn)


def all_steps(r: render.RenderedHost, f: model.Fleet | None = None) -> list[steps.Step]:
    host = (f or fleet()).hosts[r.fqdn]
    return [*steps.preflight_steps(f or fleet(), host), *steps.apply_steps(r, "run-1"),
            *steps.restore_steps(r, "run-1"), *steps.teardown_steps(r), *steps.check_current_steps(r)]


@pytest.mark.parametrize("fqdn", [EQIAD_A, ESAMS_STROKE])
def test_every_command_is_valid_posix_sh(fqdn: str) -> None:
    for step in all_steps(rendered(fqdn)):
        result = subprocess.run(["sh", "-n", "-c", step.command], capture_output=True, text=True)
        assert result.returncode == 0, (step.name, result.stderr)


def test_apply_order() -> None:
    names = [s.name for s in steps.apply_steps(rendered(), "run-1")]
    assert names[:2] == ["snapshot", "prepare-dirs"]
    order = [names.index(n) for n in ("copy key", "ensure-running", "enable", "load")]
    assert order == sorted(order)
    assert names[-2:] == ["initiate cp3030_v4", "initiate cp3030_v6"]


def test_read_only_steps_are_marked() -> None:
    f = fleet()
    assert not any(s.mutating for s in steps.preflight_steps(f, f.hosts[EQIAD_A]))
    assert not any(s.mutating for s in steps.check_current_steps(rendered()))
    assert all(s.mutating for s in steps.apply_steps(rendered(), "r"))


def test_no_step_carries_key_material_and_key_is_copied_on_host() -> None:
    r = rendered()
    for step in all_steps(r):
        assert "PRIVATE KEY" not in step.command and "PRIVATE KEY" not in (step.stdin or "")
    copy_key = next(s for s in steps.install_steps(r) if s.name == "copy key")
    assert copy_key.stdin is None
    assert f"install -m 0600 /var/lib/puppet/ssl/private_keys/{EQIAD_A}.pem" in copy_key.command
    assert "mktemp /etc/swanctl/private/.ipsec-rollout." in copy_key.command
    assert "chmod 0700 /etc/swanctl/private" in steps.install_steps(r)[0].command


def test_files_go_through_stdin_temp_and_rename() -> None:
    r = rendered()
    conf = "install /etc/swanctl/conf.d/ipsec-rollout.conf"
    step = next(s for s in steps.install_steps(r) if s.name == conf)
    assert step.stdin == r.files[0].content
    assert "mktemp /etc/swanctl/conf.d/.ipsec-rollout." in step.command and "mv -f" in step.command


def test_only_initiator_initiates() -> None:
    assert steps.initiate_steps(rendered(ESAMS_A)) == ()
    commands = [s.command for s in steps.initiate_steps(rendered(EQIAD_A), timeout=20)]
    assert "swanctl --initiate --ike cp3030_v4 --child cp3030_v4 --timeout 20" in commands[0]


def test_stroke_host_uses_ipsec_commands() -> None:
    r = rendered(EQIAD_B)  # swanctl host, initiator towards the stroke host
    assert r.stack is model.Stack.SWANCTL
    s = rendered(ESAMS_STROKE)
    load = "\n".join(x.command for x in steps.load_steps(s))
    assert "ipsec rereadall && ipsec reload" in load and "systemctl start strongswan" in load
    assert "swanctl" not in load
    teardown = steps.teardown_steps(s)
    stub = next(x for x in teardown if x.name == "install /etc/ipsec.conf")
    assert stub.stdin is not None and "config setup" in stub.stdin


def test_lab_flavour_uses_lab_supervisor() -> None:
    f = fleet()
    lab = dataclasses.replace(f.hosts[EQIAD_A], os="lab-uml")
    f = dataclasses.replace(f, hosts={**f.hosts, EQIAD_A: lab})
    text = "\n".join(s.command for s in steps.load_steps(rendered(EQIAD_A, f)))
    assert "/etc/lab/svc start" in text and "/etc/lab/svc enable" in text


def test_run_id_is_validated() -> None:
    for bad in ("../etc", "-rf", "a/b", "", "x y"):
        with pytest.raises(errors.InputError):
            steps.snapshot_steps(rendered(), bad)


# ---------------------------------------------------------------------------------------------- preflight

GOOD = """@@pf begin
@@pf stack swanctl
@@pf expect_key_type RSA
@@pf swanctl yes
@@pf ipsec no
@@pf version strongSwan 5.9.8 swanctl
@@pf charon yes
@@pf service yes
@@pf cert_present yes
@@pf key_present yes
@@pf ca_present yes
@@pf cert_valid yes
@@pf ca_valid yes
@@pf cert_not_before 1700000000
@@pf cert_chain yes
@@pf key_matches yes
@@pf cert_key_type rsaEncryption
@@pf now 1800000000
@@pf clock_synced yes
@@pf latched no
@@pf end
"""


def test_parse_preflight_ok() -> None:
    result = steps.parse_preflight(GOOD)
    assert result.ok and not result.warnings and not result.latched and result.charon_running
    assert result.remote_epoch == 1800000000 and result.get("version").startswith("strongSwan 5.9.8")


@pytest.mark.parametrize(("line", "problem"), [
    ("@@pf latched yes", "latched"),
    ("@@pf key_present no", "private key missing"),
    ("@@pf cert_valid no", "expires within the gate horizon"),
    ("@@pf cert_chain no", "does not verify"),
    ("@@pf key_matches no", "does not match"),
    ("@@pf clock_synced no", "not synchronised"),
    ("@@pf cert_not_before 1900000000", "not valid yet"),
    ("@@pf swanctl no", "swanctl is not installed"),
])
def test_parse_preflight_problems(line: str, problem: str) -> None:
    key = line.split()[1]
    text = "\n".join(line if x.split()[1] == key else x for x in GOOD.splitlines())
    result = steps.parse_preflight(text)
    assert not result.ok and any(problem in p for p in result.problems), result.problems


def test_parse_preflight_truncated_and_warnings() -> None:
    assert not steps.parse_preflight(GOOD.replace("@@pf end\n", "")).ok
    soft = steps.parse_preflight(GOOD.replace("charon yes", "charon no").replace("synced yes", "synced "))
    assert soft.ok and len(soft.warnings) == 2


def test_stroke_key_type_mismatch() -> None:
    text = GOOD.replace("stack swanctl", "stack stroke").replace("ipsec no", "ipsec yes")
    text = text.replace("rsaEncryption", "id-ecPublicKey")
    assert any("key_type" in p for p in steps.parse_preflight(text).problems)


def test_preflight_runs_here_and_is_parseable(tmp_path: Path) -> None:
    """Really run it on this machine (read-only): every key is reported, nothing is left behind."""
    f = fleet()
    (step,) = steps.preflight_steps(f, f.hosts[EQIAD_A], horizon=3600)
    out = subprocess.run(["sh", "-c", step.command], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60).stdout
    result = steps.parse_preflight(out)
    assert result.get("cert_present") == "no" and not result.ok  # no Puppet certs on this machine
    assert "preflight output incomplete" not in " ".join(result.problems)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- sandbox run


def sandboxed(r: render.RenderedHost, root: Path) -> render.RenderedHost:
    """The same host with every path moved under `root` (sources included)."""
    def move(p: str) -> str:
        return f"{root}{p}"
    files = tuple(dataclasses.replace(x, path=move(x.path)) for x in r.files)
    material = tuple(dataclasses.replace(m, source=move(m.source), dest=move(m.dest)) for m in r.material)
    return dataclasses.replace(r, files=files, material=material)


def run(step: steps.Step, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", step.command], input=step.stdin, cwd=cwd, capture_output=True,
                          text=True, timeout=60, env=env)


def test_snapshot_install_check_restore_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(steps, "SNAPSHOT_ROOT", str(tmp_path / "snap"))
    r = sandboxed(rendered(), tmp_path)
    for m in r.material:  # what Puppet would have
        Path(m.source).parent.mkdir(parents=True, exist_ok=True)
        Path(m.source).write_text(f"{m.kind} bytes\n")
    preexisting = Path(r.files[1].path)  # an older snippet already on the host
    preexisting.parent.mkdir(parents=True, exist_ok=True)
    preexisting.write_text("old\n")

    for step in (*steps.snapshot_steps(r, "run-1"), *steps.install_steps(r)):
        assert run(step, tmp_path).returncode == 0, step.name
    key = next(m for m in r.material if m.kind == "key")
    assert oct(Path(key.dest).stat().st_mode & 0o777) == "0o600"
    assert oct(Path(key.dest).parent.stat().st_mode & 0o777) == "0o700"
    assert Path(r.files[0].path).read_text() == r.files[0].content
    (check,) = steps.check_current_steps(r)
    current = steps.parse_current(run(check, tmp_path).stdout)
    assert current.unchanged(r)
    assert dict(current.digests) == steps.expected_digests(r)

    again = [run(s, tmp_path).stdout for s in steps.install_steps(r)[1:]]
    assert all("@@unchanged" in out for out in again)
    assert "@@snapshot exists" in run(steps.snapshot_steps(r, "run-1")[0], tmp_path).stdout

    (restore, *_reload) = steps.restore_steps(r, "run-1")
    assert run(restore, tmp_path).returncode == 0
    assert preexisting.read_text() == "old\n"
    assert not Path(r.files[0].path).exists() and not Path(key.dest).exists()
    assert not steps.parse_current(run(check, tmp_path).stdout).unchanged(r)


def test_restore_without_snapshot_fails_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(steps, "SNAPSHOT_ROOT", str(tmp_path / "snap"))
    result = run(steps.restore_steps(sandboxed(rendered(), tmp_path), "nope")[0], tmp_path)
    assert result.returncode != 0 and "no-snapshot" in result.stderr


# ---------------------------------------------------------------------------------------------- hostile names

FRAGMENTS = ["; touch {m}", "$(touch {m})", "`touch {m}`", "\ntouch {m}\n", "' ; touch {m} '",
             '" ; touch {m} "', "-x", "*", "&& touch {m}", "| touch {m}", "$HOME", "\\"]


@st.composite
def hostile(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=4))
    return "".join(parts) + draw(st.text(alphabet="ab-.", max_size=3))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=hostile(), path=hostile())
def test_hostile_values_stay_quoted(name: str, path: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Hostile connection names and certificate paths reach the shell only as single words: running
    every read-only and initiate/terminate command creates no marker file."""
    work = tmp_path_factory.mktemp("hostile")
    marker = work / "PWNED"
    name, path = name.replace("{m}", str(marker)), path.replace("{m}", str(marker))
    stubs = work / "bin"
    stubs.mkdir()
    for tool in ("swanctl", "ipsec", "openssl", "systemctl", "timedatectl"):
        (stubs / tool).write_text("#!/bin/sh\nexit 1\n")
        (stubs / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"}

    f = fleet()
    f = dataclasses.replace(f, ipsec=dataclasses.replace(
        f.ipsec, cert_source=model.CertSource(cert=f"/nonexistent/{path}", key=path, ca=path)))
    conn = model.Connection(local=EQIAD_A, peer=f"{name}.example.net", family="v4", initiator=True)
    for fqdn in (EQIAD_A, ESAMS_STROKE):
        r = dataclasses.replace(render.render_host(f, PAIRS, fqdn), connections=(conn,))
        r = dataclasses.replace(r, material=tuple(dataclasses.replace(m, dest=f"{work}/{path}")
                                                  for m in r.material))
        safe = [*steps.preflight_steps(f, f.hosts[fqdn]), *steps.check_current_steps(r),
                *steps.initiate_steps(r), *steps.unload_steps(r), steps.restore_steps(r, "run-1")[-1]]
        for step in safe:
            run(step, work, env)
            assert not marker.exists(), (step.name, step.command)
        for step in (*steps.initiate_steps(r), *steps.unload_steps(r)):
            tokens = shlex.split(step.command)
            assert conn.name in tokens, step.command
