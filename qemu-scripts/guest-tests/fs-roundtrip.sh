#!/bin/sh
# Guest test: ext4 round trip on the vhost-user disk.
#
# mkfs.ext4, mount, write files (random data of several sizes, many small
# files, a hard link, a symlink, an overwrite in place), record sha256 sums,
# unmount, drop the page cache (so what follows reads the backend, not guest
# memory), e2fsck -fn must report a clean fs, remount, sums must match. Leaves the
# filesystem with MANIFEST.sha256 on it, for fs-check.sh in a later boot.
set -eu
DEV=${VBLK_DEV:-/dev/vda}
MNT=/mnt/vblk

[ -b "$DEV" ] || { echo "fs-roundtrip: $DEV is not a block device"; exit 1; }
mkdir -p "$MNT"

drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
    blockdev --flushbufs "$DEV"
}
fsck_clean() {
    # -f: check even if marked clean; -n: change nothing. 0 = no errors.
    if ! e2fsck -fn "$DEV" >/tmp/fsck.out 2>&1; then
        cat /tmp/fsck.out
        echo "fs-roundtrip: e2fsck found errors ($1)"
        exit 1
    fi
}

mkfs.ext4 -F -q "$DEV"
mount -t ext4 "$DEV" "$MNT"
cd "$MNT"
mkdir -p data small deep/a/b/c
for kb in 1 7 64 300 1024 4096; do
    dd if=/dev/urandom of="data/r$kb" bs=1024 count="$kb" 2>/dev/null
done
dd if=/dev/urandom of=data/big bs=1M count=24 2>/dev/null
i=0
while [ $i -lt 300 ]; do
    echo "small file $i $(head -c 24 /dev/urandom | sha256sum)" >"small/f$i"
    i=$((i + 1))
done
cp data/r300 deep/a/b/c/copy
ln data/r64 data/hardlink
ln -s ../data/r7 deep/symlink
# Overwrite the middle of a file in place (not a new allocation).
dd if=/dev/urandom of=data/big bs=4096 seek=1000 count=64 conv=notrunc 2>/dev/null
find . -type f ! -name MANIFEST.sha256 | LC_ALL=C sort | xargs sha256sum >/tmp/manifest
cp /tmp/manifest MANIFEST.sha256
cd /
umount "$MNT"
drop_caches
fsck_clean "after first unmount"

mount -t ext4 "$DEV" "$MNT"
cd "$MNT"
if ! sha256sum -c -s /tmp/manifest; then
    sha256sum -c /tmp/manifest | grep -v ': OK$' | head -20
    echo "fs-roundtrip: checksums differ after remount"
    exit 1
fi
[ "$(readlink deep/symlink)" = "../data/r7" ] || { echo "fs-roundtrip: symlink lost"; exit 1; }
[ "$(stat -c %h data/r64)" = 2 ] || { echo "fs-roundtrip: hard link count wrong"; exit 1; }
# Delete and rewrite some files, so the fs frees and reuses blocks.
rm -r small
dd if=/dev/urandom of=data/after bs=64k count=32 2>/dev/null
find . -type f ! -name MANIFEST.sha256 | LC_ALL=C sort | xargs sha256sum >/tmp/manifest2
cp /tmp/manifest2 MANIFEST.sha256
cd /
umount "$MNT"
drop_caches
fsck_clean "after second unmount"
echo "fs-roundtrip: OK ($(wc -l </tmp/manifest) files verified)"
