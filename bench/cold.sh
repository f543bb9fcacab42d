#!/usr/bin/env bash
# Cold random reads through the daemon from a slow source: a sparse 64 GiB
# source with --source-latency (default 5ms), a fresh cache per queue depth,
# 4 KiB random reads with vbc-load. Prints IOPS and latency per queue depth,
# and the engine's hit/miss counts (to show the reads were misses).
#
# Each queue depth is also run against the same daemon set-up in
# passthrough mode (every read goes straight to the slow source, nothing is
# cached): that is the source's latency as a client of the daemon sees it,
# including the sleep overshoot of the emulated latency (about 0.3 ms per
# 5 ms sleep on a busy VM) and the vhost-user round trip. The table gives the
# cold-cache mean against both the nominal latency and that baseline.
#   bench/cold.sh [LATENCY] [RUNTIME]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LAT=${1:-5ms}
RUNTIME=${2:-6s}
BIN=$ROOT/target/release/vblkcache
LOAD=$ROOT/target/release/examples/vbc-load
W=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$W"' EXIT

# run QD MODE -> JSON of the load and of the final status on one line each
run() {
    local qd=$1 mode=$2 pid json st
    rm -f "$W"/*.img "$W"/*.sock
    truncate -s 64G "$W/source.img"
    truncate -s 1G "$W/cache.img"
    "$BIN" serve --source "$W/source.img" --cache "$W/cache.img" --socket "$W/v.sock" --control "$W/c.sock" \
        --source-latency "$LAT" --io-threads 64 --mode "$mode" 2>"$W/daemon.log" &
    pid=$!
    until "$BIN" status --control "$W/c.sock" >/dev/null 2>&1; do
        kill -0 $pid || { cat "$W/daemon.log" >&2; exit 1; }
        sleep 0.05
    done
    json=$("$LOAD" --socket "$W/v.sock" --pattern randread --bs 4K --iodepth "$qd" --queues 1 \
        --runtime "$RUNTIME" --ramp 0s --json)
    st=$("$BIN" status --json --control "$W/c.sock")
    kill -TERM $pid
    wait $pid || true
    echo "$json"
    echo "$st"
}

echo "| QD | IOPS | mean µs | p50 µs | p99 µs | mean / nominal latency | passthrough mean µs | mean / passthrough | read hits | read misses |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for qd in 1 4 16 32; do
    mapfile -t cold < <(run "$qd" writeback)
    mapfile -t base < <(run "$qd" passthrough)
    python3 - "$qd" "$LAT" "${cold[0]}" "${cold[1]}" "${base[0]}" <<'PY'
import json, sys
qd, lat = sys.argv[1], sys.argv[2]
d, st, b = json.loads(sys.argv[3]), json.loads(sys.argv[4]), json.loads(sys.argv[5])
us = float(lat[:-2]) * (1000 if lat.endswith("ms") else 1)
l, bl = d["read"], b["read"]["mean_us"]
s = st["stats"]
print(f"| {qd} | {d['iops']:.0f} | {l['mean_us']:.0f} | {l['p50_us']:.0f} | {l['p99_us']:.0f} | "
      f"{l['mean_us']/us:.2f} | {bl:.0f} | {l['mean_us']/bl:.2f} | {s['read_hits']} | {s['read_misses']} |")
PY
done
