#!/usr/bin/env python3
"""Prints the table of a bench/compare.sh run from its JSON-lines results.

Usage: compare_table.py RESULTS.jsonl

One markdown table per pass: for each workload a row per target (qsd,
vblkcache, raw io_uring) and a row of ratios. CPU/IO is the serving daemon's
CPU time (user+system, whole run incl. ramp) per data request completed in
that run, with its kernel (system) part in brackets; client CPU/IO is vbc-load's own CPU inside the measured window per
request measured.
"""
import json
import sys


def fmt(v, digits=0):
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def metrics(r):
    load = r.get("load")
    if not load:
        return None
    m = {
        "iops": load["iops"],
        "mib": load["mib_s"],
        "p99": load["lat"]["p99_us"],
        "cpu": None,
        "sys": None,
        "ccpu": load.get("client_cpu_us_per_io"),
        "errors": load["errors"],
        "misses": r.get("read_misses"),
    }
    if r.get("daemon_cpu_s") is not None and load.get("total_ios"):
        m["cpu"] = r["daemon_cpu_s"] * 1e6 / load["total_ios"]
        if r.get("daemon_sys_s") is not None:
            m["sys"] = r["daemon_sys_s"] * 1e6 / load["total_ios"]
    return m


def main(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    machine = next((r["machine"] for r in rows if "machine" in r), {})
    if machine:
        print(
            f"machine: {machine.get('nproc')} CPUs, {machine.get('cpu')}; {machine.get('date')}; "
            f"runtime {machine.get('runtime')} after ramp {machine.get('ramp')}; "
            f"disk {machine.get('disk_mib')} MiB, cache file {machine.get('cache_mib')} MiB, "
            f"{machine.get('queues')} queues offered"
        )
    passes = []
    for r in rows:
        if "pass" in r and r["pass"] not in passes:
            passes.append(r["pass"])
    for p in passes:
        warm = next((r["warm"] for r in rows if r.get("pass") == p and "warm" in r), None)
        print(f"\n### pass: {p}")
        if warm:
            print(
                f"warm check: {warm['valid_blocks']} valid blocks of {warm['block_size']} B, "
                f"{warm['second_pass_misses']} misses on a second full read"
            )
        print()
        print("| workload | target | IOPS | MiB/s | p99 µs | daemon CPU µs/IO (kernel) | client CPU µs/IO | vbc read misses |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        wls = []
        for r in rows:
            if r.get("pass") == p and "workload" in r and r["workload"] not in wls:
                wls.append(r["workload"])
        for wl in wls:
            got = {}
            for r in rows:
                if r.get("pass") == p and r.get("workload") == wl:
                    got[r["target"]] = metrics(r)
            for t in ("qsd", "vblkcache", "raw"):
                m = got.get(t)
                if m is None:
                    print(f"| {wl} | {t} | FAILED | | | | | |")
                    continue
                err = f" ({m['errors']} errors)" if m["errors"] else ""
                print(
                    f"| {wl} | {t}{err} | {fmt(m['iops'])} | {fmt(m['mib'], 1)} | {fmt(m['p99'])} | "
                    f"{fmt(m['cpu'], 1)}{' (' + fmt(m['sys'], 1) + ')' if m['sys'] is not None else ''} | {fmt(m['ccpu'], 1)} | {fmt(m['misses']) if m['misses'] is not None else ''} |"
                )
            v, q, w = got.get("vblkcache"), got.get("qsd"), got.get("raw")
            if v:
                def rr(k, other):
                    return fmt(ratio(v[k], other[k] if other else None), 2)
                print(
                    f"| {wl} | **vbc/qsd** · vbc/raw | {rr('iops', q)} · {rr('iops', w)} | | "
                    f"{rr('p99', q)} · {rr('p99', w)} | {rr('cpu', q)} · – | | |"
                )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: compare_table.py RESULTS.jsonl")
    main(sys.argv[1])
