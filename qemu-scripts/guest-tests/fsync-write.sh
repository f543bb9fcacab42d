#!/bin/sh
# Guest test, first boot of a crash cycle: ext4 on /dev/vda, then files
# written and fsynced one after another, each listed (name and sha256) in
# MANIFEST, which is fsynced too. "FSYNCED <n>" goes to the console only
# after file n and its MANIFEST line are on stable storage as far as the
# guest knows (its fsyncs returned). Runs until the host kills the machine
# (and the daemon): after "FSYNC-READY" (MIN_FILES files), forever; or exits
# 1 after MAX_FILES. Files are 4 KiB..1 MiB of random data; every fourth
# file is rewritten in place later, so the cache sees overwrites too.
# fsync-check.sh, in the next boot, checks what survived.
set -eu
DEV=${VBLK_DEV:-/dev/vda}
MNT=/mnt/fsync
MIN_FILES=${MIN_FILES:-20}
MAX_FILES=${MAX_FILES:-100000}

[ -b "$DEV" ] || { echo "fsync-write: $DEV is not a block device"; exit 1; }
mkfs.ext4 -q -F "$DEV" >/dev/null
mkdir -p "$MNT"
mount -t ext4 "$DEV" "$MNT"
: >"$MNT/MANIFEST"
sync "$MNT/MANIFEST" "$MNT"
n=1
while [ "$n" -le "$MAX_FILES" ]; do
    f="f$n"
    if [ $((n % 4)) = 0 ] && [ "$n" -gt 8 ]; then
        # Rewrite an older file in place: its new sum is listed again, and
        # the later line wins.
        f="f$((n - 7))"
    fi
    kb=$(( ( $(od -An -N2 -tu2 /dev/urandom) % 256 + 1 ) * 4 ))
    dd if=/dev/urandom of="$MNT/$f" bs=1k count="$kb" conv=notrunc 2>/dev/null
    sync "$MNT/$f"
    s=$(sha256sum "$MNT/$f" | cut -d' ' -f1)
    echo "$s  $f" >>"$MNT/MANIFEST"
    sync "$MNT/MANIFEST" "$MNT"
    echo "FSYNCED $n"
    [ "$n" != "$MIN_FILES" ] || echo "FSYNC-READY"
    n=$((n + 1))
done
echo "fsync-write: reached $MAX_FILES files without being stopped"
exit 1
