#!/bin/sh
# /etc/lab/svc: the lab's stand-in for systemd + Puppet for charon.
# start|stop|restart|enable|disable|status|is-enabled. The supervisor (/etc/lab/run-charon, respawned by
# busybox init) restarts charon whenever it is not running, unless `disable` was called.
DISABLED=/etc/lab/charon.disabled

running() { pgrep -x charon >/dev/null 2>&1; }

wait_ready() {
    tries=0
    while [ "$tries" -lt 60 ]; do
        if running && swanctl --stats >/dev/null 2>&1; then return 0; fi
        sleep 0.5
        tries=$((tries + 1))
    done
    echo "charon did not come up within 30 s" >&2
    return 1
}

stop() {
    pkill -TERM -x charon 2>/dev/null
    tries=0
    while running && [ "$tries" -lt 20 ]; do sleep 0.5; tries=$((tries + 1)); done
    if running; then pkill -KILL -x charon 2>/dev/null; sleep 0.5; fi
    return 0
}

case "$1" in
    start)
        if [ -e "$DISABLED" ]; then
            echo "charon is disabled (masked): run '/etc/lab/svc enable' first" >&2
            exit 1
        fi
        wait_ready ;;
    stop) stop ;;
    restart) stop; [ -e "$DISABLED" ] && exit 0; wait_ready ;;
    enable) rm -f "$DISABLED" ;;
    disable) touch "$DISABLED" ;;
    status) running ;;
    is-enabled) [ ! -e "$DISABLED" ] ;;
    *) echo "usage: $0 start|stop|restart|enable|disable|status|is-enabled" >&2; exit 2 ;;
esac
