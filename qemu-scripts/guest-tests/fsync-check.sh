#!/bin/sh
# Guest test, second boot of a crash cycle (see fsync-write.sh): the
# filesystem mounts (replaying its journal) and then checks clean with
# e2fsck -fn, MANIFEST lists at least FSYNCED files (the last "FSYNCED n"
# the first boot printed: those fsyncs had returned), and every file has
# the sum of its last complete MANIFEST line (a torn last line, from a
# write in progress at the crash, is ignored).
set -eu
DEV=${VBLK_DEV:-/dev/vda}
MNT=/mnt/fsync
FSYNCED=${FSYNCED:?set FSYNCED to the last n the first boot reported}

[ -b "$DEV" ] || { echo "fsync-check: $DEV is not a block device"; exit 1; }
mkdir -p "$MNT"
mount -t ext4 "$DEV" "$MNT"
umount "$MNT"
if ! e2fsck -fn "$DEV" >/tmp/fsck.out 2>&1; then
    cat /tmp/fsck.out
    echo "fsync-check: e2fsck found errors after the journal replay"
    exit 1
fi
mount -t ext4 -o ro "$DEV" "$MNT"
# Complete lines only (64 hex digits, two spaces, a name), last one per file.
grep -E '^[0-9a-f]{64}  f[0-9]+$' "$MNT/MANIFEST" >/tmp/lines || true
lines=$(wc -l </tmp/lines)
if [ "$lines" -lt "$FSYNCED" ]; then
    echo "fsync-check: MANIFEST has $lines complete lines, but $FSYNCED fsyncs had returned"
    exit 1
fi
awk '{ last[$2] = $0 } END { for (f in last) print last[f] }' /tmp/lines >/tmp/want
# Step lines+1 was in progress at the crash. If it rewrote a file in place,
# that file may hold part of its new data without a line for it.
next=$((lines + 1))
torn=""
if [ $((next % 4)) = 0 ] && [ "$next" -gt 8 ]; then
    torn="f$((next - 7))"
fi
bad=0
cd "$MNT"
while read -r sum name; do
    got=$(sha256sum "$name" 2>/dev/null | cut -d' ' -f1 || true)
    if [ "$got" != "$sum" ] && [ "$name" != "$torn" ]; then
        echo "fsync-check: $name: sum ${got:-missing}, MANIFEST says $sum"
        bad=$((bad + 1))
    fi
done </tmp/want
cd /
umount "$MNT"
[ "$bad" = 0 ] || { echo "fsync-check: $bad file(s) differ"; exit 1; }
echo "fsync-check: OK ($lines fsynced files and rewrites, $FSYNCED acknowledged before the crash)"
