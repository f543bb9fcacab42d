#!/bin/sh
# Guest benchmark: read a whole file tree from the disk, as a boot reads its
# root filesystem (file after file, each one's metadata first; the guest's
# readahead decides the request sizes).
#
# Mounts /dev/vda read-only and reads every regular file under it (timed),
# then checks them against MANIFEST.sha256 when the image has one (untimed,
# from the page cache the timed read filled: a wrong byte fails the run).
# Prints READ_TREE_MS=<ms> (from /proc/uptime, 10 ms resolution; from the
# mount to the last byte), READ_TREE_FILES=<n> and READ_TREE_BYTES=<n>.
set -eu
DEV=${VBLK_DEV:-/dev/vda}
MNT=/mnt/vblk
[ -b "$DEV" ] || { echo "read-tree: $DEV is not a block device"; exit 1; }
mkdir -p "$MNT"
uptime_cs() { read -r up _ </proc/uptime; echo "${up%.*}${up#*.}"; }
t0=$(uptime_cs)
mount -t ext4 -o ro "$DEV" "$MNT"
cd "$MNT"
find . -type f -exec cat {} + >/dev/null
t1=$(uptime_cs)
files=$(find . -type f ! -name MANIFEST.sha256 | wc -l)
bytes=$(find . -type f ! -name MANIFEST.sha256 -exec cat {} + | wc -c)
if [ -s MANIFEST.sha256 ] && ! sha256sum -c -s MANIFEST.sha256; then
    sha256sum -c MANIFEST.sha256 2>&1 | grep -v ': OK$' | head -20
    echo "read-tree: checksums differ"
    exit 1
fi
cd /
umount "$MNT"
echo "READ_TREE_MS=$(( (t1 - t0) * 10 ))"
echo "READ_TREE_FILES=$files"
echo "READ_TREE_BYTES=$bytes"
