#!/usr/bin/env python3
"""Prints the table of a bench/compare.sh run from its JSON-lines results.

Usage: compare_table.py RESULTS.jsonl

One markdown table per pass: for each workload a row per target (qsd,
vblkcache, raw io_uring) and a row of ratios. CPU/IO is the serving daemon's
CPU time (user+system, whole run incl. ramp) per data request completed in
that run, with its kernel (system) part in brackets; client CPU/IO is vbc-load's own CPU inside the measured window per
request measured. Device KiB/req is the mean size of the requests the block
device under the files completed during the run (all its I/O, whoever
issued it; "–" on tmpfs), followed (in runs recorded since session 11) by
the mean time a request spent in the device, from issue to completion, and
the mean number of requests it held (that time summed over requests,
divided by the run's wall time). Machine events are the context switches and
interrupts of the whole machine (client, daemon and kernel) during the run,
per 32 requests (one turn of a QD32 queue).

The "floor" row divides the raw target's client CPU per request (vbc-load
alone reading the file with io_uring, no server at all) by qsd's daemon CPU
per request, then the same for the client's kernel time alone (recorded
since session 13). A server that reads the file with io_uring pays about
that kernel time per request too (the client's includes its own waits, and
the client reads into registered buffers, which the server by default does
not), so a CPU ratio much below the kernel-part floor is out of any
daemon's reach on that machine.

With --repeat N (rows carry a "round"), each target's row gives the median
of its rounds, and the ratio row gives the median of the per-round ratios
(each from targets run side by side in the same round) with their range.
"""
import json
import statistics
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
        "csys": load.get("client_sys_us_per_io"),
        "errors": load["errors"],
        "misses": r.get("read_misses"),
        "devkib": None,
        "devlat": None,
        "devqd": None,
        "cs32": None,
        "irq32": None,
    }
    ev = r.get("machine_events")
    if ev and load.get("total_ios"):
        m["cs32"] = ev["context_switches"] * 32 / load["total_ios"]
        m["irq32"] = ev["interrupts"] * 32 / load["total_ios"]
    dev = r.get("device")
    if dev:
        ios = dev["read_ios"] + dev["write_ios"]
        if ios:
            m["devkib"] = (dev["read_sectors"] + dev["write_sectors"]) * 512 / 1024 / ios
            # Runs recorded before these counters were added lack them.
            if "read_ms" in dev:
                busy_ms = dev["read_ms"] + dev["write_ms"]
                m["devlat"] = busy_ms * 1000 / ios
                if dev.get("wall_s"):
                    m["devqd"] = busy_ms / 1000 / dev["wall_s"]
    if r.get("daemon_cpu_s") is not None and load.get("total_ios"):
        m["cpu"] = r["daemon_cpu_s"] * 1e6 / load["total_ios"]
        if r.get("daemon_sys_s") is not None:
            m["sys"] = r["daemon_sys_s"] * 1e6 / load["total_ios"]
    return m


def dev_cell(m):
    """Mean request size at the device, and, where recorded, the mean time a
    request spent in it and the mean number of requests it held."""
    cell = fmt(m["devkib"])
    if m["devlat"] is not None:
        cell += f" · {fmt(m['devlat'])}"
    if m["devqd"] is not None:
        cell += f" · {fmt(m['devqd'], 1)}"
    return cell


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def merged(ms):
    """The median of each metric over rounds (a target's row)."""
    ms = [m for m in ms if m is not None]
    if not ms:
        return None
    out = {k: median([m[k] for m in ms]) for k in ("iops", "mib", "p99", "cpu", "sys", "ccpu", "csys", "devkib", "devlat", "devqd", "cs32", "irq32")}
    out["errors"] = sum(m["errors"] for m in ms)
    misses = [m["misses"] for m in ms if m["misses"] is not None]
    out["misses"] = sum(misses) if misses else None
    return out


def ratio_cell(vs, others, key):
    """Median of the per-round ratios, with their range when several."""
    rs = [ratio(v[key], o[key]) for v, o in zip(vs, others) if v and o]
    rs = [r for r in rs if r is not None]
    if not rs:
        return "–"
    cell = fmt(statistics.median(rs), 2)
    if len(rs) > 1:
        cell += f" ({fmt(min(rs), 2)}–{fmt(max(rs), 2)})"
    return cell


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
        print("| workload | target | IOPS | MiB/s | p99 µs | daemon CPU µs/IO (kernel) | client CPU µs/IO (kernel) | device KiB/req · µs/req · QD | machine ctx sw · irqs per 32 req | vbc read misses |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        wls = []
        for r in rows:
            if r.get("pass") == p and "workload" in r and r["workload"] not in wls:
                wls.append(r["workload"])
        for wl in wls:
            # target -> {round: metrics}
            by_round = {}
            for r in rows:
                if r.get("pass") == p and r.get("workload") == wl:
                    by_round.setdefault(r["target"], {})[r.get("round", 1)] = metrics(r)
            rounds = sorted({k for d in by_round.values() for k in d})
            # qsd, vblkcache, any other vblkcache daemon (--also-vbc), raw
            extra = sorted(t for t in by_round if t.startswith("vblkcache-"))
            targets = ["qsd", "vblkcache", *extra, "raw"]
            per = {t: [by_round.get(t, {}).get(k) for k in rounds] for t in targets}
            got = {t: merged(ms) for t, ms in per.items()}
            label = f" (median of {len(rounds)})" if len(rounds) > 1 else ""
            for t in targets:
                m = got.get(t)
                if m is None:
                    print(f"| {wl} | {t} | FAILED | | | | | | | |")
                    continue
                err = f" ({m['errors']} errors)" if m["errors"] else ""
                print(
                    f"| {wl} | {t}{label}{err} | {fmt(m['iops'])} | {fmt(m['mib'], 1)} | {fmt(m['p99'])} | "
                    f"{fmt(m['cpu'], 1)}{' (' + fmt(m['sys'], 1) + ')' if m['sys'] is not None else ''} | {fmt(m['ccpu'], 1)}{' (' + fmt(m['csys'], 1) + ')' if m['csys'] is not None else ''} | {dev_cell(m)} | {fmt(m['cs32'], 1)} · {fmt(m['irq32'], 1)} | {fmt(m['misses']) if m['misses'] is not None else ''} |"
                )
            for t in ("vblkcache", *extra):
                if not got.get(t):
                    continue

                def rr(k, other, t=t):
                    return ratio_cell(per[t], per[other], k)

                name = "vbc" + t[len("vblkcache"):]
                print(
                    f"| {wl} | **{name}/qsd** · {name}/raw | {rr('iops', 'qsd')} · {rr('iops', 'raw')} | | "
                    f"{rr('p99', 'qsd')} · {rr('p99', 'raw')} | {rr('cpu', 'qsd')} · – | | | | |"
                )
            # The floor of the CPU ratio: what the raw client alone spends per
            # request reading the same file with io_uring (all of it, and its
            # kernel part), over qsd's daemon CPU per request.
            cells = []
            for key in ("ccpu", "csys"):
                cell = ratio_cell(
                    [{"cpu": m[key]} if m and m[key] is not None else None for m in per["raw"]],
                    per["qsd"],
                    "cpu",
                )
                cells.append(cell)
            if cells[0] != "–":
                print(
                    f"| {wl} | floor: raw client CPU/qsd CPU (kernel part only) | | | | "
                    f"{cells[0]} ({cells[1]}) | | | | |"
                )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: compare_table.py RESULTS.jsonl")
    main(sys.argv[1])
