#!/usr/bin/env bash
# serve-and-boot.sh [options]
#
# The whole loop for a human: build the test guest (cached), create a source
# image and a cache file, start the vhost-user-blk backend, wait until its
# socket listens, boot the guest against it with run-guest.sh, stop the backend
# with SIGTERM and report both exit statuses.
#
# Options:
#   --backend vblkcache|qsd  the daemon (default vblkcache). qsd is
#                        qemu-storage-daemon exporting the source image directly:
#                        the reference backend these scripts were proven with.
#   --script FILE        guest script (repeatable; default guest-tests/fio-verify.sh
#                        then guest-tests/fs-roundtrip.sh, in one boot)
#   --source IMG         source image (created, raw, if missing; default WORKDIR/source.img)
#   --cache FILE         cache file (created if missing; default WORKDIR/cache.img)
#   --size SIZE          size of a created source image (default 256M)
#   --cache-size SIZE    size of a created cache file (default 64M)
#   --queues N           virtqueues, daemon and QEMU (default 2)
#   --mode MODE          vblkcache --mode (e.g. writeback); default: the daemon's
#   --daemon-arg ARG     extra argument for vblkcache serve (repeatable)
#   --workdir DIR        sockets, images and logs (default: a new temporary dir)
#   --timeout S          guest run limit (default 300)
#   --guest-dir DIR      build-guest.sh output (default <repo>/target/guest)
#   --keep               keep a temporary workdir after success
#
# The vblkcache binary is $VBLKCACHE, else <repo>/target/release/vblkcache.
# Exit status: 0 when the guest scripts passed and the daemon exited 0 on SIGTERM.
set -euo pipefail
HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
# shellcheck source-path=SCRIPTDIR
source "$HERE/lib.sh"
ROOT=$(repo_root)

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
    exit 2
}
die() {
    echo "serve-and-boot.sh: $*" >&2
    exit 1
}

BACKEND=vblkcache SOURCE="" CACHE="" SIZE=256M CACHE_SIZE=64M QUEUES=2 MODE="" WORK=""
TIMEOUT=300 GUEST_DIR=$ROOT/target/guest KEEP=0
SCRIPTS=() DAEMON_ARGS=()
while (($#)); do
    case $1 in
    --backend) BACKEND=$2; shift 2 ;;
    --script) SCRIPTS+=("$2"); shift 2 ;;
    --source) SOURCE=$2; shift 2 ;;
    --cache) CACHE=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --cache-size) CACHE_SIZE=$2; shift 2 ;;
    --queues) QUEUES=$2; shift 2 ;;
    --mode) MODE=$2; shift 2 ;;
    --daemon-arg) DAEMON_ARGS+=("$2"); shift 2 ;;
    --workdir) WORK=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --guest-dir) GUEST_DIR=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h | --help) usage ;;
    *) echo "serve-and-boot.sh: unknown argument $1" >&2; usage ;;
    esac
done
((${#SCRIPTS[@]} > 0)) || SCRIPTS=("$HERE/guest-tests/fio-verify.sh" "$HERE/guest-tests/fs-roundtrip.sh")

TEMP_WORK=0
if [[ -z $WORK ]]; then
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/vblk-serve.XXXXXX")
    TEMP_WORK=1
fi
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
SOURCE=${SOURCE:-$WORK/source.img}
CACHE=${CACHE:-$WORK/cache.img}
SOCK=$WORK/vhost.sock
CTL=$WORK/control.sock
DLOG=$WORK/daemon.log
rm -f "$SOCK" "$CTL"

case $BACKEND in
vblkcache)
    BIN=${VBLKCACHE:-$ROOT/target/release/vblkcache}
    [[ -x $BIN ]] || die "no vblkcache binary at $BIN (cargo build --release, or set VBLKCACHE)"
    ;;
qsd) command -v qemu-storage-daemon >/dev/null || die "qemu-storage-daemon not found; run qemu-scripts/install-deps.sh" ;;
*) die "--backend must be vblkcache or qsd" ;;
esac

"$HERE/build-guest.sh" "$GUEST_DIR" >&2

[[ -e $SOURCE ]] || qemu-img create -q -f raw "$SOURCE" "$SIZE"
if [[ $BACKEND == vblkcache && ! -e $CACHE ]]; then
    qemu-img create -q -f raw "$CACHE" "$CACHE_SIZE"
fi

DPID=""
DRC=0
stop_daemon() {
    # Stops the daemon with SIGTERM and sets DRC to its exit status. (Not run in
    # a $(...) subshell: only this shell can wait for its child.)
    [[ -n $DPID ]] || return 0
    kill -TERM "$DPID" 2>/dev/null || true
    set +e
    wait "$DPID"
    DRC=$?
    set -e
    DPID=""
}
# shellcheck disable=SC2317 # run by the EXIT trap
on_exit() {
    if [[ -n $DPID ]]; then
        kill -TERM "$DPID" 2>/dev/null || true
        wait "$DPID" 2>/dev/null || true
    fi
}
trap on_exit EXIT

case $BACKEND in
vblkcache)
    cmd=("$BIN" serve --source "$SOURCE" --cache "$CACHE" --socket "$SOCK" --control "$CTL" --queues "$QUEUES")
    [[ -n $MODE ]] && cmd+=(--mode "$MODE")
    cmd+=("${DAEMON_ARGS[@]}")
    ;;
qsd)
    cmd=(qemu-storage-daemon
        --blockdev "driver=file,node-name=f,filename=$SOURCE,cache.direct=on,aio=io_uring"
        --blockdev "driver=raw,node-name=d,file=f"
        --export "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=$QUEUES")
    ;;
esac
echo "serve-and-boot.sh: starting ${cmd[*]}" >&2
"${cmd[@]}" </dev/null >"$DLOG" 2>&1 &
DPID=$!
t0=$SECONDS
if ! wait_for_listen "$SOCK" 30 "$DPID"; then
    cat "$DLOG" >&2
    die "backend did not start"
fi
if [[ $BACKEND == vblkcache ]]; then
    # The control socket answers many clients: poll it with the status command.
    deadline=$((SECONDS + 30))
    until "$BIN" status --control "$CTL" >/dev/null 2>&1; do
        kill -0 "$DPID" 2>/dev/null || { cat "$DLOG" >&2; die "daemon exited before its control socket answered"; }
        ((SECONDS < deadline)) || { cat "$DLOG" >&2; die "control socket did not answer"; }
        sleep 0.05
    done
fi
echo "serve-and-boot.sh: backend listening after $((SECONDS - t0))s" >&2

rargs=(--socket "$SOCK" --queues "$QUEUES" --timeout "$TIMEOUT" --guest-dir "$GUEST_DIR" --log "$WORK/console.log")
for s in "${SCRIPTS[@]}"; do rargs+=(--script "$s"); done
set +e
"$HERE/run-guest.sh" "${rargs[@]}"
grc=$?
set -e
stop_daemon

echo "serve-and-boot.sh: guest status $grc, $BACKEND exit status $DRC on SIGTERM" >&2
if ((grc != 0 || DRC != 0)); then
    echo "--- daemon log tail ---" >&2
    tail -n 20 "$DLOG" >&2
    echo "serve-and-boot.sh: images and logs kept in $WORK" >&2
    exit 1
fi
if ((TEMP_WORK && !KEEP)); then
    rm -rf "$WORK"
else
    echo "serve-and-boot.sh: images and logs in $WORK" >&2
fi
exit 0
