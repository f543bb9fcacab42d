#!/usr/bin/env bash
# What the block device sees while one target serves a workload: records the
# kernel's block and io_uring tracepoints for a second in the middle of a
# vbc-load run and summarises them (bench/iotrace.py).
#
#   bench/iotrace.sh [--target vbc|qsd|raw] [--rounds N] [--out DIR]
#                    [--] [vbc-load args...]
#
# Defaults: vblkcache, 3 rounds, 1 MiB sequential reads at QD8 on a 1 GiB
# disk (a cache file of 1.5 GiB, warmed by one sequential pass), files in
# target/ with O_DIRECT. qsd serves a 1 GiB file raw (as in
# bench/compare.sh); raw runs vbc-load on that file directly.
#
# Per round it prints the client's IOPS and latency, then, from the trace:
# the latency of the target's io_uring operations (submission to
# completion, in the kernel), the device requests (sizes, how many were
# dispatched more than once because the device's queue was full), and
# "sequential": the share of the bios sent to the device (before the block
# layer splits them) that start where the one before them ended, i.e. how
# sequential the file's reads are at the device.
# Needs perf (linux-perf) and root for system-wide tracepoints.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN="$ROOT/target/release/vblkcache"
LOAD="$ROOT/target/release/examples/vbc-load"
TARGET=vbc ROUNDS=3 OUTDIR="$ROOT/target/iotrace"
while [ $# -gt 0 ]; do
    case "$1" in
        --target) TARGET=$2; shift ;;
        --rounds) ROUNDS=$2; shift ;;
        --out) OUTDIR=$2; shift ;;
        --) shift; break ;;
        *) break ;;
    esac
    shift
done
case "$TARGET" in vbc | qsd | raw) ;; *) echo "iotrace.sh: --target is vbc, qsd or raw, not '$TARGET'" >&2; exit 2 ;; esac
case "$ROUNDS" in '' | *[!0-9]* | 0) echo "iotrace.sh: --rounds needs a positive number, got '$ROUNDS'" >&2; exit 2 ;; esac
ARGS=("$@")
[ ${#ARGS[@]} -eq 0 ] && ARGS=(--pattern read --bs 1M --iodepth 8)
command -v perf >/dev/null || { echo "iotrace.sh: perf not found (apt-get install linux-perf)" >&2; exit 2; }
[ -x "$BIN" ] && [ -x "$LOAD" ] || { echo "iotrace.sh: build first: cargo build --release --all-targets" >&2; exit 2; }
mkdir -p "$OUTDIR"
WORK=$(mktemp -d "$ROOT/target/vbc-iotrace.XXXXXX")
PID=""
cleanup() {
    [ -n "$PID" ] && kill -TERM "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
    rm -rf "$WORK"
    return 0
}
trap cleanup EXIT

fill() { "$LOAD" --file "$1" --pattern write --bs 1M --iodepth 8 --once --ramp 0 --runtime 600s --json >/dev/null; }
case "$TARGET" in
    vbc)
        truncate -s 1G "$WORK/source.img"
        fill "$WORK/source.img"
        truncate -s 1536M "$WORK/cache.img"
        "$BIN" serve --source "$WORK/source.img" --cache "$WORK/cache.img" --socket "$WORK/t.sock" \
            --queues 2 --direct --control "$WORK/ctl.sock" >"$OUTDIR/daemon.log" 2>&1 &
        PID=$!
        ;;
    qsd)
        fallocate -l 1G "$WORK/fast.img"
        fill "$WORK/fast.img"
        qemu-storage-daemon \
            --blockdev "driver=file,node-name=f,filename=$WORK/fast.img,cache.direct=on,aio=io_uring" \
            --blockdev driver=raw,node-name=d,file=f \
            --export "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=$WORK/t.sock,writable=on,num-queues=2" \
            >"$OUTDIR/daemon.log" 2>&1 &
        PID=$!
        ;;
    raw)
        fallocate -l 1G "$WORK/fast.img"
        fill "$WORK/fast.img"
        ;;
esac
if [ -n "$PID" ]; then
    for _ in $(seq 600); do [ -S "$WORK/t.sock" ] && break; sleep 0.05; done
    [ -S "$WORK/t.sock" ] || { echo "iotrace.sh: $TARGET did not start; see $OUTDIR/daemon.log" >&2; exit 1; }
    DEV=(--socket "$WORK/t.sock")
else
    DEV=(--file "$WORK/fast.img")
fi
if [ "$TARGET" = vbc ]; then
    # Warm: one sequential pass caches the whole disk.
    "$LOAD" "${DEV[@]}" --pattern read --bs 1M --iodepth 8 --once --ramp 0 --runtime 600s --json >/dev/null
fi
EVENTS=block:block_bio_queue,block:block_rq_issue,block:block_rq_requeue,block:block_rq_insert,io_uring:io_uring_submit_req,io_uring:io_uring_complete
for r in $(seq "$ROUNDS"); do
    "$LOAD" "${DEV[@]}" "${ARGS[@]}" --runtime 4s --ramp 1 --json >"$OUTDIR/load-$r.json" &
    LPID=$!
    sleep 2
    perf record -q -a -e "$EVENTS" -o "$OUTDIR/trace-$r.data" -- sleep 1 >/dev/null 2>&1
    wait "$LPID"
    perf script -i "$OUTDIR/trace-$r.data" -F comm,time,event,trace 2>/dev/null >"$OUTDIR/trace-$r.txt"
    echo "== $TARGET round $r"
    python3 "$ROOT/bench/iotrace.py" "$OUTDIR/load-$r.json" "$OUTDIR/trace-$r.txt" "$TARGET"
done
