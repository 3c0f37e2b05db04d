"""What building asyncssh connection options costs per connection, algorithm patterns vs lists.

`rollout.sshasync` builds one `SSHClientConnectionOptions` per connection and asyncssh builds a second
from it, so this cost is paid twice per host by `ipsec-kill`. Side by side: the "^a,b" patterns
(expanded by asyncssh on every build) and the pre-expanded lists `rollout.sshasync` passes.

    python bench/ssh_options.py [--n 2000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import asyncssh

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rollout import sshasync


def build(n: int, kex: object, ciphers: object) -> float:
    """Client CPU seconds per options build (process time), averaged over n builds."""
    client = asyncssh.generate_private_key("ssh-ed25519")
    host = asyncssh.generate_private_key("ssh-ed25519").convert_to_public()
    began = time.process_time()
    for _ in range(n):
        options = asyncssh.SSHClientConnectionOptions(
            username="root", known_hosts=([host], [], []), client_keys=[client], agent_path=None,
            config=[], x509_trusted_certs=None, kex_algs=kex, encryption_algs=ciphers,
            compression_algs=None, login_timeout=10)
        asyncssh.SSHClientConnectionOptions(options, host="198.18.0.1", port=22)  # asyncssh's own copy
    return (time.process_time() - began) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="builds per variant")
    args = parser.parse_args()
    kex, ciphers = sshasync._algorithms()
    rows = []
    variants = (("patterns (^a,b)", sshasync._KEX, sshasync._CIPHERS), ("lists (sshasync)", kex, ciphers))
    for label, k, c in variants:
        build(50, k, c)  # warm caches
        rows.append((label, min(build(args.n, k, c) for _ in range(3))))
    base = rows[0][1]
    print(f"{'options built as':<18} {'CPU ms/connection':>18} {'x patterns':>11}")
    for label, seconds in rows:
        print(f"{label:<18} {seconds * 1000:>18.3f} {seconds / base:>11.2f}")
    print("(two builds per connection: ours and asyncssh's copy; best of 3 runs)")


if __name__ == "__main__":
    main()
