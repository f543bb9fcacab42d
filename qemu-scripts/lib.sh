# shellcheck shell=bash
# Shared helpers for the qemu-scripts (sourced, not run).

# is_listening PATH: true when a Unix socket bound to PATH is in the listening
# state. It reads /proc/net/unix (flag 0x10000 is __SO_ACCEPTCON, set by
# listen()) instead of connecting: a vhost-user backend may serve only the
# first client that connects, so a probe connection would use up QEMU's place.
is_listening() {
    local path=$1
    [[ -S $path ]] || return 1
    # Columns: Num RefCount Protocol Flags Type St Inode Path (the path may
    # hold spaces, so rejoin fields 8..NF).
    awk -v p="$path" '
        NR > 1 && $4 == "00010000" {
            q = $8
            for (i = 9; i <= NF; i++) q = q " " $i
            if (q == p) found = 1
        }
        END { exit !found }
    ' /proc/net/unix
}

# wait_for_listen PATH TIMEOUT_S [PID]: polls until PATH is a listening socket.
# Fails early, with a message, if PID (the process that should create it) exits,
# and after TIMEOUT_S seconds.
wait_for_listen() {
    local path=$1 timeout_s=$2 pid=${3:-}
    local deadline=$((SECONDS + timeout_s))
    # /proc/net/unix shows the path as it was bound: callers pass absolute paths.
    until is_listening "$path"; do
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            echo "wait_for_listen: process $pid exited before $path was listening" >&2
            return 1
        fi
        if ((SECONDS >= deadline)); then
            echo "wait_for_listen: $path not listening after ${timeout_s}s" >&2
            return 1
        fi
        sleep 0.05
    done
}

# kvm_usable: true when /dev/kvm is a real KVM (kvm_intel/kvm_amd) that this
# user can open. A PVM host (module kvm_pvm) cannot boot a stock kernel.
kvm_usable() {
    [[ -r /dev/kvm && -w /dev/kvm ]] || return 1
    [[ -d /sys/module/kvm_pvm ]] && return 1
    [[ -d /sys/module/kvm_intel || -d /sys/module/kvm_amd ]]
}

# repo_root: the repository that holds these scripts.
repo_root() {
    cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd
}
