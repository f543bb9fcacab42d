#!/usr/bin/env bash
# Side-by-side benchmark: vblkcache (fully warm cache) against
# qemu-storage-daemon serving a file raw, and against io_uring on the file
# directly, all driven by the same libblkio client (examples/vbc-load).
#
#   bench/compare.sh [--quick] [--dir DIR] [--shm-dir DIR] [--no-shm]
#                    [--out FILE] [--no-build] [--poll DURATION] [--only REGEX]
#                    [--source-latency DURATION] [--no-cold] [--no-writeback]
#                    [--repeat N] [--vbc-args "ARGS"] [--also-vbc "NAME:ARGS"]
#                    [--also-bin PATH]
#
# Two passes: "disk" (files under DIR, default target/, O_DIRECT everywhere)
# and "tmpfs" (fast files under /dev/shm, page cache since tmpfs has no
# O_DIRECT: the CPU-bound case). In each pass qsd serves fast.img, vblkcache
# serves source.img through cache.img (both in the pass's directory; the
# source always on DIR, with --source-latency 5ms injected: a slow source
# that a warm cache must hide; change it with --source-latency), and raw
# runs io_uring on fast.img. Every workload is
# run on the three targets back to back, so their ratios come from the same
# minute of a noisy machine. Daemon CPU is read from /proc/PID/stat around
# each run and divided by the data requests that run completed. Around each
# run it also reads the counters of the block device under the files
# ("device": requests, merges, sectors, time its requests spent in it, and
# the wall time of the run; none on tmpfs) and the machine's
# context switches and interrupts ("machine_events", from /proc/stat).
#
# Results: one JSON object per run in --out (default
# target/compare-results.jsonl; daemon logs and vblkcache's final status in
# the directory of the same name ending in -logs); the table is printed at
# the end.
# --poll 32us: both daemons busy-poll their queues: vblkcache with
# `--poll 32us`, qsd from an iothread with poll-max-ns=32000 (an iothread is
# how qsd polls; its default poll-max-ns is 32768). Without it neither polls
# (qsd serves from its main loop, which does not poll).
# --only REGEX: run only the workloads whose name matches (grep -E).
# --vbc-args "ARGS": extra options for `vblkcache serve` (split on spaces),
# e.g. "--queue-threads 1"; recorded in the machine line of --out.
# --also-vbc "NAME:ARGS": a second vblkcache daemon with these extra options
# (its own source copy and cache file, warmed the same way) runs as a fourth
# target, "vblkcache-NAME", in the same rounds; e.g.
# "pin:--pin-guest-memory".
# --also-bin PATH: the vblkcache binary of that fourth target (default: this
# tree's release build), to compare an older build side by side, e.g.
# --also-vbc "old:" --also-bin /tmp/old/vblkcache.
# --repeat N: run each workload N rounds on the three targets, rotating
# which target goes first, and report the median of the per-round ratios
# with their range (this VM's disk drifts by 10-20 % between minutes).
# After the passes, a full run (not --quick, not --no-cold) also runs the
# cold case: bench/cold.sh (4K random reads, all misses, from a source with
# 5 ms injected latency, against the same daemon in passthrough mode) and
# the writeback case (`cargo bench --bench engine -- --only writeback`:
# flush_all of contiguous dirty blocks to a source with 1 ms injected
# latency per request, or 1 ms + 180 MiB/s, timed side by side with writing
# the same bytes straight to that source; unless --no-writeback).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
QUICK=0
DIR="$ROOT/target"
SHM_DIR=/dev/shm
DO_SHM=1
OUT="$ROOT/target/compare-results.jsonl"
BUILD=1
POLL=""
ONLY=""
SRC_LAT=5ms
COLD=1
WB=1
REPEAT=1
DEV=
VBC_EXTRA=()
ALSO_NAME=""
ALSO_ARGS=()
ALSO_BIN=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --dir) DIR=$2; shift ;;
        --shm-dir) SHM_DIR=$2; shift ;;
        --no-shm) DO_SHM=0 ;;
        --out) OUT=$2; shift ;;
        --no-build) BUILD=0 ;;
        --poll) POLL=$2; shift ;;
        --only) ONLY=$2; shift ;;
        --source-latency) SRC_LAT=$2; shift ;;
        --no-cold) COLD=0 ;;
        --no-writeback) WB=0 ;;
        --repeat) REPEAT=$2; shift ;;
        --vbc-args) read -r -a VBC_EXTRA <<<"$2"; shift ;;
        --also-bin) ALSO_BIN=$2; shift ;;
        --also-vbc)
            ALSO_NAME=${2%%:*}
            read -r -a ALSO_ARGS <<<"${2#*:}"
            if [ -z "$ALSO_NAME" ] || [ "$ALSO_NAME" = "$2" ]; then
                echo "compare.sh: --also-vbc wants NAME:ARGS, e.g. pin:--pin-guest-memory" >&2; exit 2
            fi
            shift ;;
        -h|--help) sed -n '2,54p' "$0"; exit 0 ;;
        *) echo "compare.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

