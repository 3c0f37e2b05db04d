"""Kill-switch fan-out benchmark (issue 5, Performance).

Creates a network namespace with N sshd instances (one per simulated host, on 127.1.x.y inside the
namespace, each with its own Ed25519 host key, all in strict known_hosts), inside a sandbox (own PID and
mount namespaces, a private overlay over /etc, tmpfs /run, root's shell = /bin/sh with an empty HOME) so
the kill script touches nothing of this machine. Then drives the SAME kill command
(`killswitch.remote_command`) on every host with each tool, side by side:

  ipsec-kill   the real CLI (`rollout.cli.kill --hosts-file ... --yes`, run through runpy so the CPU
               its cyclic GC takes can be reported in the note column), netns sockets
  openssh      `xargs -P <parallel> ssh` (OpenSSH client, one process per host, its default kex)
  openssh-x25519  the same with `-o KexAlgorithms=curve25519-sha256` (what ipsec-kill negotiates)
  fabric       fabric.ThreadingGroup (its own default: one thread per host, no host-key check)
  ansible      `ansible all -m raw -f <parallel>` (if ansible is installed in --venv)
  cumin        `cumin` ClusterShell transport, fanout <parallel> (if installed in --venv)

Per driver: wall time, hosts/s, client CPU per host (user+sys of the driver's whole process tree, from
wait4), peak memory (sum of RSS of the driver's process tree, sampled every 50 ms), hosts confirmed, and
ratios against ipsec-kill. Needs root. Only loopback addresses inside the namespace are used.

    python bench/kill_fanout.py --n 1000            # the issue's figure
    python bench/kill_fanout.py --n 50 --drivers ipsec-kill,openssh   # quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rollout import killswitch  # noqa: E402

DRIVERS = ("ipsec-kill", "openssh", "openssh-x25519", "fabric", "ansible", "cumin")
SSHD_CONFIG = """\
Port 22
AuthorizedKeysFile {w}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
PidFile none
StrictModes no
PrintMotd no
MaxStartups 200:30:400
LogLevel ERROR
"""
SANDBOX = """\
set -e
mount --make-rprivate /
mount -t overlay overlay -o lowerdir=/etc,upperdir={w}/etc-u,workdir={w}/etc-w /etc
mount -t tmpfs tmpfs /run
mkdir -p /run/sshd
rm -f /etc/init.d/ipsec /etc/init.d/strongswan
sed -i 's#^root:.*#root:x:0:0:root:{w}/home:/bin/sh#' /etc/passwd
ip link set lo up
set +e
while read -r addr key; do
    /usr/sbin/sshd -D -f {w}/sshd_config -o ListenAddress="$addr" -o HostKey="$key" &
