#!/usr/bin/env bash
# Sustained writes beyond the cache: how write-back behaves once the cache is
# full of dirty blocks and background writeback cannot keep up with a slow
# source.
#
#   bench/sustain.sh [--bin PATH] [--label L] [--mode MODE] [--bs SIZE]
#                    [--latency DUR] [--cache-mib N] [--range-mib N]
#                    [--chunks N] [--chunk-s S] [--pattern P] [--rwmix PCT]
#                    [--read-size SIZE] [--drain-s S] [--serve-args "ARGS"]
#
# One daemon (--mode, default writeback; --bs is its block size, default 64K;
# --latency the injected source latency, default 5ms) with a fresh cache file
# of --cache-mib (default 128) in front of a --range-mib source (default
# 1024). Then --chunks (default 6) back-to-back vbc-load runs of --chunk-s
# seconds (default 3): 4K requests, QD32, --pattern (default randwrite) over
# the whole source; with --read-size the reads of randrw stay in the first
# SIZE bytes, read once before the load so that they are cached (a hot set
# read while others write). `vblkcache status` is sampled every 0.5 s. After
# the load the daemon idles --drain-s seconds (default 4), then `vblkcache
# flush` is timed. Prints a line per chunk and per status sample, then two
# SUMMARY lines. Run it with --mode passthrough for the source alone.
#
# Files go to target/sustain/LABEL (the source is kept between runs).
# Binaries: --bin (default target/release/vblkcache) and
# target/release/examples/vbc-load; nothing is built here.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/target/release/vblkcache LOAD=$ROOT/target/release/examples/vbc-load
LABEL=run MODE=writeback BSZ=64K LAT=5ms CACHE_MIB=128 RANGE_MIB=1024 CHUNKS=6 CHUNK_S=3
PATTERN=randwrite RWMIX=50 READ_SIZE="" DRAIN_S=4 SERVE_ARGS=""
while (($#)); do
    case $1 in
    --bin) BIN=$2 ;;
    --label) LABEL=$2 ;;
    --mode) MODE=$2 ;;
    --bs) BSZ=$2 ;;
    --latency) LAT=$2 ;;
    --cache-mib) CACHE_MIB=$2 ;;
    --range-mib) RANGE_MIB=$2 ;;
    --chunks) CHUNKS=$2 ;;
    --chunk-s) CHUNK_S=$2 ;;
    --pattern) PATTERN=$2 ;;
    --rwmix) RWMIX=$2 ;;
    --read-size) READ_SIZE=$2 ;;
    --drain-s) DRAIN_S=$2 ;;
    --serve-args) SERVE_ARGS=$2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "sustain.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift 2
done
for b in "$BIN" "$LOAD"; do
    [[ -x $b ]] || { echo "sustain.sh: $b not built (cargo build --release --all-targets)" >&2; exit 2; }
done
BASE=$ROOT/target/sustain
W=$BASE/$LABEL
rm -rf "$W"
mkdir -p "$W"
SRC=$BASE/source-${RANGE_MIB}M.img
if [[ ! -f $SRC ]]; then
    dd if=/dev/zero of="$SRC" bs=4M count=$((RANGE_MIB / 4)) oflag=direct status=none
fi
fallocate -l "${CACHE_MIB}M" "$W/cache.img"
args=(serve --source "$SRC" --cache "$W/cache.img" --socket "$W/v.sock" --control "$W/c.sock"
    --mode "$MODE" --crash-state-dir off)
[[ $MODE == passthrough ]] || args+=(--block-size "$BSZ")
[[ $LAT == 0 ]] || args+=(--source-latency "$LAT")
# shellcheck disable=SC2206 # word splitting wanted
args+=($SERVE_ARGS)
"$BIN" "${args[@]}" 2>"$W/daemon.log" &
pid=$!
spid=""
trap 'kill $pid 2>/dev/null; [[ -z $spid ]] || kill $spid 2>/dev/null; true' EXIT
until "$BIN" status --control "$W/c.sock" >/dev/null 2>&1; do
    kill -0 $pid || { cat "$W/daemon.log" >&2; exit 1; }
    sleep 0.05
done
T0=$(date +%s.%N)
(
    while kill -0 $pid 2>/dev/null; do
        s=$("$BIN" status --json --control "$W/c.sock" 2>/dev/null) || break
        echo "$(date +%s.%N) $s"
        sleep 0.5
    done
) >"$W/status.log" &
spid=$!
extra=()
if [[ -n $READ_SIZE ]]; then
    "$LOAD" --socket "$W/v.sock" --pattern read --bs 64K --iodepth 8 --size "$READ_SIZE" --once \
        --runtime 60s --ramp 0s --json >"$W/warm.json"
    extra=(--read-size "$READ_SIZE")
fi
for i in $(seq 1 "$CHUNKS"); do
    t=$(date +%s.%N)
    j=$("$LOAD" --socket "$W/v.sock" --pattern "$PATTERN" --rwmix-read "$RWMIX" --bs 4K --iodepth 32 \
        --size "${RANGE_MIB}M" --runtime "${CHUNK_S}s" --ramp 0s --seed "$i" --stall-timeout 60s \
        "${extra[@]}" --json)
    echo "$t $j" >>"$W/load.log"
done
TL=$(date +%s.%N)
sleep "$DRAIN_S"
TF=$(date +%s.%N)
"$BIN" flush --control "$W/c.sock" >/dev/null
TE=$(date +%s.%N)
sleep 0.6
kill -TERM $pid
wait $pid || true
kill $spid 2>/dev/null || true
echo "$T0 $TL $TF $TE" >"$W/times"
python3 "$ROOT/bench/sustain_report.py" "$W" "$LABEL"
