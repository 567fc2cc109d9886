#!/usr/bin/env bash
# systemd-rig.sh: boot a real systemd manager as PID 1 of private namespaces, to run the unit
# templates of systemd/ under it (used by tests/systemd.rs; usable by hand).
#
#   systemd-rig.sh check                      can this machine run the rig? (exit 77: no, why)
#   systemd-rig.sh prepare WORKDIR BINARY PORT [FDSTORE_PORT]
#                                             WORKDIR/units: the templates + rig drop-ins (port,
#                                             log file); WORKDIR/bin/handover-hello: BINARY.
#                                             With FDSTORE_PORT, also
#                                             handover-hello-fdstore.service, binding that port
#                                             (not started by the rig: `systemctl start` it)
#   systemd-rig.sh prepare-axum WORKDIR BINARY WEB_PORT ADMIN_PORT
#                                             the same for the axum example's units
#                                             (handover-axum.service and its two sockets, web
#                                             and admin); WORKDIR/bin/handover-axum: BINARY.
#                                             May be combined with prepare in one WORKDIR
#   systemd-rig.sh prepare-tls WORKDIR BINARY WEB_PORT HEALTH_PORT CERT KEY
#                                             handover-tls.service: the tls example binding
#                                             both ports, its sockets and TLS ticket keys in the
#                                             fd store; WORKDIR/bin/handover-tls: BINARY
#   systemd-rig.sh boot WORKDIR               runs the manager in the foreground; it dies with
#                                             the calling process (for a test that spawns it)
#   systemd-rig.sh start WORKDIR              boot in the background, then `wait`
#   systemd-rig.sh wait WORKDIR [SECONDS]     until `systemctl is-system-running` says running
#                                             (or degraded); prints the manager's host pid
#                                             ($RIG_BOOT_PID: the boot's pid, to fail fast)
#   systemd-rig.sh exec WORKDIR|PID CMD...    runs CMD inside (nsenter: mount, pid, uts, ipc)
#   systemd-rig.sh stop WORKDIR               SIGKILL to the namespace's PID 1, then checks that
#                                             nothing is left and the host was not touched
#   systemd-rig.sh verify BINARY UNIT...      systemd-analyze verify, BINARY at every
#                                             /usr/local/bin/NAME path the units' ExecStart=
#                                             name (private mount namespace: the host's
#                                             /usr/local/bin is untouched)
#   systemd-rig.sh security UNIT              systemd-analyze security --offline=yes
#
# Example, by hand (as root, from the repository root):
#   cargo build --example hello
#   w=$(mktemp -d); tests/systemd-rig.sh prepare "$w" target/debug/examples/hello 8877
#   pid=$(tests/systemd-rig.sh start "$w")
#   curl -si http://127.0.0.1:8877/; tests/systemd-rig.sh exec "$w" systemctl reload handover-hello
#   tests/systemd-rig.sh exec "$w" systemctl status handover-hello; cat "$w/log/handover-hello.log"
#   tests/systemd-rig.sh stop "$w"
#
# Isolation. A system manager booted naively runs the host's boot units: its tmpfiles step
# empties the host's /tmp, it sets the hostname, sysctls, and so on. Here:
#   - PID, mount, UTS and IPC namespaces (unshare), and a cgroup namespace rooted in a cgroup
#     of our own (created under ours in the host's cgroup2 hierarchy, removed by `stop`). The
#     network namespace is shared on purpose: tests connect to the socket units from outside.
#   - Fresh tmpfs on /run, /tmp, /var/tmp and /dev/shm; the host's / and /sys, /proc/sys and
#     /proc/sysrq-trigger are read-only inside, so the manager cannot write to the host's
#     files (machine-id, presets, sysctls) even by mistake.
#   - The unit search path is only /run/systemd/system (SYSTEMD_UNIT_PATH), which holds the
#     units under test, a target of our own that pulls only their sockets, and empty stand-ins
#     for the targets their default dependencies name (sysinit.target, ...). No generators
#     run. `container=handover-test` is in the manager's environment, so it behaves as in a
#     container (skips hardware, hwclock, and the units that are host-only).
#   - `stop` SIGKILLs the namespace's PID 1 (by pid, checking it is still ours), which kills
#     every process of the PID namespace; then it checks that no process of that namespace is
#     left, removes the cgroups, and checks that a canary file created in the host's /tmp
#     before the boot is intact, and that the hostname and a sysctl the manager would set are
#     unchanged. `boot` (what tests use) also ties the manager's life to its parent: if the
#     test process dies, the whole namespace is killed (PR_SET_PDEATHSIG + unshare
#     --kill-child).
#
# Needs: root; bash, coreutils, findutils, sed; util-linux (unshare, nsenter, setpriv,
# setsid), mount, bsdutils (script); systemd (tested with 252); a writable cgroup2 hierarchy
# (/sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid host); Linux >= 5.3. Exits with 77
# (and says why) where the rig cannot run.