done < {w}/instances
echo ready > {w}/ready
wait
"""


@dataclass(frozen=True)
class Fleet:
    work: Path
    netns: str
    addresses: tuple[str, ...]
    client_key: Path
    known_hosts: Path
    hosts_file: Path
    command: str


@dataclass(frozen=True)
class Measure:
    driver: str
    hosts: int
    confirmed: int
    wall: float
    cpu: float
    peak_rss: int
    note: str = ""

    @property
    def rate(self) -> float:
        return self.hosts / self.wall if self.wall else 0.0

    @property
    def cpu_ms_per_host(self) -> float:
        return self.cpu / self.hosts * 1000


def _ed25519(path: Path) -> str:
    key = Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode()


def address(i: int) -> str:
    return f"127.1.{i // 200}.{i % 200 + 1}"


def build(n: int, work: Path) -> Fleet:
    netns = f"ikbench-{os.getpid()}"
    for d in ("keys", "home", "etc-u", "etc-w"):
        (work / d).mkdir(parents=True, exist_ok=True)
    client_pub = _ed25519(work / "client_key")
    (work / "authorized_keys").write_text(client_pub + "\n")
    addresses = tuple(address(i) for i in range(n))
    known, instances, listed = [], [], []
    for i, addr in enumerate(addresses):
        pub = _ed25519(work / "keys" / f"h{i}")
        known.append(f"{addr} {pub}")
        instances.append(f"{addr} {work}/keys/h{i}")
        listed.append(f"h{i:04d}.bench.test ssh_host={addr} netns={netns} identity={work}/client_key "
                      f"known_hosts={work}/known_hosts use_ssh_config=false")
    (work / "known_hosts").write_text("\n".join(known) + "\n")
    (work / "instances").write_text("\n".join(instances) + "\n")
    (work / "hosts.txt").write_text("\n".join(listed) + "\n")
    (work / "sshd_config").write_text(SSHD_CONFIG.format(w=work))
    options = killswitch.KillOptions(who="bench@local", reason="fan-out benchmark", run_id="bench")
    return Fleet(work=work, netns=netns, addresses=addresses, client_key=work / "client_key",
                 known_hosts=work / "known_hosts", hosts_file=work / "hosts.txt",
                 command=killswitch.remote_command(options))


def start(fleet: Fleet) -> subprocess.Popen[bytes]:
    subprocess.run(["ip", "netns", "add", fleet.netns], check=True)
    (fleet.work / "sandbox.sh").write_text(SANDBOX.format(w=fleet.work))
    proc = subprocess.Popen(["ip", "netns", "exec", fleet.netns, "unshare", "-m", "-p", "-f", "--mount-proc",
                             "sh", str(fleet.work / "sandbox.sh")], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=open(fleet.work / "sshd.log", "wb"))  # noqa: SIM115
    deadline = time.monotonic() + 120 + len(fleet.addresses) * 0.05
    while time.monotonic() < deadline:
        listening = subprocess.run(["ip", "netns", "exec", fleet.netns, "ss", "-Hltn"], capture_output=True,
                                   text=True).stdout.count(":22 ")
        if listening >= len(fleet.addresses):
            return proc
        time.sleep(0.5)
    stop(fleet, proc)
    raise SystemExit(f"only {listening}/{len(fleet.addresses)} sshd listening")


def stop(fleet: Fleet, proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    subprocess.run(["ip", "netns", "del", fleet.netns], check=False)


def seed_policies(fleet: Fleet) -> None:
    """Something for the first host to flush (all hosts share the namespace's kernel state)."""
    for a, b in (("198.18.0.1", "198.18.0.2"), ("198.18.0.2", "198.18.0.1")):
        subprocess.run(["ip", "-n", fleet.netns, "xfrm", "policy", "add", "src", a, "dst", b, "dir", "out",
                        "tmpl", "proto", "esp", "mode", "transport"], check=False, capture_output=True)


# ------------------------------------------------------------------------------------------------
# Measuring one driver process tree
# ------------------------------------------------------------------------------------------------
def _children(pid: int) -> set[int]:
    """The process tree under `pid`, via /proc/<pid>/task/<tid>/children (reads only that tree)."""
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                kids = {int(k) for k in Path(f"/proc/{parent}/task/{tid}/children").read_text().split()}
            except (OSError, ValueError):
                continue
            frontier.extend(kids - tree)
            tree |= kids
    return tree


def _rss(pids: set[int]) -> int:
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue
    return total


def measure(driver: str, argv: list[str], hosts: int, count: callable, env: dict[str, str] | None = None,
            note: str = "") -> Measure:
    out_path = Path(tempfile.mkstemp(prefix=f"bench-{driver}-", suffix=".out")[1])
    peak = [0]
    with out_path.open("wb") as out:
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})})
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _rss(_children(proc.pid)))
                done.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - started
        done.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = out_path.read_text(errors="replace")
    confirmed = count(text)
    if confirmed < hosts:
        note = (note + f"; exit {proc.returncode}; output {out_path}").strip("; ")
    else:
        out_path.unlink()
    return Measure(driver=driver, hosts=hosts, confirmed=confirmed, wall=wall,
                   cpu=usage.ru_utime + usage.ru_stime, peak_rss=peak[0], note=note)


def _count_lines(text: str) -> int:
    return sum(1 for line in text.splitlines()
               if "IPSEC-KILL result=killed" in line or "IPSEC-KILL result=already-clean" in line)


# ------------------------------------------------------------------------------------------------
# Drivers
# ------------------------------------------------------------------------------------------------
def run_ipsec_kill(fleet: Fleet, parallel: int) -> Measure:
    report = fleet.work / "ipsec-kill-report.json"

    def count(_: str) -> int:
        data = json.loads(report.read_text())
        return data["summary"]["killed"] + data["summary"]["already-clean"]

    gc_file = fleet.work / "ipsec-kill-gc"
    argv = [sys.executable, "-c", _WITH_GC_CPU, str(gc_file), "--all", "--yes",
            "--hosts-file", str(fleet.hosts_file), "--report", str(report),
            "--state-dir", str(fleet.work / "state"), "--reason", "fan-out benchmark",
            "--parallel", str(parallel), "--connect-timeout", "30", "--deadline", "600"]
    result = measure("ipsec-kill", argv, len(fleet.addresses), count, env={"PYTHONPATH": str(ROOT)},
                     note=f"parallel {parallel}, strict host keys")
    gc_cpu = gc_file.read_text().strip() if gc_file.exists() else "?"
    return replace(result, note=f"{result.note}; cyclic GC {gc_cpu} s CPU")


