#!/bin/sh
# Guest test: fio random writes with crc32c verification on the vhost-user disk.
#
# Four concurrent jobs on disjoint regions of $VBLK_DEV (default /dev/vda):
# 4 KiB, 64 KiB, a 512 B..128 KiB mix (sub-4K writes force read-modify-write in
# a block cache), and 16 KiB — each writes its region at random, then reads it
# back and checks every block's crc32c and header (offset, seed). A second
# verify-only pass re-reads all regions after every job has finished, so data
# that went stale after the first check (e.g. lost on eviction) is caught too.
# O_DIRECT, iodepth 8 with libaio (psync if this fio lacks it).
set -eu
DEV=${VBLK_DEV:-/dev/vda}
REGION_MB=${FIO_REGION_MB:-24}

[ -b "$DEV" ] || { echo "fio-verify: $DEV is not a block device"; exit 1; }
size=$(blockdev --getsize64 "$DEV")
need=$((4 * REGION_MB * 1024 * 1024))
if [ "$size" -lt "$need" ]; then
    echo "fio-verify: $DEV has $size bytes, need $need"
    exit 1
fi
if fio --enghelp 2>/dev/null | grep -qw libaio; then
    engine=libaio
else
    engine=psync
fi
echo "fio-verify: $DEV ($size bytes), engine $engine, 4 x ${REGION_MB} MiB"

job=/tmp/verify.fio
cat >"$job" <<JOB
[global]
filename=$DEV
ioengine=$engine
iodepth=8
direct=1
rw=randwrite
size=${REGION_MB}m
verify=crc32c
verify_fatal=1
verify_dump=0
do_verify=1
randrepeat=1
group_reporting=1

[bs4k]
bs=4k
offset=0

[bs64k]
bs=64k
offset=$((REGION_MB))m

[mixed]
bssplit=512/10:4k/40:16k/30:128k/20
offset=$((2 * REGION_MB))m

[bs16k]
bs=16k
offset=$((3 * REGION_MB))m
JOB

start=$(cut -d' ' -f1 /proc/uptime)
fio --output-format=normal "$job" >/tmp/fio.out 2>&1 || {
    rc=$?
    cat /tmp/fio.out
    echo "fio-verify: write+verify pass failed ($rc)"
    exit 1
}
grep -E 'WRITE:|READ:|err=' /tmp/fio.out || true
# Same job file and seeds: verify_only replays the offsets and checks them.
fio --verify_only "$job" >/tmp/fio2.out 2>&1 || {
    rc=$?
    cat /tmp/fio2.out
    echo "fio-verify: verify-only re-read failed ($rc)"
    exit 1
}
grep -E 'READ:|err=' /tmp/fio2.out || true
end=$(cut -d' ' -f1 /proc/uptime)
echo "fio-verify: OK (from ${start}s to ${end}s guest uptime)"