set -euo pipefail

readonly SKIP=77
SELF=$(readlink -f "${BASH_SOURCE[0]}")
readonly SELF
REPO=$(cd "$(dirname "$SELF")/.." && pwd)
readonly REPO
readonly TARGET=handover-rig.target
readonly INSIDE=/run/handover-rig          # WORKDIR, as seen inside
export LC_ALL=C

say() { printf 'systemd-rig: %s\n' "$*" >&2; }
die() {
    say "ERROR: $*"
    exit 1
}
skip() {
    say "SKIPPED: $*"
    exit "$SKIP"
}

# The manager to boot: $RIG_SYSTEMD if set (another build, e.g. an unpacked newer package,
# with $RIG_SYSTEMD_LIBRARY_PATH for its libraries), else the installed one.
systemd_bin() {
    local p
    for p in ${RIG_SYSTEMD:-} /lib/systemd/systemd /usr/lib/systemd/systemd; do
        if [ -x "$p" ]; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

# The host's cgroup2 mount: /sys/fs/cgroup (unified), or /sys/fs/cgroup/unified (hybrid).
cgroup2_mount() {
    local m
    for m in /sys/fs/cgroup /sys/fs/cgroup/unified; do
        if [ -d "$m" ] && [ "$(stat -fc %T "$m" 2>/dev/null)" = cgroup2fs ]; then
            echo "$m"
            return 0
        fi
    done
    return 1
}

# Where our cgroups go: under our own cgroup in the cgroup2 hierarchy.
cgroup_base() {
    local m own
    m=$(cgroup2_mount) || return 1
    own=$(sed -n 's/^0:://p' /proc/self/cgroup)
    own=${own%/}
    echo "$m$own"
}

# Host pids of the processes whose PID namespace is $1 (a "pid:[N]" link).
pids_in_ns() {
    local pat=${1//[/\\[} p
    pat=${pat//]/\\]}
    # (find fails on processes that end while it runs: not an error here.)
    { find /proc/[0-9]*/ns/pid -maxdepth 0 -lname "$pat" 2>/dev/null || true; } |
        while IFS=/ read -r _ _ p _; do
            echo "$p"
        done
}

# The (first) child of pid $1.
child_of() {
    local c p stat rest
    if c=$(cat "/proc/$1/task/$1/children" 2>/dev/null); then
        echo "${c%% *}"
        return 0
    fi
    for p in /proc/[0-9]*; do
        stat=$(cat "$p/stat" 2>/dev/null) || continue
        rest=${stat##*) }
        rest=${rest#* }
        if [ "${rest%% *}" = "$1" ]; then
            echo "${p#/proc/}"
            return 0
        fi
    done
}

# Whether pid $1 exists and is not a zombie.
running() {
    local stat rest
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    rest=${stat##*) }
    [ "${rest%% *}" != Z ]
}

# Every cgroup.procs under $1 is empty.
cgroup_empty() {
    local f
    while IFS= read -r f; do
        # (cgroupfs files have size 0: read them.)
        if [ -n "$(cat "$f" 2>/dev/null)" ]; then
            return 1
        fi
    done < <(find "$1" -name cgroup.procs 2>/dev/null)
    return 0
}

remove_cgroup() {
    find "$1" -depth -type d -exec rmdir {} + 2>/dev/null || true
    [ ! -d "$1" ]
}

# Removes what earlier rigs left when they died without `stop` (a test process killed): their
# cgroups (once empty) and canaries. Only those whose unshare (the pid in the name) is gone.
remove_stale() {
    local base=$1 d
    for d in "$base"/handover-rig.* /tmp/handover-rig-canary.*; do
        [ -e "$d" ] || continue
        if running "${d##*.}"; then
            continue
        fi
        if [ -d "$d" ]; then
            if cgroup_empty "$d"; then
                remove_cgroup "$d" || true
            fi
        else
            rm -f "$d"
        fi
    done
}

abs_dir() {
    [ -d "$1" ] || die "$1 is not a directory"
    (cd "$1" && pwd)
}

# --- check -------------------------------------------------------------------------------------

cmd_check() {
    [ "$(uname -s)" = Linux ] || skip "not Linux"
    [ "$(id -u)" = 0 ] || skip "needs root (it creates namespaces, mounts and cgroups); run the tests as root"
    local c
    for c in unshare nsenter setpriv setsid mount script; do
        command -v "$c" >/dev/null 2>&1 || skip "command '$c' not found: install util-linux, mount and bsdutils"
    done
    for c in systemctl systemd-analyze; do
        command -v "$c" >/dev/null 2>&1 || skip "command '$c' not found: install the systemd package"
    done
    systemd_bin >/dev/null || skip "no systemd manager binary (/lib/systemd/systemd): install the systemd package"
    local base probe
    base=$(cgroup_base) || skip "no cgroup2 hierarchy (neither /sys/fs/cgroup nor /sys/fs/cgroup/unified is cgroup2); systemd as PID 1 needs one"
    probe="$base/handover-rig-probe.$$"
    mkdir "$probe" 2>/dev/null || skip "cannot create a cgroup under $base (read-only cgroup2, e.g. an unprivileged container)"
    rmdir "$probe"
    unshare --pid --fork --mount --mount-proc --uts --ipc --propagation private -- true 2>/dev/null ||
        skip "cannot create PID/mount/UTS/IPC namespaces (unprivileged container or seccomp?)"
    unshare --cgroup -- true 2>/dev/null || skip "cannot create a cgroup namespace (kernel < 4.6?)"
    say "ok: $(systemctl --version | head -n 1); cgroup2 at $(cgroup2_mount); cgroups of the rig under $base"
}

# --- prepare -----------------------------------------------------------------------------------

cmd_prepare() {
    [ $# -eq 3 ] || [ $# -eq 4 ] || die "usage: prepare WORKDIR BINARY PORT [FDSTORE_PORT]"
    local w bin=$2 port=$3 fdstore_port=${4:-}
    mkdir -p "$1"
    w=$(abs_dir "$1")
    [ -x "$bin" ] || die "$bin is not an executable"
    mkdir -p "$w/units/handover-hello.socket.d" "$w/units/handover-hello.service.d" "$w/bin" "$w/log"
    chmod 0755 "$w" "$w/bin"
    cp "$REPO/systemd/handover-hello.socket" "$REPO/systemd/handover-hello.service" "$w/units/"
    # The templates as they are; only the port and the log file differ, in drop-ins.
    cat >"$w/units/handover-hello.socket.d/rig.conf" <<EOF
[Socket]
ListenStream=
ListenStream=127.0.0.1:$port
EOF
    # No journald in the rig: the service's stdout/stderr go to a file the test can read.
    cat >"$w/units/handover-hello.service.d/rig.conf" <<EOF
[Service]
StandardOutput=append:$INSIDE/log/handover-hello.log
StandardError=inherit
Environment=NO_COLOR=1
EOF
    if [ -n "$fdstore_port" ]; then
        # The unit without a socket: the server binds the port itself (its first argument).
        mkdir -p "$w/units/handover-hello-fdstore.service.d"
        cp "$REPO/systemd/handover-hello-fdstore.service" "$w/units/"
        cat >"$w/units/handover-hello-fdstore.service.d/rig.conf" <<EOF
[Service]
ExecStart=
ExecStart=/usr/local/bin/handover-hello 127.0.0.1:$fdstore_port
StandardOutput=append:$INSIDE/log/handover-hello-fdstore.log
StandardError=inherit
EOF
    fi
    install -m 0755 "$bin" "$w/bin/handover-hello"
}

# The axum example: one service, two socket units (web, admin), each on a port of the test's.
cmd_prepare_axum() {
    [ $# -eq 4 ] || die "usage: prepare-axum WORKDIR BINARY WEB_PORT ADMIN_PORT"
    local w bin=$2 web=$3 admin=$4 name port
    case "$web$admin" in
    *[!0-9]* | "") die "ports must be numbers: $web $admin" ;;
    esac
    [ "$web" != "$admin" ] || die "the web and admin ports must differ ($web)"
    mkdir -p "$1"
    w=$(abs_dir "$1")
    [ -x "$bin" ] || die "$bin is not an executable"
    mkdir -p "$w/units/handover-axum.service.d" "$w/bin" "$w/log"
    chmod 0755 "$w" "$w/bin"
    cp "$REPO/systemd/handover-axum.service" "$REPO/systemd/handover-axum-web.socket" \
        "$REPO/systemd/handover-axum-admin.socket" "$w/units/"
    # The templates as they are; only the ports and the log file differ, in drop-ins.
    for name in web admin; do
        port=$web
        [ "$name" = admin ] && port=$admin
        mkdir -p "$w/units/handover-axum-$name.socket.d"
        cat >"$w/units/handover-axum-$name.socket.d/rig.conf" <<EOF
[Socket]
ListenStream=
ListenStream=127.0.0.1:$port
EOF
    done
    cat >"$w/units/handover-axum.service.d/rig.conf" <<EOF
[Service]
StandardOutput=append:$INSIDE/log/handover-axum.log
StandardError=inherit
EOF
    install -m 0755 "$bin" "$w/bin/handover-axum"
}

# The tls example as a service that binds its own sockets and keeps them and its TLS session
# ticket keys in the fd store (not a template of systemd/: a rig unit, for tests/systemd.rs).
cmd_prepare_tls() {
    [ $# -eq 6 ] || die "usage: prepare-tls WORKDIR BINARY WEB_PORT HEALTH_PORT CERT KEY"
    local w bin=$2 web=$3 health=$4 cert=$5 key=$6
    case "$web$health" in
    *[!0-9]* | "") die "ports must be numbers: $web $health" ;;
    esac
    mkdir -p "$1"
    w=$(abs_dir "$1")
    [ -x "$bin" ] || die "$bin is not an executable"
    mkdir -p "$w/units" "$w/bin" "$w/log" "$w/tls"
    chmod 0755 "$w" "$w/bin"
    install -m 0644 "$cert" "$w/tls/cert.pem"
    install -m 0600 "$key" "$w/tls/key.pem"
    cat >"$w/units/handover-tls.service" <<EOF
[Unit]
Description=handover test rig: the tls example, its sockets and TLS ticket keys in the fd store

[Service]
Type=notify
NotifyAccess=main
# web, health, and the TLS session ticket keys (a sealed memfd).
FileDescriptorStoreMax=3
ExecStart=/usr/local/bin/handover-tls --cert $INSIDE/tls/cert.pem --key $INSIDE/tls/key.pem --web 127.0.0.1:$web --health 127.0.0.1:$health
ExecReload=/bin/kill -USR1 \$MAINPID
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec=15s
Environment=RUST_LOG=info NO_COLOR=1 HANDOVER_FD_STORE=1
StandardOutput=append:$INSIDE/log/handover-tls.log
StandardError=inherit
EOF
    install -m 0755 "$bin" "$w/bin/handover-tls"
}

# --- boot / start / wait -----------------------------------------------------------------------

cmd_boot() {
    [ $# -eq 1 ] || die "usage: boot WORKDIR"
    local w sd base cg state canary
    w=$(abs_dir "$1")
    [ -d "$w/units" ] || die "$w/units does not exist (run prepare first)"
    sd=$(systemd_bin) || skip "no systemd manager binary"
    base=$(cgroup_base) || skip "no cgroup2 hierarchy"
    state="$w/rig"
    refuse_if_running "$w"
    rm -rf "$state"
    mkdir -p "$state" "$w/log"
    remove_stale "$base"

    # What `stop` checks the host against.
    canary="/tmp/handover-rig-canary.$$"
    printf 'canary of the systemd rig %s, %s\n' "$$" "$(date +%s%N)" >"$canary"
    cp "$canary" "$state/canary.expected"
    echo "$canary" >"$state/canary"
    cat /proc/sys/kernel/hostname >"$state/hostname"
    cat /proc/sys/net/unix/max_dgram_qlen >"$state/max_dgram_qlen"

    # cgroups: ours/handover-rig.N/{supervisor (unshare), payload (the manager: its cgroup
    # namespace root)}. Processes only in leaves, as cgroup2 wants.
    cg="$base/handover-rig.$$"
    mkdir "$cg" "$cg/supervisor" "$cg/payload" || die "cannot create cgroups under $base"
    echo "$cg" >"$state/cgroup"
    echo "$$" >"$cg/supervisor/cgroup.procs" || die "cannot move into $cg/supervisor"
    echo "$$" >"$state/unshare.pid"

    local tie=(setpriv --pdeathsig KILL --)
    if [ "${RIG_DETACHED:-}" = 1 ]; then
        tie=()
    fi
    exec </dev/null >"$w/log/manager.log" 2>&1
    exec "${tie[@]}" unshare --pid --fork --kill-child=SIGKILL --mount --mount-proc --uts --ipc \
        --propagation private -- "$BASH" "$SELF" __stage1 "$w" "$cg" "$sd"
}

# A second rig from the same WORKDIR would lose track of the first one.
refuse_if_running() {
    local up
    if [ -s "$1/rig/unshare.pid" ]; then
        up=$(cat "$1/rig/unshare.pid")
        if running "$up" && [ "$(cat "/proc/$up/comm" 2>/dev/null)" = unshare ]; then
            die "a rig from $1 is still running (unshare pid $up): run stop first"
        fi
    fi
}

cmd_start() {
    [ $# -eq 1 ] || die "usage: start WORKDIR"
    local w
    w=$(abs_dir "$1")
    refuse_if_running "$w"
    rm -rf "$w/rig"
    mkdir -p "$w/log"
    RIG_DETACHED=1 setsid "$BASH" "$SELF" boot "$w" </dev/null >/dev/null 2>"$w/log/boot.err" &
    RIG_BOOT_PID=$! cmd_wait "$w"
}

cmd_wait() {
    [ $# -ge 1 ] || die "usage: wait WORKDIR [SECONDS]"
    local w state limit up="" init="" st="" deadline
    w=$(abs_dir "$1")
    limit=${2:-90}
    state="$w/rig"
    deadline=$((SECONDS + limit))
    while :; do
        if [ -z "$up" ] && [ -s "$state/unshare.pid" ]; then
            up=$(cat "$state/unshare.pid")
        fi
        # $RIG_BOOT_PID: the `boot` process, if the caller knows it; it becomes the unshare.
        if [ -z "$up" ] && [ -n "${RIG_BOOT_PID:-}" ] && ! running "$RIG_BOOT_PID"; then
            tail -n 20 "$w/log/boot.err" >&2 2>/dev/null || true
            die "boot (pid $RIG_BOOT_PID) ended before starting the manager"
        fi
        if [ -n "$up" ]; then
            if ! running "$up"; then
                say "the rig's unshare ($up) is gone; logs:"
                tail -n 40 "$w/log/manager.log" "$w/log/console.log" >&2 || true
                die "the manager did not come up"
            fi
            if [ -z "$init" ]; then
                init=$(child_of "$up")
                if [ -n "$init" ]; then
                    # Recorded at once, so that `stop` can check the namespace is empty even if
                    # the manager never comes up.
                    if readlink "/proc/$init/ns/pid" >"$state/pidns"; then
                        echo "$init" >"$state/init.pid"
                    else
                        init=""
                    fi
                fi
            fi
            if [ -n "$init" ] && [ "$(cat "/proc/$init/comm" 2>/dev/null)" = systemd ]; then
                st=$(in_ns "$init" systemctl is-system-running 2>/dev/null || true)
                case "$st" in
                running | degraded) break ;;
                esac
            fi
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            say "manager not up within ${limit}s (state: ${st:-unknown}); logs:"
            tail -n 40 "$w/log/manager.log" "$w/log/console.log" >&2 || true
            die "timeout"
        fi
        sleep 0.1
    done
    if [ "$st" = degraded ]; then
        say "warning: the manager is up but degraded:"
        in_ns "$init" systemctl --failed --no-legend >&2 || true
    fi
    echo "$init"
}

# Inside the namespaces, as PID 1: private mounts, then the cgroup namespace, then systemd.
stage1() {
    local w=$1 cg=$2 sd=$3 u t wants=""
    mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
    mkdir -p "$INSIDE" /run/systemd/system /run/handover-rig-empty
    mount --bind "$w" "$INSIDE"
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /var/tmp
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
    if [ -d "$INSIDE/bin" ]; then
        mount --bind "$INSIDE/bin" /usr/local/bin
    fi
    # A manager in a container logs to /dev/console, which must be a terminal: here a pty (of
    # a devpts instance of our own) whose output `script` copies to log/console.log, instead
    # of the host's console.
    mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /dev/pts
    mount --bind /dev/pts/ptmx /dev/ptmx
    script -qfc 'tty >/run/handover-rig-console; exec sleep infinity' "$INSIDE/log/console.log" \
        </dev/null >/dev/null 2>&1 &
    for _ in $(seq 100); do
        [ -s /run/handover-rig-console ] && break
        sleep 0.05
    done
    [ -s /run/handover-rig-console ] || {
        echo "no console pty (script from util-linux/bsdutils)" >&2
        exit 1
    }
    mount --bind "$(cat /run/handover-rig-console)" /dev/console

    cp -r "$INSIDE/units/." /run/systemd/system/
    for u in /run/systemd/system/*.socket; do
        [ -e "$u" ] && wants="$wants ${u##*/}"
    done
    cat >/run/systemd/system/$TARGET <<EOF
[Unit]
Description=handover test rig: the units under test, and nothing else
DefaultDependencies=no
Wants=$wants
EOF
    # Stand-ins for what default dependencies name (Requires=sysinit.target, ...).
    for t in sysinit basic sockets timers paths local-fs remote-fs network network-online \
        nss-user-lookup multi-user shutdown; do
        if [ ! -e "/run/systemd/system/$t.target" ]; then
            printf '[Unit]\nDescription=%s (empty stand-in of the test rig)\nDefaultDependencies=no\n' \
                "$t.target" >"/run/systemd/system/$t.target"
        fi
    done

    # The host, read-only from here on.
    mount --bind /proc/sys /proc/sys
    mount -o remount,bind,ro /proc/sys
    if [ -e /proc/sysrq-trigger ]; then
        mount --bind /proc/sysrq-trigger /proc/sysrq-trigger
        mount -o remount,bind,ro /proc/sysrq-trigger
    fi
    mount -o remount,bind,ro /sys
    mount -o remount,bind,ro /

    # Into the payload cgroup, which becomes the root of the new cgroup namespace.
    echo 0 >"$cg/payload/cgroup.procs"
    exec unshare --cgroup -- /bin/sh -c '
        mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup || exit 1
        exec env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            ${3:+LD_LIBRARY_PATH="$3"} \
            container=handover-test \
            SYSTEMD_UNIT_PATH=/run/systemd/system \
            SYSTEMD_GENERATOR_PATH=/run/handover-rig-empty \
            SYSTEMD_ENVIRONMENT_GENERATOR_PATH=/run/handover-rig-empty \
            "$0" --unit="$1" --log-target=console --log-level="${2:-info}" --log-color=no \
            --show-status=no
    ' "$sd" "$TARGET" "${RIG_LOG_LEVEL:-info}" "${RIG_SYSTEMD_LIBRARY_PATH:-}"
}

# --- exec --------------------------------------------------------------------------------------

in_ns() {
    local pid=$1
    shift
    nsenter -t "$pid" -m -p -u -i -- env -i \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        LC_ALL=C SYSTEMD_PAGER= SYSTEMD_COLORS=0 SYSTEMD_LOG_COLOR=0 "$@"
}

init_pid_of() {
    if [ -d "$1" ]; then
        [ -s "$1/rig/init.pid" ] || die "$1/rig/init.pid: the rig is not up (run wait)"
        cat "$1/rig/init.pid"
    else
        echo "$1"
    fi
}

cmd_exec() {
    [ $# -ge 2 ] || die "usage: exec WORKDIR|PID CMD..."
    local pid
    pid=$(init_pid_of "$1")
    shift
    running "$pid" || die "the manager ($pid) is not running"
    in_ns "$pid" "$@"
}

# --- stop --------------------------------------------------------------------------------------

cmd_stop() {
    [ $# -eq 1 ] || die "usage: stop WORKDIR"
    local w state init="" pidns="" up="" cg="" left deadline problems=0 p
    w=$(abs_dir "$1")
    state="$w/rig"
    if [ ! -d "$state" ]; then
        say "no rig state in $w: nothing to stop"
        return 0
    fi
    [ -s "$state/init.pid" ] && init=$(cat "$state/init.pid")
    [ -s "$state/pidns" ] && pidns=$(cat "$state/pidns")
    [ -s "$state/unshare.pid" ] && up=$(cat "$state/unshare.pid")
    [ -s "$state/cgroup" ] && cg=$(cat "$state/cgroup")

    # Kill PID 1 of the namespace, by pid, after checking the pid is still that namespace's.
    if [ -n "$init" ] && [ -n "$pidns" ] && [ "$(readlink "/proc/$init/ns/pid" 2>/dev/null)" = "$pidns" ]; then
        kill -KILL "$init" 2>/dev/null || true
    elif [ -n "$up" ] && running "$up"; then
        # Not up yet (or wait was never run): the unshare kills its child when it dies.
        kill -KILL "$up" 2>/dev/null || true
    fi

    deadline=$((SECONDS + 20))
    if [ -n "$pidns" ]; then
        while left=$(pids_in_ns "$pidns") && [ -n "$left" ]; do
            if [ "$SECONDS" -ge "$deadline" ]; then
                say "processes of the rig's PID namespace still there: $(echo $left)"
                problems=1
                break
            fi
            sleep 0.05
        done
    fi
    if [ -n "$up" ]; then
        while running "$up"; do
            if [ "$SECONDS" -ge "$deadline" ]; then
                say "the rig's unshare ($up) is still running"
                problems=1
                break
            fi
            sleep 0.05
        done
    fi
    if [ -n "$cg" ] && [ -d "$cg" ]; then
        while ! cgroup_empty "$cg"; do
            if [ "$SECONDS" -ge "$deadline" ]; then
                say "processes left in $cg: $(find "$cg" -name cgroup.procs -exec cat {} + | tr '\n' ' ')"
                problems=1
                break
            fi
            sleep 0.05
        done
        remove_cgroup "$cg" || {
            say "could not remove $cg"
            problems=1
        }
    fi

    # The host must be as it was.
    if [ -s "$state/canary" ]; then
        p=$(cat "$state/canary")
        if [ ! -f "$p" ] || [ "$(cat "$p")" != "$(cat "$state/canary.expected")" ]; then
            say "HOST /tmp WAS TOUCHED: the canary $p is missing or changed"
            problems=1
        fi
        rm -f "$p"
    fi
    if [ -s "$state/hostname" ] && [ "$(cat /proc/sys/kernel/hostname)" != "$(cat "$state/hostname")" ]; then
        say "the host's hostname changed: $(cat "$state/hostname") -> $(cat /proc/sys/kernel/hostname)"
        problems=1
    fi
    if [ -s "$state/max_dgram_qlen" ] &&
        [ "$(cat /proc/sys/net/unix/max_dgram_qlen)" != "$(cat "$state/max_dgram_qlen")" ]; then
        say "the host's net.unix.max_dgram_qlen changed"
        problems=1
    fi
    if [ "$problems" != 0 ]; then
        rm -f "$state/init.pid"
        die "stopped, but not cleanly (see above)"
    fi
    rm -rf "$state"
    say "stopped: no process left in its PID namespace or cgroup, cgroup removed, host /tmp canary, hostname and sysctl intact"
}

# --- verify / security -------------------------------------------------------------------------

cmd_verify() {
    [ $# -ge 2 ] || die "usage: verify BINARY UNIT..."
    local bin names
    bin=$(readlink -f "$1")
    shift
    [ -x "$bin" ] || die "$bin is not an executable"
    # systemd-analyze verify checks that ExecStart= exists: put BINARY at every path under
    # /usr/local/bin the units start (handover-hello, handover-axum), in a private mount
    # namespace only.
    names=$(sed -n 's|^ExecStart=[-@:+!]*/usr/local/bin/\([^ /]*\).*|\1|p' "$@" | sort -u | tr '\n' ' ')
    [ -n "$names" ] || names=handover-hello
    unshare --mount --propagation private -- "$BASH" -c '
        set -e
        bin=$1 names=$2
        shift 2
        mount -t tmpfs -o mode=0755 tmpfs /usr/local/bin
        for name in $names; do
            install -m 0755 "$bin" "/usr/local/bin/$name"
        done
        exec systemd-analyze verify --man=no --generators=no "$@"
    ' verify "$bin" "$names" "$@"
}

cmd_security() {
    [ $# -eq 1 ] || die "usage: security UNIT"
    SYSTEMD_COLORS=0 systemd-analyze security --no-pager --offline=yes "$1"
}

# -----------------------------------------------------------------------------------------------

main() {
    local cmd=${1:-}
    [ $# -gt 0 ] && shift
    case "$cmd" in
    check) cmd_check "$@" ;;
    prepare) cmd_prepare "$@" ;;
    prepare-axum) cmd_prepare_axum "$@" ;;
    prepare-tls) cmd_prepare_tls "$@" ;;
    boot) cmd_boot "$@" ;;
    start) cmd_start "$@" ;;
    wait) cmd_wait "$@" ;;
    exec) cmd_exec "$@" ;;
    stop) cmd_stop "$@" ;;
    verify) cmd_verify "$@" ;;
    security) cmd_security "$@" ;;
    __stage1) stage1 "$@" ;;
    *)
        sed -n '2,/^$/s/^# \{0,1\}//p' "$SELF" >&2
        exit 2
        ;;
    esac
}

main "$@"
