#!/bin/sh
# Guest test: discard under a filesystem. ext4 mounted with `-o discard`
# frees blocks with discards as files are deleted, and fstrim discards every
# free range; the freed blocks are then reused by new files. Rounds of:
# write files (fio, crc32c verify), delete every other one, fstrim, write
# new files into the freed space; then unmount, drop caches, e2fsck -fn and
# a full re-read of every file left against its sha256. Also blkdiscard of
# a raw range next to data: the data around it must not change.
set -eu
DEV=${VBLK_DEV:-/dev/vda}
MNT=/mnt/trim
ROUNDS=${ROUNDS:-3}

[ -b "$DEV" ] || { echo "fs-trim: $DEV is not a block device"; exit 1; }
gran=$(cat /sys/block/$(basename "$DEV")/queue/discard_granularity)
[ "$gran" -gt 0 ] || { echo "fs-trim: $DEV does not offer discard"; exit 1; }

# Raw: three 1 MiB stripes, discard the middle one, check the outer two.
dd if=/dev/urandom of=/tmp/stripes bs=1M count=3 2>/dev/null
dd if=/tmp/stripes of="$DEV" bs=1M oflag=direct conv=fsync 2>/dev/null
blkdiscard -o 1048576 -l 1048576 "$DEV"
dd if="$DEV" of=/tmp/back bs=1M count=3 iflag=direct 2>/dev/null
for i in 0 2; do
    a=$(dd if=/tmp/stripes bs=1M skip=$i count=1 2>/dev/null | sha256sum | cut -d' ' -f1)
    b=$(dd if=/tmp/back bs=1M skip=$i count=1 2>/dev/null | sha256sum | cut -d' ' -f1)
    [ "$a" = "$b" ] || { echo "fs-trim: stripe $i changed by a discard of its neighbour"; exit 1; }
done

mkfs.ext4 -q -F -E discard "$DEV" >/dev/null
mkdir -p "$MNT"
mount -t ext4 -o discard "$DEV" "$MNT"
r=1
while [ "$r" -le "$ROUNDS" ]; do
    i=1
    while [ "$i" -le 8 ]; do
        fio --name=f --filename="$MNT/r$r-$i" --size=4m --bs=16k --rw=randwrite --ioengine=psync \
            --verify=crc32c --verify_fatal=1 --do_verify=1 --randseed=$r$i >/tmp/f.out 2>&1 || {
            cat /tmp/f.out
            echo "fs-trim: round $r file $i write+verify failed"
            exit 1
        }
        i=$((i + 1))
    done
    sync
    for i in 2 4 6 8; do rm -f "$MNT/r$r-$i"; done
    sync
    fstrim "$MNT"
    r=$((r + 1))
done
(cd "$MNT" && sha256sum r* >/tmp/MANIFEST)
umount "$MNT"
echo 3 >/proc/sys/vm/drop_caches
if ! e2fsck -fn "$DEV" >/tmp/fsck.out 2>&1; then
    cat /tmp/fsck.out
    echo "fs-trim: e2fsck found errors"
    exit 1
fi
mount -t ext4 -o ro "$DEV" "$MNT"
if ! (cd "$MNT" && sha256sum -c -s /tmp/MANIFEST); then
    (cd "$MNT" && sha256sum -c /tmp/MANIFEST | grep -v ': OK$' | head)
    echo "fs-trim: files changed"
    exit 1
fi
n=$(wc -l </tmp/MANIFEST)
umount "$MNT"
echo "fs-trim: OK ($n files after $ROUNDS rounds of delete and fstrim)"
