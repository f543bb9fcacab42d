#!/usr/bin/env python3
"""Summarises one round of bench/iotrace.sh.

Usage: iotrace.py LOAD.json TRACE.txt TARGET

LOAD.json is vbc-load's --json output; TRACE.txt is `perf script -F
comm,time,event,trace` of the block and io_uring tracepoints. Prints the
client's figures, the kernel-side latency of the target's io_uring
operations, and what the block device saw (see bench/iotrace.sh).
"""
import json
import re
import sys
from collections import Counter

LINE = re.compile(r"^\s*(.+?)\s+([\d.]+):\s+(\S+):\s+(.*)$")
# A device request dispatched again within this many seconds of its last
# dispatch is the same request, sent back by a full device queue.
REISSUE_S = 0.02


def pct(xs, p):
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def main(load_path, trace_path, target):
    load = json.load(open(load_path))
    lat = load["lat"]
    print(
        f"client: {load['iops']:.0f} IOPS, latency mean {lat['mean_us']:.0f} µs, "
        f"p50 {lat['p50_us']:.0f}, p99 {lat['p99_us']:.0f}"
    )
    submitted, op_lat, ops = {}, [], Counter()
    open_rq, rqs, bios = {}, [], []
    for line in open(trace_path):
        m = LINE.match(line)
        if not m:
            continue
        comm, t, ev, rest = m.group(1), float(m.group(2)), m.group(3), m.group(4)
        if ev.startswith("io_uring:"):
            # The client's own rings (if any) are not the target's, except
            # for the raw target, where the client is what reads the file.
            if target != "raw" and comm.startswith("vbc-load"):
                continue
            ud = re.search(r"user_data (\S+),", rest)
            if not ud:
                continue
            key = (comm, ud.group(1))
            if ev == "io_uring:io_uring_submit_req":
                op = re.search(r"opcode (\S+),", rest)
                ops[op.group(1) if op else "?"] += 1
                submitted[key] = t
            elif ev == "io_uring:io_uring_complete" and key in submitted:
                op_lat.append((t - submitted.pop(key)) * 1e6)
        elif ev in ("block:block_rq_issue", "block:block_bio_queue"):
            # "254,0 RS [1048576 ()] SECTOR + NR ..."
            f = rest.split()
            try:
                plus = f.index("+")
                sector, nr = int(f[plus - 1]), int(f[plus + 1])
            except (ValueError, IndexError):
                continue
            if ev == "block:block_bio_queue":
                bios.append((sector, nr))
                continue
            prev = open_rq.get(sector)
            if prev and t - prev[1] < REISSUE_S and prev[2] == nr:
                prev[1] = t
                prev[3] += 1
            else:
                rq = [t, t, nr, 1, sector]
                open_rq[sector] = rq
                rqs.append(rq)
    if op_lat:
        op_lat.sort()
        mean = sum(op_lat) / len(op_lat)
        print(
            f"io_uring ops: {len(op_lat)} ({', '.join(f'{k} {v}' for k, v in ops.most_common())}); "
            f"kernel latency mean {mean:.0f} µs, p50 {pct(op_lat, 0.5):.0f}, "
            f"p99 {pct(op_lat, 0.99):.0f} ({pct(op_lat, 0.99) / mean:.2f}x the mean)"
        )
    if rqs:
        rqs.sort(key=lambda r: r[0])
        sizes = Counter(r[2] * 512 // 1024 for r in rqs)
        again = sum(1 for r in rqs if r[3] > 1)
        seq = sum(1 for a, b in zip(bios, bios[1:]) if b[0] == a[0] + a[1])
        print(
            f"device: {len(rqs)} requests, KiB: "
            f"{', '.join(f'{k} x{v}' for k, v in sizes.most_common(4))}; "
            f"dispatched again after a full queue: {again}; "
            f"sequential bios: {seq / max(1, len(bios) - 1):.0%} of {len(bios)}"
        )


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: iotrace.py LOAD.json TRACE.txt TARGET")
    main(*sys.argv[1:])
