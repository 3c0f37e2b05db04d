#!/bin/sh
# Respawned by busybox init: (re)starts charon unless /etc/lab/svc disable was called.
if [ -e /etc/lab/charon.disabled ] || pgrep -x charon >/dev/null 2>&1; then
    sleep 1
    exit 0
fi
rm -f /run/charon.pid /run/charon.vici /run/charon.ctl
/usr/lib/ipsec/charon >>/var/log/charon.out 2>&1
sleep 1
