#!/bin/sh
# Respawned by busybox init: keeps sshd running unless the lab's ssh-down fault is set (see labd).
if [ -e /run/lab/sshd.off ]; then
    sleep 1
    exit 0
fi
/usr/sbin/sshd -D -e -f /etc/ssh/sshd_config >>/var/log/sshd.log 2>&1
sleep 1
