#!/bin/sh
# ipsec-kill: turn host-to-host IPsec OFF on this host, and keep it off until `rearm`.
#
# Self-contained POSIX sh: depends on nothing the rollout installed. Run as root, in one exec:
#   sh -c "$(cat kill.sh)" ipsec-kill kill  '<who>' '<reason>' '<run-id>'
#   sh -c "$(cat kill.sh)" ipsec-kill rearm '<who>' '<reason>' '<run-id>'
# (or `sh kill.sh kill who reason run` from a console). Prints ONE result line on stdout:
#   IPSEC-KILL result=killed|already-clean|failed|rearmed states=N policies=N charon=N latched=0|1 ...
# Every step is bounded (`timeout`); no key material is ever printed (`ip xfrm state count` only).
# Exit status: 0 = host confirmed clean (or rearmed), 1 = verification failed, 2 = usage.

set -u
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/opt/puppetlabs/bin
export PATH LC_ALL=C

MODE=${1:-kill}
WHO=${2:-unknown}
REASON=${3:-ipsec-kill}
RUN=${4:-}
LATCH_DIR=/etc/ipsec-rollout
LATCH=$LATCH_DIR/latched
STATE=$LATCH_DIR/kill-state        # what the first kill changed (so rearm restores only that)
UNITS="strongswan strongswan-starter strongswan-swanctl ipsec"
ERRS=""

have() { command -v "$1" >/dev/null 2>&1; }
note() { ERRS="${ERRS:+$ERRS,}$1"; }
bounded() {  # bounded SECONDS CMD...: never let one step hang the kill
    _s=$1; shift
    if have timeout; then timeout -k 2 "$_s" "$@"; else "$@"; fi
}
quiet() { "$@" </dev/null >/dev/null 2>&1; }
json_escape() { printf '%s' "$1" | tr -d '\000-\037' | sed 's/\\/\\\\/g; s/"/\\"/g'; }

manager() {
    if [ -x /etc/lab/svc ]; then echo lab
    elif [ -d /run/systemd/system ] && have systemctl; then echo systemd
    elif [ -d /etc/init ] && have initctl && [ -f /etc/init/strongswan.conf ]; then echo upstart
    elif [ -x /etc/init.d/strongswan ] || [ -x /etc/init.d/ipsec ]; then echo sysvinit
    else echo none
    fi
}

# ---- measurements -------------------------------------------------------------------------------
charon_pids() {  # /proc scan: works without ps/pgrep (ps fails inside UML)
    for _d in /proc/[0-9]*; do
        _c=""
        read -r _c 2>/dev/null <"$_d/comm" || continue
        case $_c in charon|charon-systemd|starter) echo "${_d#/proc/}" ;; esac
    done
}
count_charon() { charon_pids | wc -l | tr -d ' '; }
count_states() {
    _n=$(bounded 5 ip xfrm state count 2>/dev/null | sed -n 's/.*SAD count \([0-9]*\).*/\1/p')
    echo "${_n:--1}"
}
count_policies() {  # only dir in/out/fwd policies; charon's per-socket bypass policies do not count
    _o=$(bounded 5 ip xfrm policy list 2>/dev/null) || { echo -1; return; }
    printf '%s\n' "$_o" | grep -cE '^[[:space:]]*dir (in|out|fwd) '
}
default_policy() {
    _o=$(bounded 5 ip xfrm policy getdefault 2>/dev/null) || { echo unknown; return; }
    case $_o in *block*) echo block ;; *) echo accept ;; esac
}

# ---- latch --------------------------------------------------------------------------------------
write_latch() {
    mkdir -p "$LATCH_DIR" && chmod 0755 "$LATCH_DIR" || { note latch-dir; return 1; }
    [ -f "$LATCH" ] && return 0   # keep the first kill's record (who/when/why)
    _when=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    printf '{"who": "%s", "when": "%s", "reason": "%s", "run": "%s", "tool": "ipsec-kill"}\n' \
        "$(json_escape "$WHO")" "$_when" "$(json_escape "$REASON")" "$(json_escape "$RUN")" \
        >"$LATCH.tmp" && mv -f "$LATCH.tmp" "$LATCH" || { note latch-write; return 1; }
}

