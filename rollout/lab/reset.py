"""Put lab hosts back to their boot state between tests: no faults, no IPsec config, SAs or latch."""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from rollout.lab.faults import clear_all
from rollout.lab.host import LabHost
from rollout.lab.lab import Lab

# Runs in the guest. /run/lab/machine is the machine's own / (read-only): the pristine legacy files.
# A host that is already clean is left alone (restarting charon costs seconds on a busy machine).
CLEAN_CHECK = """
/etc/lab/svc is-enabled && /etc/lab/svc status &&
[ -z "$(find /etc/swanctl/conf.d /etc/swanctl/x509 /etc/swanctl/private -mindepth 1)" ] &&
[ ! -e /etc/strongswan.d/zz-ipsec-rollout.conf ] && [ ! -e /etc/ipsec-rollout ] &&
[ ! -e /var/lib/ipsec-rollout ] && [ -z "$(ip xfrm state list nokeys)" ] &&
[ -z "$(ip xfrm policy list | grep -E 'dir (in|out|fwd)')" ] &&
cmp -s "/run/lab/state/hosts/$(hostname)/puppet/cert.pem" \
       "/var/lib/puppet/ssl/certs/$(cat /etc/lab/fqdn).pem" &&
[ -z "$(swanctl --list-conns 2>/dev/null)" ] && exit 0
"""
RESET_SCRIPT = CLEAN_CHECK + """
/etc/lab/svc enable
rm -f /etc/swanctl/conf.d/*.conf /etc/strongswan.d/zz-ipsec-rollout.conf
rm -f /etc/swanctl/x509/* /etc/swanctl/x509ca/* /etc/swanctl/private/* /etc/swanctl/x509crl/*
rm -rf /etc/ipsec-rollout /var/lib/ipsec-rollout
for f in /etc/ipsec.conf /etc/ipsec.secrets; do
    if [ -e "/run/lab/machine$f" ]; then cp "/run/lab/machine$f" "$f"; else rm -f "$f"; fi
done
cp "/run/lab/state/hosts/$(hostname)/puppet/cert.pem" "/var/lib/puppet/ssl/certs/$(cat /etc/lab/fqdn).pem"
/etc/lab/svc stop
ip xfrm state flush
ip xfrm policy flush
/etc/lab/svc start
"""


def reset_host(host: LabHost) -> None:
    """Restart charon with nothing loaded, flush the kernel's SAs and policies, drop rollout state."""
    host.run(RESET_SCRIPT, timeout=90.0, check=True)


def reset(lab: Lab, names: Iterable[str] | None = None) -> None:
    """Clear every fault, then reset each host (in parallel)."""
    hosts = [lab.host(n) for n in names] if names is not None else list(lab.hosts)
    clear_all(lab, [h.short for h in hosts])
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(hosts)))) as pool:
        list(pool.map(reset_host, hosts))