# `python -m rollout.cli.kill`, plus the CPU time its cyclic garbage collections took (gc.callbacks).
_WITH_GC_CPU = """
import atexit, gc, runpy, sys, time
out, sys.argv, spent, began = sys.argv[1], ["ipsec-kill", *sys.argv[2:]], [0.0], [0.0]
def on_gc(phase, _):
    if phase == "start":
        began[0] = time.process_time()
    else:
        spent[0] += time.process_time() - began[0]
gc.callbacks.append(on_gc)
atexit.register(lambda: open(out, "w").write(f"{spent[0]:.2f}"))
runpy.run_module("rollout.cli.kill", run_name="__main__")
"""


def _ssh_options(fleet: Fleet) -> list[str]:
    return ["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={fleet.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "ConnectTimeout=30", "-o", "LogLevel=ERROR", "-i", str(fleet.client_key), "-l", "root"]


def run_openssh(fleet: Fleet, parallel: int, kex: str | None = None) -> Measure:
    (fleet.work / "addresses").write_text("\n".join(fleet.addresses) + "\n")
    # xargs aborts everything when one command exits 255 (an ssh failure): a tiny sh keeps it going
    # and names the host that failed.
    wrapper = 'ssh "$@" || echo "FAILED $? ${HOST}"'
    extra = ["-o", f"KexAlgorithms={kex}"] if kex else []
    xargs = ["xargs", "-a", str(fleet.work / "addresses"), "-P", str(parallel), "-I{}",
             "env", "HOST={}", "sh", "-c", wrapper, "ssh", *_ssh_options(fleet), *extra, "{}", fleet.command]
    name = "openssh-x25519" if kex else "openssh"
    what = f"KexAlgorithms={kex}" if kex else "OpenSSH default kex (sntrup761x25519 on 9.2)"
    return measure(name, ["ip", "netns", "exec", fleet.netns, *xargs], len(fleet.addresses),
                   _count_lines, note=f"xargs -P {parallel}, strict host keys, {what}")


FABRIC = """
import sys
from fabric import ThreadingGroup
hosts = open(sys.argv[1]).read().split()
keys = {"key_filename": sys.argv[2], "look_for_keys": False, "allow_agent": False}
group = ThreadingGroup(*hosts, user="root", connect_timeout=30, connect_kwargs=keys)
results = group.run(open(sys.argv[3]).read(), hide=True, warn=True)
for conn, res in results.items():
    print(conn.host, getattr(res, "stdout", repr(res)).strip())
"""


def run_fabric(fleet: Fleet, parallel: int) -> Measure:
    (fleet.work / "fabric_driver.py").write_text(FABRIC)
    (fleet.work / "command").write_text(fleet.command)
    argv = ["ip", "netns", "exec", fleet.netns, sys.executable, str(fleet.work / "fabric_driver.py"),
            str(fleet.work / "addresses"), str(fleet.client_key), str(fleet.work / "command")]
    (fleet.work / "addresses").write_text("\n".join(fleet.addresses) + "\n")
    return measure("fabric", argv, len(fleet.addresses), _count_lines,
                   note="ThreadingGroup: a thread per host (no bound), AutoAddPolicy (fabric default)")


def run_ansible(fleet: Fleet, parallel: int, venv: Path) -> Measure | None:
    ansible = venv / "bin" / "ansible"
    if not ansible.exists():
        return None
    inventory = fleet.work / "ansible_inventory"
    inventory.write_text("[bench]\n" + "\n".join(fleet.addresses) + "\n")
    env = {"ANSIBLE_HOST_KEY_CHECKING": "True", "ANSIBLE_LOCAL_TEMP": str(fleet.work / "ansible-tmp"),
           "ANSIBLE_SSH_ARGS": f"-o ControlMaster=no -o UserKnownHostsFile={fleet.known_hosts} "
                               "-o GlobalKnownHostsFile=/dev/null -o BatchMode=yes",
           "ANSIBLE_NOCOLOR": "1", "ANSIBLE_DEPRECATION_WARNINGS": "False", "ANSIBLE_TIMEOUT": "30"}
    argv = ["ip", "netns", "exec", fleet.netns, str(ansible), "all", "-i", str(inventory), "-m", "raw",
            "-a", fleet.command, "-f", str(parallel), "-u", "root", "--private-key", str(fleet.client_key)]
    return measure("ansible", argv, len(fleet.addresses), _count_lines, env=env,
                   note=f"-m raw -f {parallel}, strict host keys, no ControlMaster")


def run_cumin(fleet: Fleet, parallel: int, venv: Path) -> Measure | None:
    cumin = venv / "bin" / "cumin"
    if not cumin.exists():
        return None
    config = fleet.work / "cumin.yaml"
    options = _ssh_options(fleet)
    pairs = [f"{options[i]} {options[i + 1]}" for i in range(0, len(options) - 2, 2)]
    config.write_text(json.dumps({
        "transport": "clustershell", "default_backend": "direct", "log_file": str(fleet.work / "cumin.log"),
        "clustershell": {"ssh_options": [*pairs, "-l root"], "fanout": parallel},
    }))
    nodes = ",".join(fleet.addresses)
    argv = ["ip", "netns", "exec", fleet.netns, str(cumin), "-c", str(config), "--force", "-x", "-o", "txt",
            f"D{{{nodes}}}", fleet.command]

    def count(text: str) -> int:
        return _count_lines(text)

    return measure("cumin", argv, len(fleet.addresses), count, note=f"clustershell fanout {parallel}")


# ------------------------------------------------------------------------------------------------
def report(results: list[Measure]) -> str:
    base = next((r for r in results if r.driver == "ipsec-kill"), None)
    lines = [f"{'driver':<11} {'hosts':>5} {'ok':>5} {'wall s':>8} {'hosts/s':>8} {'CPU ms/host':>11} "
             f"{'peak MiB':>8} {'wall x':>7} {'CPU x':>6}  note"]
    for r in results:
        wall_x = r.wall / base.wall if base else float("nan")
        cpu_x = r.cpu / base.cpu if base and base.cpu else float("nan")
        lines.append(f"{r.driver:<11} {r.hosts:>5} {r.confirmed:>5} {r.wall:>8.2f} {r.rate:>8.1f} "
                     f"{r.cpu_ms_per_host:>11.2f} {r.peak_rss / 2**20:>8.1f} {wall_x:>7.2f} {cpu_x:>6.2f}"
                     f"  {r.note}")
    lines.append("wall x / CPU x: the driver's figure divided by ipsec-kill's (>1 = ipsec-kill is better)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="simulated hosts (sshd instances)")
    parser.add_argument("--parallel", type=int, default=64, help="fan-out of openssh/ansible/cumin")
    parser.add_argument("--kill-parallel", type=int, default=256, help="ipsec-kill --parallel")
    parser.add_argument("--drivers", default=",".join(DRIVERS))
    parser.add_argument("--venv", type=Path, default=Path("/tmp/bench-venv"), help="where ansible/cumin are")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespace, sshd)")
    work = Path(tempfile.mkdtemp(prefix="ipsec-kill-bench-"))
    fleet = build(args.n, work)
    print(f"starting {args.n} sshd in netns {fleet.netns} ...", flush=True)
    t0 = time.monotonic()
    proc = start(fleet)
    print(f"  ready in {time.monotonic() - t0:.1f} s", flush=True)
    results: list[Measure] = []
    try:
        for driver in args.drivers.split(","):
            seed_policies(fleet)
            print(f"running {driver} ...", flush=True)
            result = _run(driver, fleet, args)
            if result is None:
                print(f"  {driver}: not installed (skipped)")
                continue
            results.append(result)
            print(f"  {result.confirmed}/{result.hosts} in {result.wall:.2f} s, "
                  f"{result.cpu_ms_per_host:.2f} ms CPU/host", flush=True)
    finally:
        stop(fleet, proc)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(report(results))
    if args.json:
        rows = [r.__dict__ | {"hosts_per_s": r.rate, "cpu_ms_per_host": r.cpu_ms_per_host} for r in results]
        args.json.write_text(json.dumps(rows, indent=2))


def _run(driver: str, fleet: Fleet, args: argparse.Namespace) -> Measure | None:
    if driver == "ipsec-kill":
        return run_ipsec_kill(fleet, args.kill_parallel)
    if driver == "openssh":
        return run_openssh(fleet, args.parallel)
    if driver == "openssh-x25519":
        return run_openssh(fleet, args.parallel, kex="curve25519-sha256")
    if driver == "fabric":
        return run_fabric(fleet, args.parallel)
    if driver == "ansible":
        return run_ansible(fleet, args.parallel, args.venv)
    if driver == "cumin":
        return run_cumin(fleet, args.parallel, args.venv)
    raise SystemExit(f"unknown driver {driver!r}; choose from {', '.join(DRIVERS)}")


if __name__ == "__main__":
    main()