record() { [ -f "$STATE.new" ] && echo "$1" >>"$STATE.new"; }

disable_service() {  # $1 = manager; records what it changed, once (first kill only)
    if [ -f "$STATE" ]; then _first=0; rm -f "$STATE.new"; else _first=1; : >"$STATE.new"; fi
    case $1 in
        lab) quiet bounded 10 /etc/lab/svc disable || note svc-disable ;;
        systemd) for _u in $UNITS; do disable_unit "$_u.service"; done ;;
        upstart) [ -f /etc/init/strongswan.override ] || record "upstart-override"
                 echo manual >/etc/init/strongswan.override || note svc-disable ;;
        sysvinit) for _u in strongswan ipsec; do
                      [ -x "/etc/init.d/$_u" ] || continue
                      if have update-rc.d; then quiet bounded 10 update-rc.d "$_u" disable && record "sysv $_u"
                      elif have chkconfig; then quiet bounded 10 chkconfig "$_u" off && record "sysv $_u"
                      fi
                  done ;;
    esac
    if have puppet && [ -f "$STATE.new" ]; then
        _lock=$(bounded 20 puppet config print agent_disabled_lockfile 2>/dev/null </dev/null)
        [ -n "$_lock" ] && [ -f "$_lock" ] || record "puppet"
    fi
    if have puppet; then
        quiet bounded 30 puppet agent --disable "ipsec-kill by $WHO: $REASON" || note puppet-disable
    fi
    [ "$_first" = 1 ] && mv -f "$STATE.new" "$STATE"
    return 0
}

disable_unit() {
    _load=$(bounded 10 systemctl show -p LoadState --value "$1" 2>/dev/null </dev/null)
    case $_load in loaded|masked) ;; *) return 0 ;; esac
    if [ "$_load" = loaded ]; then
        _en=$(bounded 10 systemctl is-enabled "$1" 2>/dev/null </dev/null)
        record "systemd $1 ${_en:-unknown}"
    fi
    quiet bounded 15 systemctl disable "$1"
    quiet bounded 15 systemctl mask "$1" || note "mask-$1"
}

# ---- stop ---------------------------------------------------------------------------------------
terminate_sas() {  # polite: tell peers (IKE DELETE), never wait for their answer
    if have swanctl && [ -S /var/run/charon.vici ]; then
        _ids=$(bounded 5 swanctl --list-sas --noblock --raw 2>/dev/null </dev/null |
               sed -n 's/^list-sa event {[^ ]* {uniqueid=\([0-9]*\) .*/\1/p')
        _t0=$(date +%s)
        for _id in $_ids; do
            [ $(( $(date +%s) - _t0 )) -lt 10 ] || { note terminate-budget; break; }
            quiet bounded 3 swanctl --terminate --ike-id "$_id" --force
        done
    fi
    if have ipsec && [ -S /var/run/charon.ctl ]; then quiet bounded 15 ipsec stop; fi
}

stop_service() {
    case $1 in
        lab) quiet bounded 15 /etc/lab/svc stop ;;
        systemd) for _u in $UNITS; do quiet bounded 20 systemctl stop "$_u.service"; done ;;
        upstart) quiet bounded 20 initctl stop strongswan ;;
        sysvinit) for _u in strongswan ipsec; do
                      [ -x "/etc/init.d/$_u" ] && quiet bounded 20 "/etc/init.d/$_u" stop
                  done ;;
    esac
    return 0
}

kill_leftovers() {  # last resort, bounded: TERM, wait up to 3 s, KILL, wait up to 2 s
    _pids=$(charon_pids)
    for _f in /run/charon.pid /var/run/charon.pid /run/starter.charon.pid /var/run/starter.charon.pid; do
        [ -f "$_f" ] && read -r _p <"$_f" 2>/dev/null && [ -d "/proc/$_p" ] && _pids="$_pids $_p"
    done
    [ -n "$(echo "$_pids" | tr -d ' ')" ] || return 0
    note charon-killed
    kill -TERM $_pids 2>/dev/null
    wait_charon 30 && return 0
    kill -KILL $(charon_pids) 2>/dev/null
    wait_charon 20
}

