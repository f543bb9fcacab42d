#!/usr/bin/env python3
"""Pause and resume a guest again and again while it runs fio, until it stalls.

    qemu-scripts/pause-stress.py [--bin PATH] [--guest-dir DIR] [--work DIR]
                                 [--runs R] [--rounds N] [-- SERVE_ARGS...]

Each run starts a daemon (2 queues, 2 ms source latency, 256 MiB source,
64 MiB cache) and a guest running guest-tests/fio-loop.sh with N rounds
(default 6), then sends QMP stop, waits 50-400 ms, sends cont, every
200-800 ms (the timing of tests/qemu_e2e.rs guest_data_survives_pause_and_resume)
until the guest exits. A stall is 30 s without a request reaching the daemon
(its `status` counters) while the guest still runs: the script then prints
QEMU's view of the queues and the rings' index fields read from guest memory,
saves the daemon's thread backtraces to WORK/bt.txt (gdb), leaves the
processes running for inspection and exits 2. Exit 0 when every run passed.
Written to chase the hang seen once in CI in session 19.
"""
import argparse, json, os, random, signal, socket, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ap = argparse.ArgumentParser()
ap.add_argument("--bin", default=f"{ROOT}/target/release/vblkcache")
ap.add_argument("--guest-dir", default=f"{ROOT}/target/guest")
ap.add_argument("--work", default="/tmp/vbc-pause-stress")
ap.add_argument("--runs", type=int, default=20)
ap.add_argument("--rounds", type=int, default=6)
ap.add_argument("serve_args", nargs="*")
a = ap.parse_args()


class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.f = self.s.makefile("rw")
        self.f.readline()
        self.run("qmp_capabilities")

    def run(self, cmd, args=None):
        """The reply line, or None once QEMU has gone."""
        msg = {"execute": cmd}
        if args is not None:
            msg["arguments"] = args
        try:
            self.f.write(json.dumps(msg) + "\n")
            self.f.flush()
            while True:
                line = self.f.readline()
                if not line:
                    return None
                if '"return"' in line or '"error"' in line:
                    return line
        except OSError:
            return None


def report(q):
    out = [q.run("query-status") or ""]
    devs = json.loads(q.run("x-query-virtio", {}) or "{}").get("return", [])
    for d in devs:
        for n in (0, 1):
            st = q.run("x-query-virtio-queue-status", {"path": d["path"], "queue": n}) or "{}"
            out.append(f"queue {n}: {st.strip()}")
            r = json.loads(st).get("return", {})
            avail, used, num = r.get("vring-avail", 0), r.get("vring-used", 0), r.get("vring-num", 0)
            if not avail:
                continue
            for what, at, k in [("avail flags+idx", avail, 2), ("used_event", avail + 4 + 2 * num, 1),
                                ("used flags+idx", used, 2), ("avail_event", used + 4 + 8 * num, 1)]:
                x = q.run("human-monitor-command", {"command-line": f"xp /{k}hx {at:#x}"}) or ""
                out.append(f"queue {n} {what}: {x.strip()}")
    return "\n".join(out)


def one_run(i):
    w = a.work
    os.makedirs(w, exist_ok=True)
    for f in os.listdir(w):
        os.unlink(os.path.join(w, f))
    subprocess.run(["truncate", "-s", "256M", f"{w}/source.img"], check=True)
    subprocess.run(["truncate", "-s", "64M", f"{w}/cache.img"], check=True)
    d = subprocess.Popen([a.bin, "serve", "--source", f"{w}/source.img", "--cache", f"{w}/cache.img",
                          "--socket", f"{w}/v.sock", "--control", f"{w}/c.sock", "--queues", "2",
                          "--source-latency", "2ms", "--crash-state-dir", w] + a.serve_args,
                         stderr=open(f"{w}/daemon.log", "w"))
    while not os.path.exists(f"{w}/c.sock"):
        if d.poll() is not None:
            sys.exit(f"the daemon exited: {open(f'{w}/daemon.log').read()}")
        time.sleep(0.05)
    g = subprocess.Popen(["bash", f"{ROOT}/qemu-scripts/run-guest.sh", "--socket", f"{w}/v.sock",
                          "--queues", "2", "--timeout", "3000", "--guest-dir", a.guest_dir,
                          "--log", f"{w}/console.log", "--quiet", "--qmp", f"{w}/qmp.sock",
                          "--script", f"{ROOT}/qemu-scripts/guest-tests/fio-loop.sh",
                          "--env", f"N={a.rounds}"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)

    def requests():
        out = subprocess.run([a.bin, "status", "--json", "--control", f"{w}/c.sock"], capture_output=True)
        st = json.loads(out.stdout)["stats"]
        return st["reads"] + st["writes"]

    while not os.path.exists(f"{w}/qmp.sock"):
        time.sleep(0.05)
    q = Qmp(f"{w}/qmp.sock")
    console = lambda: open(f"{w}/console.log", errors="replace").read()
    while "running guest script" not in console():
        time.sleep(0.1)
    pauses, last, last_t = 0, requests(), time.time()
    while g.poll() is None:
        time.sleep(random.uniform(0.2, 0.8))
        if q.run("stop") is None:
            break
        time.sleep(random.uniform(0.05, 0.4))
        if q.run("cont") is None:
            break
        pauses += 1
        now = requests()
        if now != last:
            last, last_t = now, time.time()
        elif time.time() - last_t > 30:
            print(f"run {i}: STALL after {pauses} pauses, {now} requests\n{console()[-400:]}\n{report(q)}")
            with open(f"{w}/bt.txt", "w") as bt:
                subprocess.run(["gdb", "-p", str(d.pid), "-batch", "-ex", "thread apply all bt"],
                               stdout=bt, stderr=subprocess.DEVNULL)
            sys.exit(2)
    rc = g.wait()
    d.send_signal(signal.SIGTERM)
    d.wait()
    ok = rc == 0 and "VBLK_GUEST_EXIT=0" in console()
    print(f"run {i}: guest exit {rc} after {pauses} pauses", flush=True)
    if not ok:
        print(console()[-1000:])
        sys.exit(1)


for i in range(1, a.runs + 1):
    one_run(i)
