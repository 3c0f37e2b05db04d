"""F7: certificates that are expired, not yet valid (clock skew) or issued by the wrong CA.

Real certificates (strongSwan `pki`, as the lab and Puppet-like CAs make them), checked by the real
preflight script run on this machine with `sh` (it only reads), judged by steps.parse_preflight.
Preflight must refuse each with a message that names the problem; a good certificate passes the
certificate checks. The lab variant (wrong CA placed in a lab host's Puppet dir) is in test_lab_faults.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from rollout import model, steps
from tests.test_render import EQIAD_A, fleet

pytestmark = pytest.mark.skipif(not (shutil.which("pki") and shutil.which("openssl")),
                                reason="needs strongSwan pki and openssl")
DAY = 86400
FMT = "%Y-%m-%d %H:%M:%S"


def _pki(*args: str) -> str:
    return subprocess.run(["pki", *args, "--outform", "pem"], check=True, capture_output=True, text=True,
                          timeout=60).stdout


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.pem"
    key.write_text(_pki("--gen", "--type", "ecdsa", "--size", "256"))
    cert.write_text(_pki("--self", "--ca", "--in", str(key), "--type", "ecdsa", "--dn", f"CN={name}"))
    return key, cert


def _when(offset: float) -> str:
    return time.strftime(FMT, time.localtime(time.time() + offset))


def _issue(d: Path, name: str, ca: tuple[Path, Path], not_before: float, not_after: float) -> None:
    key = d / f"{name}.key"
    key.write_text(_pki("--gen", "--type", "ecdsa", "--size", "256"))
    (d / f"{name}.pem").write_text(_pki(
        "--issue", "--in", str(key), "--type", "ecdsa", "--cacert", str(ca[1]), "--cakey", str(ca[0]),
        "--dn", f"CN={name}", "--san", name, "--dateform", FMT,
        "--not-before", _when(not_before), "--not-after", _when(not_after)))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    puppet, rogue = _ca(d, "puppet-ca"), _ca(d, "rogue-ca")
    _issue(d, "good", puppet, -DAY, 365 * DAY)
    _issue(d, "expired", puppet, -30 * DAY, -DAY)
    _issue(d, "expiring", puppet, -30 * DAY, 3600)  # valid now, not for the gate horizon (1 day)
    _issue(d, "future", puppet, 2 * DAY, 365 * DAY)  # host clock behind the CA: not yet valid
    _issue(d, "wrongca", rogue, -DAY, 365 * DAY)
    return d


def _preflight(certs: Path, name: str) -> steps.PreflightResult:
    f = fleet()
    src = model.CertSource(cert=f"{certs}/{name}.pem", key=f"{certs}/{name}.key", ca=f"{certs}/puppet-ca.pem")
    f = dataclasses.replace(f, ipsec=dataclasses.replace(f.ipsec, cert_source=src))
    (step,) = steps.preflight_steps(f, f.hosts[EQIAD_A], horizon=DAY)
    out = subprocess.run(["sh", "-c", step.command], capture_output=True, text=True, timeout=60).stdout
    return steps.parse_preflight(out)


CERT_PROBLEMS = ("certificate expires", "does not verify against the CA", "not valid yet",
                 "private key does not match")


def _cert_problems(res: steps.PreflightResult) -> list[str]:
    return [p for p in res.problems if any(k in p for k in CERT_PROBLEMS)]


def test_good_certificate_has_no_certificate_problem(certs: Path) -> None:
    res = _preflight(certs, "good")
    assert res.get("cert_present") == "yes" and res.get("key_matches") == "yes"
    assert _cert_problems(res) == []


@pytest.mark.parametrize(("name", "needles"), [
    ("expired", ["certificate expires within the gate horizon", "does not verify against the CA"]),
    ("expiring", ["certificate expires within the gate horizon"]),
    ("future", ["not valid yet", "does not verify against the CA"]),
    ("wrongca", ["does not verify against the CA"]),
])
def test_bad_certificate_is_refused_with_a_clear_message(certs: Path, name: str, needles: list[str]) -> None:
    res = _preflight(certs, name)
    assert not res.ok
    for needle in needles:
        assert any(needle in p for p in res.problems), (name, res.problems)
