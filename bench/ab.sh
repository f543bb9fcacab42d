#!/usr/bin/env bash
# Paired A/B of two vblkcache configurations on the same machine minute.
#
#   bench/ab.sh [--a "ARGS"] [--b "ARGS"] [--rounds N] [--queues N]
#               [--iodepth N] [--bs SIZE] [--pattern P] [--runtime SECONDS]
#               [--swap] [--dir DIR] [--no-build] [--a-bin PATH]
#               [--load "ARGS"]
#
# Two daemons, A and B, each with its own copy of a 256 MiB source and its
# own 400 MiB cache file under DIR (default target/), both warmed by one
# sequential read. Then, N rounds (default 6): one vbc-load run against A,
# one against B, each RUNTIME seconds after a 1 s ramp. Daemon CPU is read
# from /proc/PID/stat around each run. Prints each run and the median of
# the per-round ratios B/A for IOPS and CPU per I/O.
#
# The second run of a round can be systematically slower or faster than the
# first on a shared machine; --swap runs B first in every round. Run both
# orders (or A against A) before believing a difference of a few per cent.
#
# --load "ARGS" adds arguments to every vbc-load run (e.g. "--flush-every 32").
#
# --a-bin PATH runs A from another vblkcache binary (B is always this
# tree's release build), to compare two versions of the code, e.g. one
# built from an older commit with `git worktree add` and CARGO_TARGET_DIR.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
A_ARGS="" B_ARGS="" ROUNDS=6 QUEUES=1 QD=32 BS=4K PAT=randread RT=5 SWAP=0
DIR="$ROOT/target" BUILD=1 A_BIN=""
while [ $# -gt 0 ]; do
    case "$1" in
        --a) A_ARGS=$2; shift ;;
        --b) B_ARGS=$2; shift ;;
        --rounds) ROUNDS=$2; shift ;;
        --queues) QUEUES=$2; shift ;;
        --iodepth) QD=$2; shift ;;
        --bs) BS=$2; shift ;;
        --pattern) PAT=$2; shift ;;
        --load) LOAD_ARGS=$2; shift ;;
        --runtime) RT=$2; shift ;;
        --swap) SWAP=1 ;;
        --dir) DIR=$2; shift ;;
        --no-build) BUILD=0 ;;
        --a-bin) A_BIN=$2; shift ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "ab.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
for n in "$ROUNDS" "$QUEUES" "$QD" "$RT"; do
    case "$n" in '' | *[!0-9]* | 0) echo "ab.sh: expected a positive number, got '$n'" >&2; exit 2 ;; esac
done

if [ "$BUILD" = 1 ]; then
    (cd "$ROOT" && cargo build --release --quiet && cargo build --release --quiet --example vbc-load)
fi
BIN=$ROOT/target/release/vblkcache
if [ -n "$A_BIN" ] && [ ! -x "$A_BIN" ]; then
    echo "ab.sh: --a-bin $A_BIN is not an executable file" >&2
    exit 2
fi
LOAD=$ROOT/target/release/examples/vbc-load
WORK=$(mktemp -d "$DIR/vbc-ab.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

truncate -s 256M "$WORK/source.img"
"$LOAD" --file "$WORK/source.img" --pattern write --bs 1M --iodepth 8 --once --ramp 0 \
    --runtime 600s --json >/dev/null
declare -A PID
for t in A B; do
    cp "$WORK/source.img" "$WORK/source-$t.img"
    truncate -s 400M "$WORK/cache-$t.img"
    args=$A_ARGS bin=${A_BIN:-$BIN}
    [ "$t" = B ] && args=$B_ARGS bin=$BIN
    read -r -a extra <<<"$args"
    "$bin" serve --source "$WORK/source-$t.img" --cache "$WORK/cache-$t.img" \
        --socket "$WORK/$t.sock" --control "$WORK/ctl-$t.sock" --queues "$QUEUES" \
        "${extra[@]}" >"$WORK/daemon-$t.log" 2>&1 &
    PID[$t]=$!
    PIDS+=("$!")
    for _ in $(seq 600); do [ -S "$WORK/ctl-$t.sock" ] && break; sleep 0.05; done
    [ -S "$WORK/ctl-$t.sock" ] || { echo "ab.sh: daemon $t did not start:" >&2; cat "$WORK/daemon-$t.log" >&2; exit 1; }
    "$LOAD" --socket "$WORK/$t.sock" --pattern read --bs 1M --iodepth 8 --once --ramp 0 \
        --runtime 600s --json >/dev/null
done

echo "A: ${A_BIN:+$A_BIN }${A_ARGS:-(defaults)}   B: ${B_ARGS:-(defaults)}   $PAT $BS QD$QD, $QUEUES queue(s), ${RT}s x $ROUNDS rounds$([ "$SWAP" = 1 ] && echo ', B first')"
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
order="A B"
[ "$SWAP" = 1 ] && order="B A"
for ((i = 1; i <= ROUNDS; i++)); do
    for t in $order; do
        t0=$(ticks "${PID[$t]}")
        read -r -a more <<<"${LOAD_ARGS:-}"
        json=$("$LOAD" --socket "$WORK/$t.sock" --pattern "$PAT" --bs "$BS" --iodepth "$QD" \
            --queues "$QUEUES" --runtime "${RT}s" --ramp 1s ${more[@]+"${more[@]}"} --json)
        t1=$(ticks "${PID[$t]}")
        python3 -c '
import json, sys
t, rnd, ticks, hz, rt, js = sys.argv[1:7]
r = json.loads(js)
ios = r["iops"] * (float(rt) + 1)  # the ramp second is served too
print(t, rnd, round(r["iops"]), round(int(ticks) / int(hz) / ios * 1e6, 2))' \
            "$t" "$i" $((t1 - t0)) "$HZ" "$RT" "$json" | tee -a "$WORK/runs.txt"
    done
done
python3 - "$WORK/runs.txt" <<'PY'
import sys, statistics as st
rows = [l.split() for l in open(sys.argv[1])]
run = {(r[0], r[1]): (float(r[2]), float(r[3])) for r in rows}
rounds = sorted({r[1] for r in rows}, key=int)
for k, name in ((0, "IOPS"), (1, "CPU us/IO")):
    a = [run[("A", i)][k] for i in rounds]
    b = [run[("B", i)][k] for i in rounds]
    ratios = [y / x for x, y in zip(a, b) if x]
    print(f"{name:10} A median {st.median(a):10.2f}  B median {st.median(b):10.2f}  "
          f"B/A per round: median {st.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")
PY
grep -h -i -E "warn|error" "$WORK"/daemon-*.log | head -5 || true
