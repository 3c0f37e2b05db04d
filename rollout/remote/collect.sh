#!/bin/sh
# ipsec-rollout health collector: READ-ONLY, POSIX sh, needs nothing from the tool.
#
# Run on a host (over SSH by `ipsec-rollout check/status`, or by hand: `sudo sh collect.sh`).
# Prints sections, each introduced by a line `@@<name>`; rollout/health.py parses them:
#   @@meta           format=, host=, time= (epoch seconds)
#   @@stack          swanctl | stroke | none
#   @@charon         running=yes|no, vici=yes|no (swanctl --stats answered)
#   @@latch          latched=yes|no [, marker=<the marker file's content on one line>]
#   @@swanctl        swanctl --list-sas --noblock --pretty      (swanctl stack)
#   @@swanctl-conns  swanctl --list-conns --pretty              (swanctl stack)
#   @@statusall      stroke statusall-nb / ipsec statusall     (stroke stack, Wikimedia style)
#   @@xfrm-state     ip xfrm state list nokeys                  (never key material)
#   @@xfrm-policy    ip xfrm policy list
#   @@xfrm-stat      /proc/net/xfrm_stat
#   @@exit           one `<section> <exit code>` line per command run above
# Diagnostics go to stderr; swanctl's harmless "plugin '...': failed to load" lines are dropped.

PATH=/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin
LC_ALL=C
export PATH LC_ALL
LATCH=/etc/ipsec-rollout/latched
LIMIT=${IPSEC_ROLLOUT_COLLECT_TIMEOUT:-20}   # seconds per command
EXITS=""

drop_noise() {
    grep -v "^plugin '[^']*': failed to load" || true
}

# run SECTION CMD...: print `@@SECTION`, the command's stdout, its filtered stderr to our stderr,
# and remember its exit code for the @@exit section (POSIX sh has no pipefail: fd 4 carries it).
run() {
    name=$1
    shift
    echo "@@$name"
    { rc=$( { { "$@" 2>&1 1>&3 3>&- 4>&-; echo "$?" >&4; } | drop_noise >&2 3>&- 4>&-; } 4>&1 ); } 3>&1
    EXITS="$EXITS$name $rc
"
}

has() {
    command -v "$1" >/dev/null 2>&1
}

# bounded CMD...: a wedged charon must not hang the collector (or the monitoring that waits on it).
bounded() {
    if has timeout; then timeout -k 2 "$LIMIT" "$@"; else "$@"; fi
}

yes_no() {
    if "$@" >/dev/null 2>&1; then echo yes; else echo no; fi
}

charon_running() {
    # `ps` fails inside UML guests; pgrep works everywhere we care about.
    pgrep -x charon >/dev/null 2>&1 || pgrep -x charon-systemd >/dev/null 2>&1
}

vici_answers() {
    has swanctl && bounded swanctl --stats >/dev/null 2>&1
}

stroke_statusall() {
    if [ -x /usr/lib/ipsec/stroke ]; then
        bounded /usr/lib/ipsec/stroke statusall-nb   # non-blocking, as Wikimedia's check did
    else
        bounded ipsec statusall
    fi
}

xfrm_state() {
    # `nokeys` exists since iproute2 5.1. Older ip prints the keys: scrub any long hex run on the
    # host itself so that key material never leaves it (SPIs and counters are at most 16 hex digits).
    if bounded ip xfrm state list nokeys 2>/dev/null; then
        return 0
    fi
    echo "ip xfrm state: nokeys unsupported, scrubbing" >&2
    bounded ip xfrm state list | sed -e 's/0x[0-9a-fA-F]\{17,\}/<<Keys hidden>>/g' -e '/^[[:space:]]*[0-9a-fA-F]\{17,\}/d'
}

detect_stack() {
    # vici lists every IKE_SA whatever loaded its config, so swanctl wins wherever it is installed;
    # stroke (`ipsec statusall`) is for hosts without it (Debian jessie, Ubuntu trusty).
    # IPSEC_ROLLOUT_STACK=stroke|swanctl forces one (tests, odd hosts).
    if [ -n "${IPSEC_ROLLOUT_STACK:-}" ]; then
        echo "$IPSEC_ROLLOUT_STACK"
    elif has swanctl; then
        echo swanctl
    elif has ipsec; then
        echo stroke
    else
        echo none
    fi
}

echo "@@meta"
echo "format=1"
echo "host=$(uname -n)"
echo "time=$(date +%s)"

STACK=$(detect_stack)
echo "@@stack"
echo "$STACK"

echo "@@charon"
echo "running=$(yes_no charon_running)"
echo "vici=$(yes_no vici_answers)"

echo "@@latch"
if [ -e "$LATCH" ]; then
    echo "latched=yes"
    echo "marker=$(head -c 1000 "$LATCH" 2>/dev/null | tr '\n|' '  ')"
else
    echo "latched=no"
fi

case $STACK in
    swanctl)
        run swanctl bounded swanctl --list-sas --noblock --pretty
        run swanctl-conns bounded swanctl --list-conns --pretty
        ;;
    stroke)
        run statusall stroke_statusall
        ;;
esac

if has ip; then
    run xfrm-state xfrm_state
    run xfrm-policy bounded ip xfrm policy list
fi
if [ -r /proc/net/xfrm_stat ]; then
    run xfrm-stat cat /proc/net/xfrm_stat
fi

echo "@@exit"
printf '%s' "$EXITS"
exit 0
