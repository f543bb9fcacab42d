#!/usr/bin/env bash
# reconnect-check.sh [--runs N] [--bin PATH] [--signal TERM|KILL] [--delay S] [--mode MODE]
#                    [--serve-args "ARGS"]
#
# Restarts the daemon under a running guest: QEMU connects with
# `reconnect-ms=500` on its chardev, the guest runs guest-tests/fio-loop.sh
# (6 rounds of fio write+verify), and once round 2 is done the daemon gets
# the signal and is started again on the same files. A run passes when the
# guest finishes all its rounds (each verified) within 90 s; one that hangs
# ends with status 124. Prints one line per run and the count of passes.
# With VBC_KEEP_FAILED=DIR the logs of failed runs are copied to DIR/runN.
# Needs the guest of build-guest.sh (target/guest, or $VBLK_GUEST_DIR).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BIN=$ROOT/target/release/vblkcache
RUNS=5
SIG=TERM
DELAY=0.4
SERVE_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) RUNS=$2; shift ;;
        --bin) BIN=$2; shift ;;
        --signal) SIG=$2; shift ;;
        --delay) DELAY=$2; shift ;;
        --mode) SERVE_ARGS+=(--mode "$2"); shift ;;
        --serve-args) read -r -a more <<<"$2"; SERVE_ARGS+=("${more[@]}"); shift ;;
        *) sed -n '2,10p' "$0"; exit 2 ;;
    esac
    shift
done
GUEST_DIR=${VBLK_GUEST_DIR:-$ROOT/target/guest}
[ -e "$GUEST_DIR/vmlinux" ] || "$HERE/build-guest.sh" "$GUEST_DIR"
WORK=$(mktemp -d /tmp/vbc-reconnect.XXXXXX)
DP=""
QP=""
cleanup() {
    [ -n "$QP" ] && kill "$QP" 2>/dev/null || true
    [ -n "$DP" ] && kill -TERM "$DP" 2>/dev/null && wait "$DP" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
"$HERE/run-guest.sh" --guest-dir "$GUEST_DIR" --script "$HERE/guest-tests/fio-loop.sh" \
    --env N=6 --initrd-only "$WORK/initrd" >/dev/null
start() {
    "$BIN" serve --source "$D/source.img" --cache "$D/cache.img" --socket "$D/vhost.sock" \
        --queues 2 ${SERVE_ARGS[@]+"${SERVE_ARGS[@]}"} >> "$D/daemon.log" 2>&1 &
    DP=$!
    for _ in $(seq 100); do [ -S "$D/vhost.sock" ] && return; sleep 0.05; done
}
passed=0
for run in $(seq "$RUNS"); do
    D=$WORK/run$run
    mkdir -p "$D"
    truncate -s 256M "$D/source.img"
    truncate -s 64M "$D/cache.img"
    start
    timeout 90 qemu-system-x86_64 -machine q35,accel=tcg,memory-backend=mem -cpu max -m 1G \
        -object memory-backend-memfd,id=mem,size=1G,share=on \
        -bios /usr/share/qemu/qboot.rom -kernel "$GUEST_DIR/vmlinux" -initrd "$WORK/initrd" \
        -append "console=ttyS0 quiet panic=-1 rdinit=/init" \
        -nographic -nodefaults -serial stdio -monitor none -no-reboot \
        -chardev "socket,id=c0,path=$D/vhost.sock,reconnect-ms=500" \
        -device vhost-user-blk-pci,chardev=c0,num-queues=2 </dev/null >"$D/guest.log" 2>&1 &
    QP=$!
    for _ in $(seq 120); do grep -aq "ITER 2 " "$D/guest.log" && break; sleep 0.5; done
    sleep "$DELAY"
    kill -"$SIG" "$DP"
    wait "$DP" 2>/dev/null || true
    start
    rc=0
    wait "$QP" || rc=$?
    QP=""
    rounds=$(grep -ac "^ITER .* rc=0" "$D/guest.log" || true)
    ok=no
    if [ "$rc" = 0 ] && [ "$rounds" = 6 ] && grep -aq "VBLK_GUEST_EXIT=0" "$D/guest.log"; then
        ok=yes
        passed=$((passed + 1))
    fi
    echo "run $run: qemu status $rc, $rounds of 6 rounds verified, passed: $ok"
    if [ "$ok" = no ] && [ -n "${VBC_KEEP_FAILED:-}" ]; then
        mkdir -p "$VBC_KEEP_FAILED/run$run"
        cp "$D/daemon.log" "$D/guest.log" "$VBC_KEEP_FAILED/run$run/" || true
    fi
    kill -TERM "$DP" 2>/dev/null && wait "$DP" 2>/dev/null || true
    DP=""
done
echo "reconnect-check: $passed of $RUNS runs passed (signal $SIG, $BIN)"
[ "$passed" = "$RUNS" ]
