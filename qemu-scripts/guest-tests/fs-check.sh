#!/bin/sh
# Guest test: check, in a later boot, the filesystem that fs-roundtrip.sh left:
# e2fsck -fn clean and every file matching MANIFEST.sha256. Run it after the
# backend was reconnected or restarted to prove the data persisted.
set -eu
DEV=${VBLK_DEV:-/dev/vda}
MNT=/mnt/vblk

[ -b "$DEV" ] || { echo "fs-check: $DEV is not a block device"; exit 1; }
if ! e2fsck -fn "$DEV" >/tmp/fsck.out 2>&1; then
    cat /tmp/fsck.out
    echo "fs-check: e2fsck found errors"
    exit 1
fi
mkdir -p "$MNT"
mount -t ext4 -o ro "$DEV" "$MNT"
cd "$MNT"
[ -s MANIFEST.sha256 ] || { echo "fs-check: no MANIFEST.sha256 on the filesystem"; exit 1; }
if ! sha256sum -c -s MANIFEST.sha256; then
    sha256sum -c MANIFEST.sha256 | grep -v ': OK$' | head -20
    echo "fs-check: checksums differ"
    exit 1
fi
n=$(wc -l <MANIFEST.sha256)
cd /
umount "$MNT"
echo "fs-check: OK ($n files verified)"