wait_charon() {  # up to $1 tenths of a second
    _i=0
    while [ "$_i" -lt "$1" ]; do
        [ "$(count_charon)" = 0 ] && return 0
        sleep 0.1 2>/dev/null || sleep 1
        _i=$((_i + 1))
    done
    return 1
}

flush_xfrm() {  # policies first: never a window with a policy and no state (blackhole)
    quiet bounded 10 ip xfrm policy flush || note policy-flush
    quiet bounded 10 ip xfrm state flush || note state-flush
    quiet bounded 10 ip -6 xfrm policy flush
    quiet bounded 10 ip -6 xfrm state flush
}

# ---- modes --------------------------------------------------------------------------------------
do_kill() {
    mgr=$(manager)
    b_states=$(count_states); b_pol=$(count_policies); b_charon=$(count_charon)
    dflt=$(default_policy)
    write_latch
    disable_service "$mgr"
    if [ "$dflt" = block ]; then
        # Flushing policies with a default-block xfrm policy would cut ALL traffic (SSH included).
        note xfrm-default-block
    else
        terminate_sas
        stop_service "$mgr"
        kill_leftovers
        flush_xfrm
    fi
    states=$(count_states); pol=$(count_policies); charon=$(count_charon)
    latched=0; [ -f "$LATCH" ] && latched=1
    if [ "$states" = 0 ] && [ "$pol" = 0 ] && [ "$charon" = 0 ] && [ "$latched" = 1 ]; then
        if [ "$b_states" = 0 ] && [ "$b_pol" = 0 ] && [ "$b_charon" = 0 ]; then result=already-clean
        else result=killed; fi
        rc=0
    else
        result=failed; rc=1
    fi
    echo "IPSEC-KILL result=$result states=$states policies=$pol charon=$charon latched=$latched" \
         "before_states=$b_states before_policies=$b_pol before_charon=$b_charon manager=$mgr" \
         "default=$dflt errors=${ERRS:-none} version=1"
    return $rc
}

do_rearm() {
    mgr=$(manager)
    case $mgr in
        lab) quiet bounded 10 /etc/lab/svc enable || note svc-enable ;;
        systemd) for _u in $UNITS; do
                     _load=$(bounded 10 systemctl show -p LoadState --value "$_u.service" 2>/dev/null </dev/null)
                     [ "$_load" = masked ] && { quiet bounded 15 systemctl unmask "$_u.service" || note unmask; }
                 done
                 [ -f "$STATE" ] && grep '^systemd ' "$STATE" | while read -r _ _u _en; do
                     [ "$_en" = enabled ] && quiet bounded 15 systemctl enable "$_u"
                 done ;;
        upstart) rm -f /etc/init/strongswan.override ;;
        sysvinit) [ -f "$STATE" ] && grep '^sysv ' "$STATE" | while read -r _ _u; do
                      if have update-rc.d; then quiet bounded 10 update-rc.d "$_u" enable
                      elif have chkconfig; then quiet bounded 10 chkconfig "$_u" on; fi
                  done ;;
    esac
    if have puppet && { [ ! -f "$STATE" ] || grep -q '^puppet$' "$STATE"; }; then
        quiet bounded 30 puppet agent --enable || note puppet-enable
    fi
    rm -f "$LATCH" "$STATE" || note latch-remove
    latched=0; [ -f "$LATCH" ] && latched=1
    result=rearmed; rc=0
    [ "$latched" = 0 ] || { result=failed; rc=1; }
    echo "IPSEC-KILL result=$result states=$(count_states) policies=$(count_policies)" \
         "charon=$(count_charon) latched=$latched manager=$mgr errors=${ERRS:-none} version=1"
    return $rc
}

main() {
    [ "$(id -u)" = 0 ] || { echo "IPSEC-KILL result=failed errors=not-root version=1"; return 1; }
    case $MODE in
        kill) do_kill ;;
        rearm) do_rearm ;;
        *) echo "IPSEC-KILL result=failed errors=usage version=1"; return 2 ;;
    esac
}

main </dev/null
