#!/usr/bin/env bash
# One `vblkcache flush` of SIZE MiB of contiguous dirty blocks (cache on
# /dev/shm, source on disk, filled as in bench/writeback.sh), with
# `perf record -g` on the daemon around the flush when PERF=1.
#   [PERF=1] [VBC_BIN=path] bench/writeback-profile.sh [SIZE_MIB] [PERF_OUT]
# Then e.g.: perf report -i PERF_OUT --no-children --sort comm -g none
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${VBC_BIN:-$ROOT/target/release/vblkcache}
LOAD=$ROOT/target/release/examples/vbc-load
SIZE_MIB=${1:-2048}
OUT=${2:-$ROOT/target/writeback.perf}
W=$(mktemp -d "${TMPDIR:-/var/tmp}/vbc-wbp.XXXXXX")
S=$(mktemp -d /dev/shm/vbc-wbp.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$W" "$S"' EXIT
dd if=/dev/zero of="$W/source.img" bs=4M count=$((SIZE_MIB / 2)) oflag=direct status=none
fallocate -l $((SIZE_MIB * 4))M "$S/cache.img"
. "$ROOT/bench/writeback-common.sh"
wb_start_filled "$S/cache.img"
dirty=$(wb_dirty)
if [ "${PERF:-0}" = 1 ]; then
    command -v perf >/dev/null || { echo "PERF=1 needs perf (apt-get install linux-perf)" >&2; exit 1; }
    perf record -g -o "$OUT" -p $pid 2>"$W/perf.log" &
    perf_pid=$!
    sleep 0.3
    kill -0 $perf_pid 2>/dev/null || { echo "perf record failed:" >&2; cat "$W/perf.log" >&2; exit 1; }
fi
t0=$(date +%s.%N)
"$BIN" flush --control "$W/c.sock" >/dev/null
t1=$(date +%s.%N)
if [ "${PERF:-0}" = 1 ]; then
    kill -INT $perf_pid
    wait $perf_pid || true
    echo "profile: $OUT"
fi
left=$(wb_dirty)
[ "$left" = 0 ] || { echo "$left blocks still dirty after the flush" >&2; exit 1; }
python3 -c "print(f'flush of $SIZE_MIB MiB ($dirty dirty blocks): {$t1 - $t0:.3f} s')"
kill -TERM $pid
wait $pid || true
