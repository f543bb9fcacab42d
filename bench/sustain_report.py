"""Report of one bench/sustain.sh run: its directory and label as arguments."""
import json
import sys

W, label = sys.argv[1], sys.argv[2]
T0, TL, TF, TE = map(float, open(f"{W}/times").read().split())


def ms(h, k):
    return (h.get(k) or 0) / 1000.0


print(f"== {label}")
print(" t(s)    IOPS  w.p99ms  w.maxms  r.IOPS r.p99ms r.maxms errors")
rows = []
for line in open(f"{W}/load.log"):
    t, j = line.split(" ", 1)
    j = json.loads(j)
    rows.append(j)
    w, r = j["write"], j["read"]
    rate = r.get("count", 0) / max(j["window_s"], 1e-9)
    print(f"{float(t) - T0:5.1f} {j['iops']:7.0f} {ms(w, 'p99_us'):8.1f} {ms(w, 'max_us'):8.1f}"
          f" {rate:7.0f} {ms(r, 'p99_us'):7.1f} {ms(r, 'max_us'):7.1f} {j['errors']:6}")
samples = []
for line in open(f"{W}/status.log"):
    t, s = line.split(" ", 1)
    try:
        s = json.loads(s)
    except ValueError:
        continue
    samples.append((float(t) - T0, s.get("status", s)))
print(" t(s)  dirty  valid writebacks wb_runs dirty_evict bypassed partial_fills wb_src_flushes")
last = -9.0
for t, s in samples:
    if t - last >= 2.0:
        c = s.get("stats", s)
        print(f"{t:5.1f} {s['dirty_blocks']:6} {s['valid_blocks']:6} {c.get('writebacks', 0):10}"
              f" {c.get('writeback_runs', 0):7} {c.get('dirty_evictions', 0):11} {c.get('bypassed', 0):8}"
              f" {c.get('partial_fills', 0):13} {c.get('writeback_source_flushes', 0):14}")
        last = t
iops = [j["iops"] for j in rows]
print(f"SUMMARY {label}: IOPS mean {sum(iops) / len(iops):.0f} (min {min(iops):.0f}, max {max(iops):.0f});"
      f" worst write p99 {max(ms(j['write'], 'p99_us') for j in rows):.1f} ms,"
      f" max {max(ms(j['write'], 'max_us') for j in rows):.1f} ms;"
      f" worst read p99 {max(ms(j['read'], 'p99_us') for j in rows):.1f} ms")
end = [s["dirty_blocks"] for t, s in samples if t <= TL - T0]
idle = [s["dirty_blocks"] for t, s in samples if TL - T0 < t <= TF - T0]
blocks = samples[0][1]["geometry"]["cache_blocks"] if samples else "?"
print(f"SUMMARY {label}: dirty at load end {end[-1] if end else '?'} of {blocks},"
      f" after {TF - TL:.0f} s idle {idle[-1] if idle else '?'}; flush took {TE - TF:.2f} s")
