#!/usr/bin/env bash
# What a guest sees when it reads its disk the way a boot does: a QEMU guest
# (TCG here) mounts an ext4 image and reads every file on it
# (qemu-scripts/guest-tests/read-tree.sh), once per target, on a fresh boot
# each time (so nothing comes from the guest's page cache):
#
#   source    vblkcache --mode passthrough on the slow source: the guest's
#             disk without a cache (every read waits for the source)
#   cold-no-ra  vblkcache on the slow source with an empty cache and
#             --readahead 0
#   cold      the same with the default readahead
#   warm      the same daemon restarted (SIGTERM, then serve again on the
#             same cache): the mapping persisted at shutdown is loaded
#   qsd       qemu-storage-daemon serving the image file itself, with no
#             injected latency: the disk as fast as the cache device
#
# The slow source is the image file with --source-latency on every source
# request. Every run checks the files against a manifest made on the host.
#
#   bench/guest-read.sh [--latency DURATION] [--rounds N] [--tree DIR]...
#                       [--out FILE] [--serve-args "ARGS"] [--no-build]
#
# Defaults: 5ms, 1 round, a tree of /usr/lib/python3.11 and /usr/share/perl
# (2,598 files, 66 MiB on this host), files under target/. Prints one line per run
# and a table; --out FILE appends one JSON line per run.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LAT=5ms
ROUNDS=1
TREES=()
OUT=""
SERVE_ARGS=""
BUILD=1
while [ $# -gt 0 ]; do
    case $1 in
    --latency) LAT=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --tree) TREES+=("$2"); shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --serve-args) SERVE_ARGS=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    *) echo "guest-read.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ ${#TREES[@]} -gt 0 ] || TREES=(/usr/lib/python3.11 /usr/share/perl)
for t in "${TREES[@]}"; do
    [ -d "$t" ] || { echo "guest-read.sh: --tree $t is not a directory" >&2; exit 2; }
done
command -v qemu-storage-daemon >/dev/null || { echo "guest-read.sh: qemu-storage-daemon not found" >&2; exit 2; }
command -v mke2fs >/dev/null || { echo "guest-read.sh: mke2fs not found (e2fsprogs)" >&2; exit 2; }

BIN=$ROOT/target/release/vblkcache
GUEST=${VBLK_GUEST_DIR:-$ROOT/target/guest}
if [ "$BUILD" = 1 ]; then
    (cd "$ROOT" && cargo build --release --quiet)
fi
[ -f "$GUEST/vmlinux" ] || bash "$ROOT/qemu-scripts/build-guest.sh" "$GUEST"
# shellcheck source-path=SCRIPTDIR
. "$ROOT/qemu-scripts/lib.sh"

