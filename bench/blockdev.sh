#!/usr/bin/env bash
# Warm 4K random reads with the cache on a block device (a loop device with
# direct I/O over a file under DIR), side by side in one run:
#   qsd      qemu-storage-daemon serving the loop device raw (io_uring,
#            cache.direct=on)
#   vbc      vblkcache with the loop device as its cache device, a file
#            source with 5 ms latency, fully warm
#   vbc-a    the same with another build (--a-bin), e.g. one before a change
# Each round runs every target back to back, each starting with none of the
# device's data in the host page cache (blockdev --flushbufs); IOPS and daemon
# CPU per I/O are printed per round and as medians, with the ratios to qsd.
# Also per target: KiB read from the device per I/O, and the host's block
# device page cache ("Buffers" in /proc/meminfo) at the end of the run.
# The loop device's own work runs in its kernel workers, which are not
# charged to either daemon: CPU per I/O here is lower than on a real disk.
#
#   bench/blockdev.sh [--rounds N] [--runtime 10s] [--dir DIR] [--a-bin PATH]
#                     [--queues N] [--no-build]
# Needs root (losetup).
set -euo pipefail
ROUNDS=3 RUNTIME=10s DIR=target A_BIN="" QUEUES=1 BUILD=1
while [ $# -gt 0 ]; do
    case $1 in
    --rounds) ROUNDS=$2; shift 2 ;;
    --runtime) RUNTIME=$2; shift 2 ;;
    --dir) DIR=$(realpath -m "$2"); shift 2 ;;
    --a-bin) A_BIN=$(realpath "$2"); shift 2 ;;
    --queues) QUEUES=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    *) echo "blockdev.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."
[ "$BUILD" = 1 ] && cargo build --release --examples -q
BIN=target/release/vblkcache LOAD=target/release/examples/vbc-load
CLK_TCK=$(getconf CLK_TCK)
mkdir -p "$DIR"
WORK=$(mktemp -d "$DIR/vbc-blockdev.XXXXXX")
LOOP="" PIDS=()
cleanup() {
    set +e
    for p in ${PIDS[@]+"${PIDS[@]}"}; do
        kill -TERM "$p" 2>/dev/null
        for _ in $(seq 500); do kill -0 "$p" 2>/dev/null || break; sleep 0.02; done
        kill -KILL "$p" 2>/dev/null
    done
    [ -n "$LOOP" ] && losetup -d "$LOOP"
    rm -rf "$WORK"
}
trap cleanup EXIT

truncate -s 1G "$WORK/cache.img"
LOOP=$(losetup --find --show --direct-io=on "$WORK/cache.img")
dd if=/dev/urandom of="$WORK/source.img" bs=1M count=768 status=none

wait_socket() {
    for _ in $(seq 500); do [ -S "$1" ] && return 0; sleep 0.02; done
    echo "blockdev.sh: no socket $1" >&2; exit 1
}
# stop PID: SIGTERM, then wait for the process to go (it is not a child of
# this shell: `start` runs in a command substitution).
stop() {
    kill -TERM "$1" 2>/dev/null || return 0
    for _ in $(seq 1500); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.02; done
    echo "blockdev.sh: pid $1 did not stop" >&2; exit 1
}
ticks() { local s; s=$(<"/proc/$1/stat"); s=${s##*) }; set -- $s; echo $(( ${12} + ${13} )); }

# start NAME: starts the daemon of target NAME, prints its pid.
start() {
    rm -f "$WORK/s.sock"
    case $1 in
    qsd)
        qemu-storage-daemon \
            --blockdev "driver=host_device,node-name=f,filename=$LOOP,cache.direct=on,aio=io_uring" \
            --blockdev driver=raw,node-name=d,file=f \
            --export "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=$WORK/s.sock,writable=on,num-queues=$QUEUES" \
            >>"$WORK/qsd.log" 2>&1 &
        ;;
    vbc | vbc-a)
        local b=$BIN
        [ "$1" = vbc-a ] && b=$A_BIN
        "$b" serve --source "$WORK/source.img" --cache "$LOOP" --socket "$WORK/s.sock" \
            --queues "$QUEUES" --source-latency 5ms --block-size 64K >>"$WORK/$1.log" 2>&1 &
        ;;
    esac
    echo $!
}

# Warm the cache once (vblkcache keeps it warm across clean restarts).
pid=$(start vbc); PIDS=("$pid"); wait_socket "$WORK/s.sock"
"$LOAD" --socket "$WORK/s.sock" --pattern read --bs 1M --iodepth 8 --once --runtime 5m >/dev/null
stop "$pid"; PIDS=()

TARGETS=(qsd vbc)
[ -n "$A_BIN" ] && TARGETS+=(vbc-a)
RES="$WORK/results"
for r in $(seq "$ROUNDS"); do
    for t in "${TARGETS[@]}"; do
        # No target starts with the device's data in the host page cache (a
        # cache device is far larger than the RAM there is for it).
        blockdev --flushbufs "$LOOP"
        pid=$(start "$t"); PIDS=("$pid"); wait_socket "$WORK/s.sock"
        c0=$(ticks "$pid")
        d0=$(awk '{print $3}' "/sys/block/${LOOP#/dev/}/stat")
        out=$("$LOAD" --socket "$WORK/s.sock" --pattern randread --bs 4K --iodepth 32 \
            --queues "$QUEUES" --size 768M --runtime "$RUNTIME" --json)
        c1=$(ticks "$pid")
        d1=$(awk '{print $3}' "/sys/block/${LOOP#/dev/}/stat")
        buf=$(awk '/^Buffers:/ {print $2}' /proc/meminfo)
        stop "$pid"; PIDS=()
        python3 - "$t" "$r" "$c0" "$c1" "$CLK_TCK" "$out" "$d0" "$d1" "$buf" >>"$RES" <<'EOF'
import json, sys
t, r, c0, c1, hz, out, d0, d1, buf = sys.argv[1:]
o = json.loads(out)
ios = o["total_ios"]  # ramp included, as the CPU ticks are
cpu_us = (int(c1) - int(c0)) / int(hz) * 1e6
print(json.dumps({"target": t, "round": int(r), "iops": o["iops"], "cpu_us_per_io": cpu_us / max(ios, 1),
                  "device_kib_per_io": (int(d1) - int(d0)) / 2 / max(ios, 1),
                  "buffers_mib_after": int(buf) // 1024}))
EOF
        tail -1 "$RES"
    done
done
grep -h "hits served\|memory filesystem\|O_DIRECT" "$WORK"/vbc*.log | sort | uniq -c | head -5 || true
python3 - "$RES" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
med = {}
for t in dict.fromkeys(r["target"] for r in rows):
    rs = [r for r in rows if r["target"] == t]
    m = lambda k: statistics.median(r[k] for r in rs)
    med[t] = (m("iops"), m("cpu_us_per_io"), m("device_kib_per_io"), m("buffers_mib_after"))
q = med["qsd"]
print(f"{'target':8} {'IOPS':>9} {'CPU us/IO':>10} {'IOPS/qsd':>9} {'CPU/qsd':>8} {'dev KiB/IO':>10} {'page cache MiB':>14}")
for t, (iops, cpu, kib, buf) in med.items():
    print(f"{t:8} {iops:9.0f} {cpu:10.2f} {iops / q[0]:9.2f} {cpu / q[1]:8.2f} {kib:10.1f} {buf:14}")
EOF
