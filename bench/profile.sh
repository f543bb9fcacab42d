#!/usr/bin/env bash
# CPU profile of the daemon on one workload: serves a warm cache, runs the
# load generator, and records the daemon with `perf record -g` meanwhile.
#
#   bench/profile.sh [--shm] [--out DIR] [--] [vbc-load args...]
#
# Defaults: 4K randread QD32, 1 queue, 8 s, a 512 MiB disk; files in
# target/ (O_DIRECT) or /dev/shm with --shm (page cache: the CPU-bound case).
# Writes DIR/perf.data (default target/profile) and prints the top of
# `perf report --no-children` (self time per symbol).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN="$ROOT/target/release/vblkcache"
LOAD="$ROOT/target/release/examples/vbc-load"
DIR="$ROOT/target"
OUTDIR="$ROOT/target/profile"
SHM=0
while [ $# -gt 0 ]; do
    case "$1" in
        --shm) SHM=1 ;;
        --out) OUTDIR=$2; shift ;;
        --) shift; break ;;
        *) break ;;
    esac
    shift
done
ARGS=("$@")
[ ${#ARGS[@]} -eq 0 ] && ARGS=(--pattern randread --bs 4K --iodepth 32 --queues 1)
command -v perf >/dev/null || { echo "profile.sh: perf not found (apt-get install linux-perf)" >&2; exit 2; }
(cd "$ROOT" && cargo build --release --quiet --bin vblkcache --example vbc-load)
mkdir -p "$OUTDIR"
WORK=$(mktemp -d "$DIR/vbc-profile.XXXXXX")
FAST=$WORK
if [ "$SHM" = 1 ]; then FAST=$(mktemp -d /dev/shm/vbc-profile.XXXXXX); fi
PID=""
cleanup() {
    [ -n "$PID" ] && kill -TERM "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
    rm -rf "$WORK"
    [ "$FAST" != "$WORK" ] && rm -rf "$FAST"
    return 0
}
trap cleanup EXIT
truncate -s 512M "$WORK/source.img"
"$LOAD" --file "$WORK/source.img" --pattern write --bs 1M --iodepth 8 --once --ramp 0 --runtime 600s --json >/dev/null
truncate -s 700M "$FAST/cache.img"
"$BIN" serve --source "$WORK/source.img" --cache "$FAST/cache.img" --socket "$WORK/vbc.sock" \
    --queues 2 --control "$WORK/ctl.sock" >"$OUTDIR/daemon.log" 2>&1 &
PID=$!
for _ in $(seq 600); do [ -S "$WORK/ctl.sock" ] && break; sleep 0.05; done
# Warm: one sequential pass caches the whole disk.
"$LOAD" --socket "$WORK/vbc.sock" --pattern read --bs 1M --iodepth 8 --once --ramp 0 --runtime 600s --json >/dev/null
perf record -F 2999 -g -p "$PID" -o "$OUTDIR/perf.data" -- sleep 9 2>"$OUTDIR/perf.err" &
PERF=$!
sleep 0.5
"$LOAD" --socket "$WORK/vbc.sock" "${ARGS[@]}" --runtime 8s --ramp 0
wait "$PERF" || true
"$BIN" status --json --control "$WORK/ctl.sock" >"$OUTDIR/status.json"
perf report -i "$OUTDIR/perf.data" --no-children --stdio --sort symbol 2>/dev/null |
    grep -E '^ +[0-9]' | head -40
