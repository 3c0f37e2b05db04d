#!/bin/sh
# PID 1 of an ipsec-rollout lab host (User-Mode-Linux guest).
#
# The root file system is the machine's own / through hostfs, read-only. We give the guest private,
# writable /etc, /var (overlay: lower = the machine's dir, upper = tmpfs) and a fresh tmpfs /root, then
# configure this host from its directory in the lab state dir (mounted through hostfs) and hand over to
# busybox init, which keeps sshd, charon and the lab control loop running.
# Kernel arguments read here: lab.state=<state dir on the machine> lab.host=<short name>.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
umask 022

log() { echo "lab-init: $*"; }

NOAVX_HWCAPS=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-AVX_Fast_Unaligned_Load
NOAVX_OPENSSL="~0x1000000000000000:0"

arg() {
    for word in $(cat /proc/cmdline); do
        case "$word" in "$1"=*) echo "${word#*=}"; return 0 ;; esac
    done
    return 1
}

mount_base() {
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
    mount -t tmpfs -o mode=0755,size=48m tmpfs /run
    mount -t tmpfs -o mode=1777 tmpfs /tmp
    # The kernel mounts devtmpfs on /dev itself (CONFIG_DEVTMPFS_MOUNT); mount it only if it did not.
    grep -q ' /dev devtmpfs ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
    mkdir -p /dev/pts /dev/shm
    mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
    mount -t tmpfs -o mode=1777 tmpfs /dev/shm
}

overlay() {
    mkdir -p "/run/ov/$1/upper" "/run/ov/$1/work"
    mount -t overlay overlay -o "lowerdir=/$1,upperdir=/run/ov/$1/upper,workdir=/run/ov/$1/work" "/$1"
}

mount_state() {
    mkdir -p /run/lab/state /run/lab/machine
    mount -t hostfs -o "$STATE" hostfs /run/lab/state
    # The machine's pristine /, for `lab reset` to restore files a test replaced in /etc.
    mount -r -t hostfs -o / hostfs /run/lab/machine
}

setup_modprobe() {
    # The machine has no /lib/modules; the UML kernel's modules live in /usr/lib/uml/modules. A wrapper
    # points modprobe (ours and the kernel's on-demand loads) at a tmpfs root holding them.
    version=$(uname -r)
    mkdir -p "/run/lab/modroot/lib/modules/$version"
    mount --bind "/usr/lib/uml/modules/$version" "/run/lab/modroot/lib/modules/$version"
    # The kernel's on-demand loads run it without our environment: it exports the AVX switch itself.
    {
        echo '#!/bin/sh'
        if [ -n "$NOAVX" ]; then echo "export GLIBC_TUNABLES='$GLIBC_TUNABLES' OPENSSL_ia32cap='$OPENSSL_ia32cap'"; fi
        echo 'exec /sbin/modprobe -d /run/lab/modroot "$@"'
    } > /run/lab/modprobe
    chmod 0755 /run/lab/modprobe
    echo /run/lab/modprobe > /proc/sys/kernel/modprobe
    /run/lab/modprobe overlay || log "modprobe overlay failed"
}

load_modules() {
    for module in xfrm_user esp4 esp6 authenc gcm seqiv echainiv ghash-generic \
                  ip_tables iptable_filter ip6_tables ip6table_filter xt_statistic xt_tcpudp sch_netem; do
        /run/lab/modprobe "$module" 2>/dev/null || log "modprobe $module failed"
    done
}

setup_identity() {
    hostname "$LAB_SHORT"
    echo "$LAB_SHORT" > /etc/hostname
    mkdir -p /etc/lab
    echo "$LAB_FQDN" > /etc/lab/fqdn
    cp "$HOSTDIR/hosts" /etc/hosts
    rm -f /etc/resolv.conf
    : > /etc/resolv.conf
}

setup_network() {
    ip link set lo up
    ip link set vec0 name eth0
    ip link set eth0 up
    ip addr add "$LAB_IPV4/$LAB_PREFIX4" dev eth0
    sysctl -q -w net.ipv6.conf.eth0.accept_dad=0 2>/dev/null
    ip -6 addr add "$LAB_IPV6/$LAB_PREFIX6" dev eth0 nodad
}

setup_root_home() {
    mount -t tmpfs -o mode=0700 tmpfs /root
    mkdir -m 0700 /root/.ssh
    cp "$HOSTDIR/authorized_keys" /root/.ssh/authorized_keys
    chmod 0600 /root/.ssh/authorized_keys
    # A plain shell profile: the machine's root .bashrc runs pyenv, far too slow inside a guest.
    printf 'PS1="\\h# "\n' > /root/.profile
    : > /root/.bashrc
}

