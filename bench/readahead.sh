#!/usr/bin/env bash
# Sequential readahead on read misses, on and off side by side.
#
#   bench/readahead.sh [ROUNDS]
#
# Cold reads through the daemon from a sparse 8 GiB source with 5 ms of
# injected latency and a fresh 2 GiB cache per run, with --readahead 0 and
# with the default, one after the other in each round: 4 KiB sequential at
# QD1, 64 KiB sequential at QD4 and 4 KiB random at QD32 (5 s each, vbc-load).
# Prints IOPS, mean latency and the engine's read misses, blocks fetched
# ahead and windows dropped for each run.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/vblkcache; LOAD=target/release/examples/vbc-load
W=$(mktemp -d target/ra-load.XXXX); trap 'kill $(jobs -p) 2>/dev/null; rm -rf $W' EXIT
run() { # pattern bs qd ra
  local ra_arg=(); [ "$4" = default ] || ra_arg=(--readahead "$4")
  rm -f $W/*.img $W/*.sock; truncate -s 8G $W/s.img; truncate -s 2G $W/c.img
  $BIN serve --source $W/s.img --cache $W/c.img --socket $W/v.sock --control $W/c.sock --source-latency 5ms "${ra_arg[@]}" 2>$W/d.log & P=$!
  until $BIN status --control $W/c.sock >/dev/null 2>&1; do kill -0 $P || { cat $W/d.log >&2; exit 1; }; sleep 0.05; done
  j=$($LOAD --socket $W/v.sock --pattern $1 --bs $2 --iodepth $3 --queues 1 --runtime 5s --ramp 0s --json)
  st=$($BIN status --json --control $W/c.sock); kill -TERM $P; wait $P
  python3 -c "import json,sys; d=json.loads(sys.argv[1]); s=json.loads(sys.argv[2])['stats']; print(f'$1 $2 QD$3 ra=$4: {d[\"iops\"]:.0f} IOPS, mean {d[\"read\"][\"mean_us\"]:.0f} us, misses {s[\"read_misses\"]}, ahead {s[\"readahead_blocks\"]}, dropped {s[\"readahead_dropped\"]}')" "$j" "$st"
}
for _ in $(seq 1 "${1:-2}"); do
  for ra in 0 default; do run read 4K 1 $ra; done
  for ra in 0 default; do run read 64K 4 $ra; done
  for ra in 0 default; do run randread 4K 32 $ra; done
done