W=$(mktemp -d "$ROOT/target/vbc-guest-read.XXXXXX")
DPID=""
cleanup() {
    [ -n "$DPID" ] && kill "$DPID" 2>/dev/null
    wait 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT

# The image: the trees copied under one root, a manifest of their sums, and
# an ext4 filesystem made from that root with mke2fs -d (no mount needed).
mkdir -p "$W/tree"
for t in "${TREES[@]}"; do
    cp -a "$t" "$W/tree/$(basename "$t")"
done
(cd "$W/tree" && find . -type f ! -name MANIFEST.sha256 -print0 | sort -z | xargs -0 sha256sum >MANIFEST.sha256)
tree_kib=$(du -sk "$W/tree" | cut -f1)
img_mib=$(( tree_kib * 3 / 2 / 1024 + 64 ))
mke2fs -q -t ext4 -F -d "$W/tree" "$W/source.img" "${img_mib}M"
rm -rf "$W/tree"
echo "guest-read: image of ${img_mib} MiB holding $(( tree_kib / 1024 )) MiB of files; source latency $LAT" >&2

# serve ARGS...: starts vblkcache in the background, waits for its control socket.
serve() {
    rm -f "$W/v.sock" "$W/c.sock"
    # shellcheck disable=SC2086
    "$BIN" serve --source "$W/source.img" --cache "$W/cache.img" --socket "$W/v.sock" \
        --control "$W/c.sock" --source-latency "$LAT" $SERVE_ARGS "$@" 2>>"$W/daemon.log" &
    DPID=$!
    until "$BIN" status --control "$W/c.sock" >/dev/null 2>&1; do
        kill -0 "$DPID" 2>/dev/null || { tail -20 "$W/daemon.log" >&2; exit 1; }
        sleep 0.05
    done
}
stop() {
    kill -TERM "$DPID"
    wait "$DPID" || { echo "guest-read: the daemon failed at shutdown" >&2; tail -20 "$W/daemon.log" >&2; exit 1; }
    DPID=""
}
qsd_start() {
    rm -f "$W/v.sock"
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=f,filename=$W/source.img,cache.direct=on,aio=io_uring,read-only=on" \
        --blockdev driver=raw,node-name=d,file=f,read-only=on \
        --export "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=$W/v.sock,writable=off" \
        >>"$W/qsd.log" 2>&1 &
    DPID=$!
    wait_for_listen "$W/v.sock" 30 || { tail -20 "$W/qsd.log" >&2; exit 1; }
}
qsd_stop() {
    kill -TERM "$DPID"
    wait "$DPID" || true
    DPID=""
}

# An empty cache file, twice the image's size.
fresh_cache() {
    rm -f "$W/cache.img"
    truncate -s "$(( img_mib * 2 ))M" "$W/cache.img"
}

# boot TARGET ROUND: runs the guest, prints its run as one JSON line (and
# appends it to --out).
boot() {
    local target=$1 round=$2 t0 t1 log=$W/guest-$1.log ms files bytes st="{}"
    t0=$(date +%s.%N)
    if ! bash "$ROOT/qemu-scripts/run-guest.sh" --socket "$W/v.sock" --quiet --timeout 900 \
        --script "$ROOT/qemu-scripts/guest-tests/read-tree.sh" --log "$log" >/dev/null 2>&1; then
        echo "guest-read: the guest failed on $target:" >&2
        tail -30 "$log" >&2
        exit 1
    fi
    t1=$(date +%s.%N)
    ms=$(grep -ao 'READ_TREE_MS=[0-9]*' "$log" | tail -1 | cut -d= -f2)
    files=$(grep -ao 'READ_TREE_FILES=[0-9]*' "$log" | tail -1 | cut -d= -f2)
    bytes=$(grep -ao 'READ_TREE_BYTES=[0-9]*' "$log" | tail -1 | cut -d= -f2)
    [ "$target" = qsd ] || st=$("$BIN" status --json --control "$W/c.sock")
    python3 - "$target" "$round" "$ms" "$files" "$bytes" "$t0" "$t1" "$LAT" "$st" "$OUT" <<'PY'
import json, sys
target, rnd, ms, files, nbytes, t0, t1, lat, st, out = sys.argv[1:]
s = json.loads(st).get("stats", {})
rec = {"target": target, "round": int(rnd), "read_ms": int(ms), "files": int(files),
       "bytes": int(nbytes), "wall_s": round(float(t1) - float(t0), 2), "latency": lat,
       "read_hits": s.get("read_hits"), "read_misses": s.get("read_misses"),
       "readahead_blocks": s.get("readahead_blocks")}
print(json.dumps(rec))
if out:
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")
PY
}

results=()
for round in $(seq 1 "$ROUNDS"); do
    fresh_cache
    serve --mode passthrough
    results+=("$(boot source "$round")"); echo "${results[-1]}" >&2
    stop
    fresh_cache
    serve --readahead 0
    results+=("$(boot cold-no-ra "$round")"); echo "${results[-1]}" >&2
    stop
    fresh_cache
    serve
    results+=("$(boot cold "$round")"); echo "${results[-1]}" >&2
    stop
    serve
    results+=("$(boot warm "$round")"); echo "${results[-1]}" >&2
    stop
    qsd_start
    results+=("$(boot qsd "$round")"); echo "${results[-1]}" >&2
    qsd_stop
done

printf '%s\n' "${results[@]}" >"$W/runs.jsonl"
python3 - "$W/runs.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rounds = sorted({r["round"] for r in runs})
by = {(r["target"], r["round"]): r for r in runs}
print("| target | guest read ms (median) | wall s, boot + read (median) | ÷ source (median of rounds) | read hits | read misses |")
print("|---|---:|---:|---:|---:|---:|")
for t in ["source", "cold-no-ra", "cold", "warm", "qsd"]:
    rs = [by[(t, n)] for n in rounds]
    ratio = statistics.median(by[(t, n)]["read_ms"] / max(by[("source", n)]["read_ms"], 1) for n in rounds)
    ms = statistics.median(r["read_ms"] for r in rs)
    wall = statistics.median(r["wall_s"] for r in rs)
    last = rs[-1]
    hits = "-" if last["read_hits"] is None else last["read_hits"]
    misses = "-" if last["read_misses"] is None else last["read_misses"]
    print(f"| {t} | {ms:.0f} | {wall:.1f} | {ratio:.3f} | {hits} | {misses} |")
print(f"{runs[0]['files']} files, {runs[0]['bytes'] / 2**20:.1f} MiB read per run; rounds: {len(rounds)}")
PY
