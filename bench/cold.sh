#!/usr/bin/env bash
# Cold random reads through the daemon from a slow source: a sparse 64 GiB
# source with --source-latency (default 5ms), a fresh cache per queue depth,
# 4 KiB random reads with vbc-load. Prints IOPS and latency per queue depth,
# and the engine's hit/miss counts (to show the reads were misses).
#   bench/cold.sh [LATENCY] [RUNTIME]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LAT=${1:-5ms}
RUNTIME=${2:-6s}
BIN=$ROOT/target/release/vblkcache
LOAD=$ROOT/target/release/examples/vbc-load
W=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$W"' EXIT
echo "| QD | IOPS | mean µs | p50 µs | p99 µs | mean / source latency | read hits | read misses |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|"
for qd in 1 4 16 32; do
    rm -f "$W"/*.img "$W"/*.sock
    truncate -s 64G "$W/source.img"
    truncate -s 1G "$W/cache.img"
    "$BIN" serve --source "$W/source.img" --cache "$W/cache.img" --socket "$W/v.sock" --control "$W/c.sock" \
        --source-latency "$LAT" --io-threads 64 2>"$W/daemon.log" &
    pid=$!
    until "$BIN" status --control "$W/c.sock" >/dev/null 2>&1; do
        kill -0 $pid || { cat "$W/daemon.log"; exit 1; }
        sleep 0.05
    done
    json=$("$LOAD" --socket "$W/v.sock" --pattern randread --bs 4K --iodepth "$qd" --queues 1 \
        --runtime "$RUNTIME" --ramp 0s --json)
    st=$("$BIN" status --json --control "$W/c.sock")
    kill -TERM $pid
    wait $pid || true
    python3 - "$qd" "$LAT" "$json" "$st" <<'PY'
import json, sys
qd, lat, d, st = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
us = float(lat[:-2]) * (1000 if lat.endswith("ms") else 1)
l = d["read"]
s = st["stats"]
print(f"| {qd} | {d['iops']:.0f} | {l['mean_us']:.0f} | {l['p50_us']:.0f} | {l['p99_us']:.0f} | {l['mean_us']/us:.2f} | {s['read_hits']} | {s['read_misses']} |")
PY
done