case "$REPEAT" in
    ''|*[!0-9]*|0) echo "compare.sh: --repeat needs a positive number, not '$REPEAT'" >&2; exit 2 ;;
esac
if [ "$QUICK" = 1 ]; then
    RUNTIME=3s; RAMP=500ms; DISK_MIB=512
else
    RUNTIME=10s; RAMP=2s; DISK_MIB=1024
fi
# The cache needs room for its metadata and slack for the hashed set mapping
# (a set overflows long before the cache as a whole is full).
CACHE_MIB=$((DISK_MIB * 3 / 2))
QUEUES=2
QSD_POLL=()
VBC_POLL=()
if [ -n "$POLL" ]; then
    POLL_NS=$(python3 -c '
import re, sys
m = re.fullmatch(r"(\d+)(ns|us|ms)", sys.argv[1])
if not m:
    sys.exit("compare.sh: --poll %s: expected a duration like 32us" % sys.argv[1])
print(int(m.group(1)) * {"ns": 1, "us": 1000, "ms": 1000000}[m.group(2)])' "$POLL")
    QSD_POLL=(--object "iothread,id=io0,poll-max-ns=$POLL_NS")
    VBC_POLL=(--poll "$POLL")
fi

BIN="$ROOT/target/release/vblkcache"
ALSO_BIN=${ALSO_BIN:-$BIN}
if [ ! -x "$ALSO_BIN" ]; then
    echo "compare.sh: --also-bin $ALSO_BIN is not an executable file" >&2; exit 2
fi
LOAD="$ROOT/target/release/examples/vbc-load"
if [ "$BUILD" = 1 ]; then
    (cd "$ROOT" && cargo build --release --quiet --bin vblkcache --example vbc-load)
fi
command -v qemu-storage-daemon >/dev/null || { echo "compare.sh: qemu-storage-daemon not found" >&2; exit 2; }
CLK_TCK=$(getconf CLK_TCK)

mkdir -p "$DIR"
WORK=$(mktemp -d "$DIR/vbc-compare.XXXXXX")
SHM_WORK=""
PIDS=()
FAILED=0

stop_pid() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 200); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
    local p
    for p in "${PIDS[@]}"; do stop_pid "$p"; done
    PIDS=()
    rm -rf "$WORK"
    if [ -n "$SHM_WORK" ]; then rm -rf "$SHM_WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "[compare $(date +%T)] $*" >&2; }

# Waits (polling, 30 s at most) until a Unix socket at $1 exists and the
# daemon $2 is still alive.
wait_socket() {
    local path=$1 pid=$2
    for _ in $(seq 600); do
        if ! kill -0 "$pid" 2>/dev/null; then
            log "daemon $pid died before creating $path"; return 1
        fi
        [ -S "$path" ] && return 0
        sleep 0.05
    done
    log "timed out waiting for $path"; return 1
}

