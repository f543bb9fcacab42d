#!/usr/bin/env bash
# Writeback throughput through the daemon, against writing the same bytes
# straight to the source file.
#
# Per rep: a fresh cache of 4 * SIZE; the daemon (writeback mode) gets SIZE
# bytes written sequentially by vbc-load, so SIZE/64K contiguous dirty
# blocks fill a quarter of the cache (below the 50 % high watermark: no
# background writeback). Then `vblkcache flush` is timed (wall clock around
# the client: the daemon writes every dirty block back and flushes the
# source). The daemon is then stopped and vbc-load writes the same SIZE bytes
# straight to the source file (io_uring, O_DIRECT) with the writeback's
# request size (its 4 MiB runs), flushed once at the end (--flush-every =
# number of writes) as the writeback flushes the source once before it
# commits. It does so twice: one write at a time (--iodepth 1) and 8 at a
# time (--iodepth 8, as many 4 MiB runs as the writeback keeps in flight:
# 32 MiB). The source's sequential write bandwidth is the faster of the two,
# and the ratio is against it. The ratio uses vbc-load's own measured time
# for the direct write (no process start, no io_uring set-up), the wall
# clock of the whole `vblkcache flush` client for the writeback: the direct
# write gets the benefit of the doubt. Both write the same range of the same
# file, already written once (untimed), so neither pays block allocation.
#
# Two placements of the cache file, each timed against its own direct
# write in the same rep:
# - shm: the cache on /dev/shm (RAM, read at memory speed), the source on
#   disk: a cache device faster than its source, as deployed;
# - disk: cache and source files on the same disk. The writeback then reads
#   the cache from that disk while it writes the source, which a direct
#   write does not, and this VM's disk reads at about half its write rate
#   (~650 MiB/s against 1.2-1.8 GiB/s into the host's cache): the cache
#   read, not the source, bounds that case.
# The cache file is fallocated (contiguous, like a partition) rather than
# sparse: a sparse file scattered by 64K writes reads slower.
#   bench/writeback.sh [SIZE_MIB] [REPS]   (VBC_BIN=path: another vblkcache build)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE_MIB=${1:-1024}
REPS=${2:-5}
BIN=${VBC_BIN:-$ROOT/target/release/vblkcache}
LOAD=$ROOT/target/release/examples/vbc-load
# Not /dev/shm: the source must be a real file with O_DIRECT.
W=$(mktemp -d "${TMPDIR:-/var/tmp}/vbc-wb.XXXXXX")
S=$(mktemp -d /dev/shm/vbc-wb.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$W" "$S"' EXIT
. "$ROOT/bench/writeback-common.sh"

now() { date +%s.%N; }

# Source of 2 * SIZE (the dirty range is its first half), written once.
dd if=/dev/zero of="$W/source.img" bs=4M count=$((SIZE_MIB / 2)) oflag=direct status=none
sync

echo "uptime: $(uptime)"
echo "| cache on | rep | dirty blocks | flush s | flush MiB/s | direct QD1 s | direct QD8 s | source MiB/s (faster) | flush / QD1 | flush / faster |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for rep in $(seq 1 "$REPS"); do
  for place in shm disk; do
    if [ $place = shm ]; then cache=$S/cache.img; else cache=$W/cache.img; fi
    rm -f "$S/cache.img" "$W/cache.img" "$W"/*.sock
    fallocate -l $((SIZE_MIB * 4))M "$cache"
    # O_DIRECT where the filesystem allows it: the source and a cache on
    # disk; a cache on tmpfs goes through the page cache (tmpfs has no other).
    wb_start_filled "$cache"
    dirty=$(wb_dirty)
    t0=$(now)
    "$BIN" flush --control "$W/c.sock" >/dev/null
    t1=$(now)
    left=$(wb_dirty)
    kill -TERM $pid
    wait $pid || true
    [ "$left" = 0 ] || { echo "rep $rep: $left blocks still dirty after flush" >&2; exit 1; }
    sync
    direct() {
        "$LOAD" --file "$W/source.img" --pattern write --bs 4M --iodepth "$1" --size "${SIZE_MIB}M" \
            --once --runtime 120s --ramp 0s --flush-every $((SIZE_MIB / 4)) --json
    }
    # Alternate which goes first, so that neither always runs second.
    if [ $((rep % 2)) = 1 ]; then
        j1=$(direct 1); j8=$(direct 8)
    else
        j8=$(direct 8); j1=$(direct 1)
    fi
    python3 - "$place" "$rep" "$dirty" "$SIZE_MIB" "$t0" "$t1" "$j1" "$j8" <<'PY'
import json, sys
place, rep, dirty, mib = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
t0, t1 = map(float, sys.argv[5:7])
js = [json.loads(a) for a in sys.argv[7:9]]
for j in js:
    assert j["errors"] == 0 and j["flush"]["count"] == 1, "direct write: errors or no flush"
# mib_s is computed from the unrounded window (window_s is rounded to 10 ms).
f = t1 - t0
d1, d8 = (mib / j["mib_s"] for j in js)
best = min(d1, d8)
print(f"| {place} | {rep} | {dirty} | {f:.3f} | {mib/f:.0f} | {d1:.3f} | {d8:.3f} | {mib/best:.0f} | {f/d1:.2f} | {f/best:.2f} |")
PY
  done
done
echo "uptime: $(uptime)"
