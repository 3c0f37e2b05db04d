"""Every golden config must load into a REAL strongSwan: swanctl.conf via `swanctl --load-conns`
against a throwaway charon, ipsec.conf via a throwaway starter.

Isolation: each daemon runs under `unshare --net --mount` with a tmpfs over /run, so its pid file,
stroke socket, IKE sockets and any trap policies live in a private namespace and cannot clash with a
charon already running on this machine. The vici socket sits in a private temp dir. Everything the
test starts is killed by its own process group at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rollout import profiles

pytestmark = pytest.mark.charon

CHARON = Path("/usr/lib/ipsec/charon")
STARTER = Path("/usr/lib/ipsec/starter")
CHARON_OPTIONS = Path("/usr/share/strongswan/templates/config/strongswan.d/charon.conf")
GOLDEN = Path(__file__).parent / "golden" / "render"
SWANCTL_GOLDENS = sorted(GOLDEN.glob("*/*/etc/swanctl/conf.d/ipsec-rollout.conf"))
LEGACY_GOLDENS = sorted(GOLDEN.glob("*/*/etc/ipsec.conf"))
BAD_LOAD = re.compile(r"config discarded|invalid value|loading .* failed|parsing .* failed|failed to load")
BAD_STARTER = re.compile(r"parsing error|bad value|bad argument|ignored conn|unknown keyword")
PLUGINS = ("random nonce openssl pem pkcs1 pkcs8 x509 pubkey revocation constraints kernel-netlink "
           "socket-default")


def _missing() -> str | None:
    if not CHARON.exists():
        return f"{CHARON} missing (apt-get install charon-systemd strongswan-swanctl)"
    for tool in ("swanctl", "openssl", "unshare"):
        if not shutil.which(tool):
            return f"{tool} not installed"
    if os.geteuid() != 0:
        return "needs root for unshare --net --mount (isolated throwaway charon)"
    return None


if (_reason := _missing()) is not None:
    pytest.skip(_reason, allow_module_level=True)


def _strongswan_conf(d: Path, *, stroke: bool = False) -> Path:
    conf = d / "strongswan.conf"
    conf.write_text(f"""charon {{
  port = 0
  port_nat_t = 0
  install_routes = no
  load = {PLUGINS} {"stroke" if stroke else "vici"}
  plugins {{
    vici {{
      socket = unix://{d}/charon.vici
    }}
  }}
  filelog {{
    log {{
      path = {d}/charon.log
      default = 1
    }}
  }}
}}
swanctl {{
  load = random openssl pem pkcs1 pkcs8 x509 pubkey revocation constraints
}}
""")
    return conf


def _isolated(script: str, conf: Path, log: Path) -> subprocess.Popen[bytes]:
    wrapped = f"mount -t tmpfs none /run && ip link set lo up 2>/dev/null; {script}"
    with log.open("wb") as out:
        return subprocess.Popen(["unshare", "--net", "--mount", "sh", "-c", wrapped],
                                env={**os.environ, "STRONGSWAN_CONF": str(conf)},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)  # our own session: the daemon and its children, nothing else
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ipr-", dir="/tmp"))  # short: unix socket paths are limited
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def ca(workdir: Path) -> tuple[Path, Path]:
    key, cert = workdir / "ca.key", workdir / "ca.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", key, "-out", cert, "-subj", "/CN=ipsec-rollout test CA", "-days", "2")
    return key, cert


def _openssl(*args: object) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _host_cert(workdir: Path, ca: tuple[Path, Path], fqdn: str, dest: Path) -> None:
    key, csr = workdir / f"{fqdn}.key", workdir / f"{fqdn}.csr"
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key,
             "-out", csr, "-subj", f"/CN={fqdn}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _openssl("x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0], "-set_serial", "1", "-days", "2",
             "-out", dest)


@pytest.fixture(scope="module")
def charon(workdir: Path) -> Iterator[str]:
    d = workdir / "charon"
    d.mkdir()
    conf = _strongswan_conf(d)
    proc = _isolated(f"exec {CHARON}", conf, d / "stdout.log")
    uri = f"unix://{d}/charon.vici"
    try:
        deadline = time.monotonic() + 15
        while _swanctl(conf, "--stats", "--uri", uri).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"throwaway charon did not come up: {(d / 'stdout.log').read_text()}")
            time.sleep(0.2)
        yield uri
    finally:
        _stop(proc)


def _swanctl(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["swanctl", *args], env={**os.environ, "STRONGSWAN_CONF": str(conf)},
                          capture_output=True, text=True, timeout=60)


def _golden_id(path: Path) -> str:
    return "/".join(path.relative_to(GOLDEN).parts[:2])


def test_goldens_exist() -> None:
    assert len(SWANCTL_GOLDENS) >= 8 and LEGACY_GOLDENS


@pytest.mark.parametrize("golden", SWANCTL_GOLDENS, ids=_golden_id)
def test_swanctl_golden_loads(golden: Path, charon: str, workdir: Path, ca: tuple[Path, Path]) -> None:
    scenario, fqdn = golden.relative_to(GOLDEN).parts[:2]
    swdir = workdir / "swanctl" / scenario / fqdn  # certs are resolved relative to the file's dir
    _host_cert(workdir, ca, fqdn, swdir / "x509" / f"{fqdn}.pem")
    (swdir / "x509ca").mkdir(exist_ok=True)
    shutil.copy(ca[1], swdir / "x509ca" / "ipsec-rollout-ca.pem")
    text = golden.read_text()
    (swdir / "swanctl.conf").write_text(text)
    conf = workdir / "charon" / "strongswan.conf"
    names = re.findall(r"^    (\S+) \{$", text, flags=re.M)

    result = _swanctl(conf, "--load-conns", "--file", str(swdir / "swanctl.conf"), "--uri", charon)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert not BAD_LOAD.search(output), output
    assert f"successfully loaded {len(names)} connections" in output, output

    listed = _swanctl(conf, "--list-conns", "--uri", charon).stdout
    for name in names:
        assert re.search(rf"^{name}: IKEv2", listed, flags=re.M), listed
        assert re.search(rf"^  {name}: TRANSPORT", listed, flags=re.M), listed


@pytest.mark.skipif(not STARTER.exists(), reason=f"{STARTER} missing (strongswan-starter)")
@pytest.mark.parametrize("golden", LEGACY_GOLDENS, ids=_golden_id)
def test_legacy_ipsec_conf_parses(golden: Path, workdir: Path) -> None:
    """starter parses ipsec.conf (reporting any bad keyword/value) and hands every conn to charon."""
    d = workdir / f"starter-{_golden_id(golden).replace('/', '-')}"
    d.mkdir()
    conf = _strongswan_conf(d, stroke=True)
    names = re.findall(r"^conn (\S+)$", golden.read_text(), flags=re.M)
    script = (f"{STARTER} --nofork --conf {golden} >{d}/starter.log 2>&1 & s=$!; "
              "i=0; while [ $i -lt 50 ]; do ipsec statusall >" f"{d}/status.txt 2>&1 && "
              f"grep -q ' {names[-1]}: ' {d}/status.txt && break; i=$((i+1)); sleep 0.2; done; "
              "kill $s; wait $s")
    proc = _isolated(script, conf, d / "stdout.log")
    try:
        proc.wait(timeout=60)
    finally:
        _stop(proc)
    starter_log = (d / "starter.log").read_text()
    status = (d / "status.txt").read_text()
    assert not BAD_STARTER.search(starter_log), starter_log
    for name in (n for n in names if n != "%default"):
        assert re.search(rf"^\s+{name}: .*IKEv2", status, flags=re.M), status
        assert re.search(rf"^\s+{name}: +child: .*TRANSPORT", status, flags=re.M), status


@pytest.mark.skipif(not CHARON_OPTIONS.exists(), reason=f"{CHARON_OPTIONS} missing")
def test_charon_keys_exist_in_this_strongswan() -> None:
    """Every overridable charon key is a real charon.* option (the template lists them all), and
    Wikimedia's misspelling is not."""
    options = set(re.findall(r"^    # (\w+) =", CHARON_OPTIONS.read_text(), flags=re.M))
    assert set(profiles.CHARON_SETTINGS) <= options, set(profiles.CHARON_SETTINGS) - options
    assert "retramsmit_tries" not in options
