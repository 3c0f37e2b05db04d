#!/bin/sh
# Respawned by busybox init: applies the faults the machine asks for through this host's control dir
# (<state>/hosts/<short>/ctl on the machine, seen here through hostfs). These are the faults that cannot
# be set or cleared over SSH because they break SSH itself.
CTL=/run/lab/state/hosts/$(hostname)/ctl
while :; do
    if [ -e "$CTL/ssh-down" ]; then
        [ -e /run/lab/sshd.off ] || { touch /run/lab/sshd.off; pkill -KILL -x sshd; }
    elif [ -e /run/lab/sshd.off ]; then
        rm -f /run/lab/sshd.off
    fi
    if [ -e "$CTL/ssh-hang" ]; then
        [ -e /run/lab/sshd.hung ] || touch /run/lab/sshd.hung
        pkill -STOP -x sshd
    elif [ -e /run/lab/sshd.hung ]; then
        rm -f /run/lab/sshd.hung
        pkill -CONT -x sshd
    fi
    sleep 1
done