# "utime+stime stime" of a process (all CPU, then kernel time alone), in
# clock ticks.
cpu_ticks() {
    local s
    s=$(<"/proc/$1/stat")
    s=${s##*) }
    # shellcheck disable=SC2086
    set -- $s
    echo "$(( ${12} + ${13} )) ${13}"
}

# The block device that holds $1 (its /sys/class/block name), or nothing.
block_dev_of() {
    local src
    src=$(findmnt -no SOURCE --target "$1" 2>/dev/null) || return 0
    src=$(basename "$src")
    [ -r "/sys/class/block/$src/stat" ] && echo "$src"
    return 0
}

# "read_ios read_merges read_sectors write_ios write_merges write_sectors
# read_ms write_ms" of block device $1 (zeros when there is none, e.g.
# tmpfs). The last two are the summed time its requests spent in the device
# (from issue to completion), in milliseconds.
dev_stat() {
    if [ -n "$1" ]; then
        # shellcheck disable=SC2046
        set -- $(<"/sys/class/block/$1/stat")
        echo "$1 $2 $3 $5 $6 $7 $4 $8"
    else
        echo "0 0 0 0 0 0 0 0"
    fi
}

# "context_switches interrupts" of the whole machine so far (/proc/stat).
# The fields are printed as read: awk prints numbers above 2^31 as 2.1e+09.
sys_events() {
    awk '$1 == "ctxt" { c = $2 } $1 == "intr" { i = $2 }
        END { printf "%s %s\n", (c == "" ? 0 : c), (i == "" ? 0 : i) }' /proc/stat
}

status_field() { # control-socket field (dotted path) -> value
    "$BIN" status --json --control "$1" | python3 -c '
import json, sys
v = json.load(sys.stdin)
for k in sys.argv[1].split("."):
    v = v[k]
print(v)' "$2"
}

fill() { # file, extra vbc-load args: write every byte once with 1M requests
    local f=$1; shift
    truncate -s "${DISK_MIB}M" "$f"
    "$LOAD" --file "$f" "$@" --pattern write --bs 1M --iodepth 8 --once --ramp 0 \
        --runtime 600s --json >/dev/null
}

# run_one PASS WORKLOAD TARGET DAEMON_PID CTL -- vbc-load args...
run_one() {
    local pass=$1 wl=$2 target=$3 pid=$4 ctl=$5; shift 6
    local t0=0 t1=0 k0=0 k1=0 m0=0 m1=0 json rc=0 err="$WORK/load.err"
    local d0 d1 e0 e1 w0 w1
    w0=$(date +%s%N)
    d0=$(dev_stat "$DEV")
    e0=$(sys_events)
    [ "$pid" != - ] && read -r t0 k0 < <(cpu_ticks "$pid")
    [ "$ctl" != - ] && { m0=$(status_field "$ctl" stats.read_misses) || m0=0; }
    json=$("$LOAD" "$@" --runtime "$RUNTIME" --ramp "$RAMP" --json 2>"$err") || rc=$?
    [ "$pid" != - ] && { read -r t1 k1 < <(cpu_ticks "$pid") || { t1=$t0; k1=$k0; }; }
    d1=$(dev_stat "$DEV")
    w1=$(date +%s%N)
    e1=$(sys_events)
    [ "$ctl" != - ] && { m1=$(status_field "$ctl" stats.read_misses) || m1=$m0; }
    if [ "$rc" != 0 ] || [ -z "$json" ]; then
        FAILED=1
        log "FAILED ($rc): $pass / $wl / $target: vbc-load $*"
        sed 's/^/    /' "$err" >&2
        [ -n "$json" ] && echo "    $json" >&2
        json=null
    fi
    if [ "$pid" != - ] && ! kill -0 "$pid" 2>/dev/null; then
        FAILED=1
        log "daemon of $target ($pid) is gone after $wl"
    fi
    python3 -c '
import json, sys
pass_, wl, target, ticks, hz, misses, rc, load, kticks, rnd, dev, d0, d1, e0, e1, wall = sys.argv[1:17]
keys = ["read_ios", "read_merges", "read_sectors", "write_ios", "write_merges", "write_sectors", "read_ms", "write_ms"]
delta = {k: int(b) - int(a) for k, a, b in zip(keys, d0.split(), d1.split())}
print(json.dumps({"pass": pass_, "workload": wl, "target": target, "round": int(rnd),
    "device": dict(name=dev, wall_s=int(wall) / 1e9, **delta) if dev else None,
    "machine_events": {k: int(b) - int(a) for k, a, b in zip(["context_switches", "interrupts"], e0.split(), e1.split())},
    "daemon_cpu_s": None if ticks == "-" else int(ticks) / int(hz),
    "daemon_sys_s": None if kticks == "-" else int(kticks) / int(hz),
    "read_misses": None if misses == "-" else int(misses),
    "rc": int(rc), "load": json.loads(load)}))' \
        "$pass" "$wl" "$target" \
        "$([ "$pid" != - ] && echo $((t1 - t0)) || echo -)" "$CLK_TCK" \
        "$([ "$ctl" != - ] && echo $((m1 - m0)) || echo -)" "$rc" "$json" \
        "$([ "$pid" != - ] && echo $((k1 - k0)) || echo -)" "$ROUND" "$DEV" "$d0" "$d1" "$e0" "$e1" "$((w1 - w0))" >>"$OUT"
    log "$pass / $wl / $target done (round $ROUND)"
}

WORKLOADS=(
    "4K randread QD32 1q|--pattern randread --bs 4K --iodepth 32 --queues 1"
    "4K randread QD32 2q|--pattern randread --bs 4K --iodepth 32 --queues 2"
    "4K randread QD1 1q|--pattern randread --bs 4K --iodepth 1 --queues 1"
    "1M read QD8|--pattern read --bs 1M --iodepth 8 --queues 1"
    "4K randwrite QD32|--pattern randwrite --bs 4K --iodepth 32 --queues 1"
    "4K randwrite QD32 flush/32|--pattern randwrite --bs 4K --iodepth 32 --queues 1 --flush-every 32"
    "4K randwrite QD32 flush/1|--pattern randwrite --bs 4K --iodepth 32 --queues 1 --flush-every 1"
)

# rotate K WORDS...: the words, starting from the (K mod count)-th.
rotate() {
    local k=$1; shift
    local n=$# i
    for ((i = 0; i < n; i++)); do
        local j=$(((k + i) % n + 1))
        echo "${!j}"
    done
}
ROUND=1

# warm PASS PREFIX: warms the vblkcache daemon at $WORK/PREFIX.sock (control
# socket $WORK/ctl.sock for "vbc", $WORK/PREFIX-ctl.sock otherwise): one
# sequential pass over the disk, then checks that the whole disk is cached
# and that a second pass misses nothing.
warm() {
    local name=$1 sock="$WORK/$2.sock" ctl="$WORK/$2-ctl.sock" valid bsz m0 m1
    [ "$2" = vbc ] && ctl="$WORK/ctl.sock"
    log "warming vblkcache ($2)"
    "$LOAD" --socket "$sock" --pattern read --bs 1M --iodepth 8 --once --ramp 0 \
        --runtime 600s --json >/dev/null
    valid=$(status_field "$ctl" valid_blocks)
    bsz=$(status_field "$ctl" geometry.block_size)
    m0=$(status_field "$ctl" stats.read_misses)
    "$LOAD" --socket "$sock" --pattern read --bs 1M --iodepth 8 --once --ramp 0 \
        --runtime 600s --json >/dev/null
    m1=$(status_field "$ctl" stats.read_misses)
    log "warm ($2): valid_blocks=$valid x $bsz bytes (disk $((DISK_MIB << 20))), misses on the second pass: $((m1 - m0))"
    if [ $((valid * bsz)) -lt $((DISK_MIB << 20)) ] || [ "$m1" != "$m0" ]; then
        log "WARNING: the vblkcache cache ($2) is not fully warm"
        FAILED=1
    fi
    [ "$2" = vbc ] &&
        echo "{\"pass\":\"$name\",\"warm\":{\"valid_blocks\":$valid,\"block_size\":$bsz,\"second_pass_misses\":$((m1 - m0))}}" >>"$OUT"
    return 0
}

# run_pass NAME FASTDIR DIRECT(1|0)
run_pass() {
    local name=$1 fast=$2 direct=$3 qpid vpid w wl args
    local fdir=on vdirect=(--direct) lbuf=()
    if [ "$direct" = 0 ]; then fdir=off; vdirect=(); lbuf=(--buffered); fi
    log "pass $name: files in $fast (O_DIRECT: $direct)"
    # Block-device counters around each run (the whole device: other
    # processes' I/O counts too), to compare request sizes at the device.
    DEV=$(block_dev_of "$fast")
    [ "$direct" = 0 ] && DEV=
    rm -f "$fast"/fast.img "$fast"/cache.img
    fill "$fast/fast.img" "${lbuf[@]}"
    truncate -s "${CACHE_MIB}M" "$fast/cache.img"

    local qexport="type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=$WORK/qsd.sock,writable=on,num-queues=$QUEUES"
    [ -n "$POLL" ] && qexport="$qexport,iothread=io0"
    qemu-storage-daemon "${QSD_POLL[@]}" \
        --blockdev "driver=file,node-name=f,filename=$fast/fast.img,cache.direct=$fdir,aio=io_uring" \
        --blockdev driver=raw,node-name=d,file=f \
        --export "$qexport" \
        >"$WORK/qsd-$name.log" 2>&1 &
    qpid=$!; PIDS+=("$qpid")
    "$BIN" serve --source "$WORK/source.img" --cache "$fast/cache.img" --socket "$WORK/vbc.sock" \
        --queues "$QUEUES" --control "$WORK/ctl.sock" "${vdirect[@]}" "${VBC_POLL[@]}" \
        --source-latency "$SRC_LAT" "${VBC_EXTRA[@]}" \
        >"$WORK/vbc-$name.log" 2>&1 &
    vpid=$!; PIDS+=("$vpid")
    wait_socket "$WORK/qsd.sock" "$qpid"
    wait_socket "$WORK/vbc.sock" "$vpid"
    wait_socket "$WORK/ctl.sock" "$vpid"

    warm "$name" vbc
    local apid=""
    if [ -n "$ALSO_NAME" ]; then
        truncate -s "${CACHE_MIB}M" "$fast/cache-also.img"
        "$ALSO_BIN" serve --source "$WORK/source-also.img" --cache "$fast/cache-also.img" \
            --socket "$WORK/also.sock" --queues "$QUEUES" --control "$WORK/also-ctl.sock" \
            "${vdirect[@]}" "${VBC_POLL[@]}" --source-latency "$SRC_LAT" "${VBC_EXTRA[@]}" \
            "${ALSO_ARGS[@]}" >"$WORK/vbc-$ALSO_NAME-$name.log" 2>&1 &
        apid=$!; PIDS+=("$apid")
        wait_socket "$WORK/also.sock" "$apid"
        wait_socket "$WORK/also-ctl.sock" "$apid"
        warm "$name" also
    fi

    for w in "${WORKLOADS[@]}"; do
        wl=${w%%|*}
        if [ -n "$ONLY" ] && ! grep -qE "$ONLY" <<<"$wl"; then continue; fi
        read -r -a args <<<"${w#*|}"
        for ((ROUND = 1; ROUND <= REPEAT; ROUND++)); do
            # Rotate the order, so that no target always runs first.
            local targets=(qsd vblkcache raw)
            [ -n "$apid" ] && targets=(qsd vblkcache "vblkcache-$ALSO_NAME" raw)
            for t in $(rotate $((ROUND - 1)) "${targets[@]}"); do
                case $t in
                    "vblkcache-$ALSO_NAME") run_one "$name" "$wl" "$t" "$apid" "$WORK/also-ctl.sock" -- \
                        --socket "$WORK/also.sock" "${args[@]}" ;;
                    qsd) run_one "$name" "$wl" qsd "$qpid" - -- --socket "$WORK/qsd.sock" "${args[@]}" ;;
                    vblkcache) run_one "$name" "$wl" vblkcache "$vpid" "$WORK/ctl.sock" -- \
                        --socket "$WORK/vbc.sock" "${args[@]}" ;;
                    raw) run_one "$name" "$wl" raw - - -- --file "$fast/fast.img" "${lbuf[@]}" "${args[@]}" ;;
                esac
            done
        done
    done
    "$BIN" status --json --control "$WORK/ctl.sock" >"$LOGS/vbc-$name-status.json" || true
    stop_pid "$qpid"
    stop_pid "$vpid"
    if [ -n "$apid" ]; then
        "$BIN" status --json --control "$WORK/also-ctl.sock" >"$LOGS/vbc-$ALSO_NAME-$name-status.json" || true
        stop_pid "$apid"
        cp "$WORK/vbc-$ALSO_NAME-$name.log" "$LOGS/" 2>/dev/null || true
    fi
    PIDS=()
    cp "$WORK/qsd-$name.log" "$WORK/vbc-$name.log" "$LOGS/" 2>/dev/null || true
    rm -f "$WORK"/*.sock "$fast/fast.img" "$fast/cache.img" "$fast/cache-also.img"
}

: >"$OUT"
# Daemon logs and vblkcache's final status go next to the results.
LOGS="${OUT%.jsonl}-logs"
mkdir -p "$LOGS"
echo "{\"machine\":{\"nproc\":$(nproc),\"cpu\":\"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')\",\"date\":\"$(date -u +%FT%TZ)\",\"quick\":$QUICK,\"runtime\":\"$RUNTIME\",\"ramp\":\"$RAMP\",\"disk_mib\":$DISK_MIB,\"cache_mib\":$CACHE_MIB,\"queues\":$QUEUES,\"poll\":\"$POLL\",\"source_latency\":\"$SRC_LAT\",\"repeat\":$REPEAT,\"vbc_args\":\"${VBC_EXTRA[*]}\",\"also_vbc\":\"${ALSO_NAME:+$ALSO_NAME:${ALSO_ARGS[*]}}\",\"also_bin\":\"${ALSO_NAME:+$ALSO_BIN}\"}}" >>"$OUT"
log "source: ${DISK_MIB} MiB in $WORK"
fill "$WORK/source.img"
[ -n "$ALSO_NAME" ] && cp "$WORK/source.img" "$WORK/source-also.img"
run_pass disk "$WORK" 1
if [ "$DO_SHM" = 1 ]; then
    SHM_WORK=$(mktemp -d "$SHM_DIR/vbc-compare.XXXXXX")
    run_pass tmpfs "$SHM_WORK" 0
fi
python3 "$ROOT/bench/compare_table.py" "$OUT"
if [ "$QUICK" = 0 ] && [ "$COLD" = 1 ]; then
    log "cold case: bench/cold.sh 5ms 6s"
    bash "$ROOT/bench/cold.sh" 5ms 6s | tee "$LOGS/cold.txt" || FAILED=1
fi
if [ "$QUICK" = 0 ] && [ "$WB" = 1 ]; then
    log "writeback case: cargo bench --bench engine -- --only writeback"
    (cd "$ROOT" && cargo bench --quiet --bench engine -- --only writeback) >"$LOGS/writeback.txt" 2>&1 || FAILED=1
    grep -E "flush_all / direct|direct write rate|flush_all rate" "$LOGS/writeback.txt" || FAILED=1
fi
log "results: $OUT"
exit "$FAILED"