setup_sshd() {
    rm -f /etc/ssh/ssh_host_*
    cp "$HOSTDIR/ssh_host_ed25519_key" "$HOSTDIR/ssh_host_ed25519_key.pub" /etc/ssh/
    chmod 0600 /etc/ssh/ssh_host_ed25519_key
    mkdir -p -m 0755 /run/sshd
    cat > /etc/ssh/sshd_config <<CONF
Port 22
ListenAddress 0.0.0.0
ListenAddress ::
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile /root/.ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
PrintMotd no
PrintLastLog no
MaxStartups 100:30:200
MaxSessions 50
PidFile /run/sshd.pid
Subsystem sftp /usr/lib/openssh/sftp-server
CONF
    if [ -e /etc/lab/noavx ]; then
        echo "SetEnv GLIBC_TUNABLES=glibc.cpu.hwcaps=$NOAVX_HWCAPS OPENSSL_ia32cap=$NOAVX_OPENSSL" \
            >> /etc/ssh/sshd_config
    fi
}

setup_puppet_certs() {
    ssl=/var/lib/puppet/ssl
    mkdir -p "$ssl/certs" "$ssl/private_keys"
    chmod 0750 "$ssl/private_keys"
    cp "$HOSTDIR/puppet/cert.pem" "$ssl/certs/$LAB_FQDN.pem"
    cp "$HOSTDIR/puppet/ca.pem" "$ssl/certs/ca.pem"
    cp "$HOSTDIR/puppet/key.pem" "$ssl/private_keys/$LAB_FQDN.pem"
    chmod 0600 "$ssl/private_keys/$LAB_FQDN.pem"
}

setup_strongswan() {
    # Start clean whatever the machine's own /etc holds: no connections, no credentials, no rollout state.
    rm -rf /etc/swanctl /etc/ipsec-rollout /var/lib/ipsec-rollout /etc/strongswan.d/zz-ipsec-rollout.conf
    for dir in conf.d x509 x509ca x509aa x509ocsp x509crl x509ac pubkey private rsa ecdsa bliss pkcs8 pkcs12; do
        mkdir -p "/etc/swanctl/$dir"
    done
    chmod 0700 /etc/swanctl/private
    printf 'include conf.d/*.conf\n' > /etc/swanctl/swanctl.conf
    cat > /etc/strongswan.d/lab-logging.conf <<CONF
charon {
    filelog {
        lab {
            path = /var/log/charon.log
            time_format = %b %e %T
            default = 1
            flush_line = yes
        }
    }
}
CONF
}

setup_supervision() {
    for script in svc run-charon run-sshd labd; do
        cp "$STATE/guest/$script.sh" "/etc/lab/$script"
        chmod 0755 "/etc/lab/$script"
    done
    cat > /etc/inittab <<CONF
::respawn:/etc/lab/run-sshd
::respawn:/etc/lab/run-charon
::respawn:/etc/lab/labd
CONF
}

main() {
    mount_base
    # On AMX hosts the kernel runs under xstate_guard.py and cannot restore AVX registers: keep every
    # guest process (through the environment, and sshd's sessions through SetEnv) off AVX.
    NOAVX=""
    if arg lab.noavx >/dev/null; then
        NOAVX=1
        GLIBC_TUNABLES=glibc.cpu.hwcaps=$NOAVX_HWCAPS
        OPENSSL_ia32cap=$NOAVX_OPENSSL
        export GLIBC_TUNABLES OPENSSL_ia32cap
    fi
    STATE=$(arg lab.state) || { log "no lab.state= argument"; exec /bin/sh; }
    LAB_SHORT=$(arg lab.host) || { log "no lab.host= argument"; exec /bin/sh; }
    mount_state
    setup_modprobe
    overlay etc
    overlay var
    STATE=/run/lab/state
    HOSTDIR=$STATE/hosts/$LAB_SHORT
    # shellcheck disable=SC1090
    . "$HOSTDIR/host.env"
    mkdir -p /etc/lab
    if [ -n "$NOAVX" ]; then : > /etc/lab/noavx; fi
    load_modules
    setup_identity
    setup_network
    setup_root_home
    setup_sshd
    setup_puppet_certs
    setup_strongswan
    setup_supervision
    log "ready to hand over to busybox init ($LAB_FQDN $LAB_IPV4 $LAB_IPV6)"
    exec /bin/busybox init
}

main
