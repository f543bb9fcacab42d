#!/usr/bin/env bash
# What the daemon's queue worker does per request: serves a warm cache, runs
# 4K randread QD32 against it, and records the daemon's system calls and
# context switches for a short window with perf tracepoints.
#
#   bench/syscalls.sh [--queues N] [--bin PATH] [--window SECONDS]
#                     [--show N] [--daemon-args "ARGS"]
#
# Prints, per 1,000 requests served in the window (counted as the operations
# the worker submitted to io_uring: each 4 KiB hit is one): each system call
# by name,
# how many epoll_wait calls returned EINTR (a wake-up by io_uring task work
# rather than by an event), the context switches of the daemon's threads, and
# the number of operations each io_uring_enter submitted. --show N also
# prints the first N lines of the trace, to read one turn of the queue.
# Tracing slows every system call, so read the counts and their order, not
# the times. Needs perf (apt-get install linux-perf).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN="$ROOT/target/release/vblkcache"
LOAD="$ROOT/target/release/examples/vbc-load"
QUEUES=1 WINDOW=1 SHOW=0 DARGS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --queues) QUEUES=$2; shift ;;
        --bin) BIN=$2; shift ;;
        --window) WINDOW=$2; shift ;;
        --show) SHOW=$2; shift ;;
        --daemon-args) DARGS=$2; shift ;;
        *) echo "syscalls.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
    shift
done
command -v perf >/dev/null || { echo "syscalls.sh: perf not found (apt-get install linux-perf)" >&2; exit 2; }
[ -x "$BIN" ] && [ -x "$LOAD" ] || { echo "syscalls.sh: build first: cargo build --release --all-targets" >&2; exit 2; }
WORK=$(mktemp -d "$ROOT/target/vbc-syscalls.XXXXXX")
PID=""
cleanup() {
    [ -n "$PID" ] && kill -TERM "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
    rm -rf "$WORK"
    return 0
}
trap cleanup EXIT
truncate -s 256M "$WORK/source.img"
truncate -s 400M "$WORK/cache.img"
# shellcheck disable=SC2086
"$BIN" serve --source "$WORK/source.img" --cache "$WORK/cache.img" --socket "$WORK/s.sock" \
    --queues 2 --control "$WORK/c.sock" $DARGS >"$WORK/daemon.log" 2>&1 &
PID=$!
for _ in $(seq 100); do [ -S "$WORK/s.sock" ] && break; sleep 0.05; done
"$LOAD" --socket "$WORK/s.sock" --pattern read --bs 1M --iodepth 8 --once --ramp 0 --runtime 600s --json >/dev/null
"$LOAD" --socket "$WORK/s.sock" --pattern randread --bs 4K --iodepth 32 --queues "$QUEUES" \
    --runtime 6s --ramp 1 --json >"$WORK/load.json" &
LOADPID=$!
sleep 2
perf record -q -e raw_syscalls:sys_enter,raw_syscalls:sys_exit,sched:sched_switch -p "$PID" \
    -o "$WORK/perf.data" -- sleep "$WINDOW" >/dev/null 2>&1 || true
wait "$LOADPID"
perf script -i "$WORK/perf.data" -F tid,time,event,trace 2>/dev/null >"$WORK/trace.txt"
[ "$SHOW" -gt 0 ] && head -n "$SHOW" "$WORK/trace.txt"
python3 - "$WORK/trace.txt" <<'PY'
import collections, re, sys
names = {0: "read", 1: "write", 232: "epoll_wait", 426: "io_uring_enter", 202: "futex"}
calls, eintr, switches, submitted = collections.Counter(), 0, 0, collections.Counter()
for line in open(sys.argv[1]):
    if "sched_switch" in line:
        switches += 1
        continue
    m = re.search(r"sys_enter: NR (\d+) \(([^)]*)\)", line)
    if m:
        nr = int(m.group(1))
        calls[names.get(nr, f"NR {nr}")] += 1
        if nr == 426:
            submitted[int(m.group(2).split(",")[1].strip(), 16)] += 1
        continue
    if re.search(r"sys_exit: NR 232 = -4\b", line):
        eintr += 1
ios = sum(k * v for k, v in submitted.items())
if ios <= 0:
    sys.exit("syscalls.sh: no requests served in the window")
per = 1000 / ios
print(f"requests served in the window: {ios}")
print("per 1,000 requests:")
for name, n in calls.most_common():
    print(f"  {name:16} {n * per:8.1f}")
print(f"  epoll_wait EINTR {eintr * per:8.1f}")
print(f"  context switches {switches * per:8.1f}")
print("io_uring_enter calls by operations submitted: "
      + ", ".join(f"{k}: {v}" for k, v in sorted(submitted.items())))
PY
