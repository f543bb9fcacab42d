#!/usr/bin/env bash
# build-guest.sh OUTDIR
#
# Builds a small Linux test guest for the vhost-user-blk tests:
#   OUTDIR/vmlinux      uncompressed ELF kernel (Debian's linux-image-6.1.0-*-amd64),
#                       booted by QEMU through PVH, about twice as fast as the bzImage
#   OUTDIR/initrd.cpio  uncompressed newc initramfs: busybox-static, fio, e2fsprogs,
#                       the virtio/ext4/dm modules with modules.dep, and /init
#   OUTDIR/kernel-release
#
# The kernel .deb is fetched with `apt-get download` and unpacked with dpkg-deb -x;
# it is never installed. The build is cached: OUTDIR/build-key records the inputs
# (this script, the kernel package version, the host packages copied in), and a
# rerun with the same inputs returns at once. Concurrent runs on the same OUTDIR
# are serialised with flock.
#
# /init runs the guest script /guest/script.sh, which run-guest.sh supplies in a
# second cpio archive concatenated after initrd.cpio (the kernel unpacks both),
# prints "VBLK_GUEST_EXIT=<status>" on the console and powers off.
#
# Environment: GUEST_KERNEL_PKG overrides the kernel package name.
set -euo pipefail

die() {
    echo "build-guest.sh: $*" >&2
    exit 1
}

[[ $# -eq 1 ]] || die "usage: build-guest.sh OUTDIR"
OUT=$1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SELF=$(readlink -f "${BASH_SOURCE[0]}")

for tool in apt-get apt-cache dpkg-deb dpkg-query cpio xz depmod modprobe ldd ldconfig sha256sum flock; do
    command -v "$tool" >/dev/null || die "$tool not found; run qemu-scripts/install-deps.sh"
done
for f in /bin/busybox /usr/bin/fio /sbin/mke2fs /sbin/e2fsck; do
    [[ -x $f ]] || die "$f not found; run qemu-scripts/install-deps.sh"
done

exec 9>"$OUT/.lock"
flock 9

# Modules the guest loads at boot, in this order; modprobe pulls in their
# dependencies (crc16, mbcache, jbd2, dm-bio-prison, ...) from modules.dep.
# crc32c: ext4 metadata checksums ask the crypto API for "crc32c".
BOOT_MODULES=(virtio_pci virtio_blk crc32c_generic crc32c-intel ext4)
# Present but loaded on demand by guest scripts (dm-cache as a reference cache).
EXTRA_MODULES=(dm-mod dm-cache dm-cache-smq virtio_console)

pick_kernel_pkg() {
    if [[ -n ${GUEST_KERNEL_PKG:-} ]]; then
        echo "$GUEST_KERNEL_PKG"
        return
    fi
    # The metapackage's candidate names the current ABI; fall back to the
    # highest 6.1.0-N-amd64 the lists know.
    local dep
    dep=$(apt-cache depends linux-image-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-6\.1\.0-[0-9]+-amd64$/ { print $2; exit }')
    if [[ -z $dep ]]; then
        dep=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' |
            awk '{ print $1 }' | sort -V | tail -n1)
    fi
    [[ -n $dep ]] || die "no linux-image-6.1.0-*-amd64 package known to apt (run apt-get update)"
    echo "$dep"
}

KPKG=$(pick_kernel_pkg)
KVERSION=$(apt-cache policy "$KPKG" | awk '$1 == "Candidate:" { print $2 }')
[[ -n $KVERSION && $KVERSION != "(none)" ]] || die "apt has no candidate for $KPKG"

host_versions() {
    local p
    for p in busybox-static fio e2fsprogs libc6; do
        printf '%s=%s\n' "$p" "$(dpkg-query -W -f='${Version}' "$p" 2>/dev/null || echo none)"
    done
}

KEY=$( {
    sha256sum <"$SELF"
    echo "$KPKG=$KVERSION"
    host_versions
} | sha256sum | cut -d' ' -f1)

if [[ -f $OUT/build-key && $(<"$OUT/build-key") == "$KEY" &&
    -s $OUT/vmlinux && -s $OUT/initrd.cpio && -s $OUT/kernel-release ]]; then
    echo "build-guest.sh: up to date in $OUT ($KPKG $KVERSION)"
    exit 0
fi
rm -f "$OUT/build-key"

# --- kernel package ---------------------------------------------------------
DEBDIR=$OUT/debs
mkdir -p "$DEBDIR"
DEB=$(find "$DEBDIR" -maxdepth 1 -name "${KPKG}_*.deb" -print | sort | tail -n1)
want_deb="${KPKG}_${KVERSION//:/%3a}_amd64.deb"
if [[ -z $DEB || $(basename "$DEB") != "$want_deb" ]]; then
    rm -f "$DEBDIR"/*.deb
    echo "build-guest.sh: downloading $KPKG $KVERSION"
    # apt drops privileges to _apt for downloads; let it write here.
    chmod 0777 "$DEBDIR" 2>/dev/null || true
    (cd "$DEBDIR" && apt-get download -q "$KPKG=$KVERSION") >&2 ||
        die "apt-get download $KPKG=$KVERSION failed"
    DEB=$(find "$DEBDIR" -maxdepth 1 -name "${KPKG}_*.deb" -print | head -n1)
    [[ -n $DEB ]] || die "apt-get download left no .deb in $DEBDIR"
fi

WORK=$(mktemp -d "$OUT/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
KX=$WORK/kernel
dpkg-deb -x "$DEB" "$KX"
KREL=$(basename "$(find "$KX/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n1)")
[[ -n $KREL ]] || die "no lib/modules/<release> in $DEB"
BZIMAGE=$KX/boot/vmlinuz-$KREL
[[ -f $BZIMAGE ]] || die "no boot/vmlinuz-$KREL in $DEB"

# --- bzImage -> vmlinux -----------------------------------------------------
# The bzImage carries the kernel ELF as an xz stream after the real-mode setup
# and the decompressor stub. Try each xz magic (FD 37 7A 58 5A 00) in turn until
# one decompresses to an ELF; --single-stream ignores the bytes after it.
extract_vmlinux() {
    local img=$1 dst=$2 off
    while read -r off; do
        # Not a pipeline: xz stops reading at the stream's end, and the SIGPIPE
        # that tail then takes would fail the pipe under pipefail.
        if xz -dc --single-stream <(tail -c "+$((off + 1))" "$img") >"$dst" 2>/dev/null &&
            [[ $(head -c 4 "$dst" | od -An -tx1 | tr -d ' \n') == 7f454c46 ]]; then
            return 0
        fi
    done < <(LC_ALL=C grep -obUaP '\xfd\x37\x7a\x58\x5a\x00' "$img" | cut -d: -f1)
    return 1
}
extract_vmlinux "$BZIMAGE" "$WORK/vmlinux" || die "no xz-compressed ELF found in $BZIMAGE"

# --- initramfs tree -----------------------------------------------------------
R=$WORK/root
mkdir -p "$R"/usr/{bin,sbin,lib,lib64} "$R"/{dev,proc,sys,tmp,run,mnt,etc,guest}
ln -s usr/bin "$R/bin"
ln -s usr/sbin "$R/sbin"
ln -s usr/lib "$R/lib"
ln -s usr/lib64 "$R/lib64"
chmod 1777 "$R/tmp"
# The kernel opens /dev/console before /init runs; without the node the early
# output is lost (init re-opens it after mounting devtmpfs either way).
mknod -m 600 "$R/dev/console" c 5 1 2>/dev/null || true

# Real tools first, so busybox links do not shadow them.
REAL_TOOLS=(/usr/bin/fio /sbin/mke2fs /sbin/e2fsck /sbin/tune2fs /sbin/dumpe2fs)
copy_file() { # copy_file SRC [DST-PATH-IN-ROOT]
    local src=$1 dst=${2:-$1}
    mkdir -p "$R$(dirname "$dst")"
    cp -L "$src" "$R$dst"
}
copy_with_libs() {
    local bin=$1 lib
    copy_file "$bin" "/usr/${bin#/usr/}"
    # ldd lists each needed object at the path the loader resolves; keep that
    # path (e.g. ceph's private directory, found through RUNPATH).
    while read -r lib; do
        [[ -e $R$lib ]] || copy_file "$lib"
    done < <(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
}
for t in "${REAL_TOOLS[@]}"; do
    [[ -x $t ]] && copy_with_libs "$t"
done
ln -s mke2fs "$R/usr/sbin/mkfs.ext4"
ln -s e2fsck "$R/usr/sbin/fsck.ext4"
[[ -f /etc/mke2fs.conf ]] && copy_file /etc/mke2fs.conf

cp /bin/busybox "$R/usr/bin/busybox"
while read -r applet; do
    [[ $applet == busybox ]] && continue
    if [[ ! -e $R/usr/bin/$applet && ! -e $R/usr/sbin/$applet ]]; then
        ln -s busybox "$R/usr/bin/$applet"
    fi
done < <(/bin/busybox --list)

printf '%s\n' /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu/ceph >"$R/etc/ld.so.conf"
ldconfig -r "$R" 2>/dev/null || die "ldconfig -r failed"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$R/etc/passwd"
printf 'root:x:0:\n' >"$R/etc/group"

# --- kernel modules -----------------------------------------------------------
# Resolve the closure with the full tree's modules.dep, copy only that subset,
# then regenerate modules.dep for the subset so the guest's modprobe works.
depmod -b "$KX" "$KREL"
MODS=()
for m in "${BOOT_MODULES[@]}" "${EXTRA_MODULES[@]}"; do
    deps=$(modprobe -d "$KX" -S "$KREL" --show-depends "$m" 2>/dev/null) ||
        die "kernel module $m not found in $KPKG"
    while read -r kind path _; do
        [[ $kind == insmod ]] && MODS+=("$path")
    done <<<"$deps"
done
for path in $(printf '%s\n' "${MODS[@]}" | sort -u); do
    rel=${path#"$KX"}
    mkdir -p "$R$(dirname "$rel")"
    cp "$path" "$R$rel"
done
for f in modules.order modules.builtin modules.builtin.modinfo; do
    [[ -f $KX/lib/modules/$KREL/$f ]] && cp "$KX/lib/modules/$KREL/$f" "$R/lib/modules/$KREL/"
done
depmod -b "$R" "$KREL"
printf '%s\n' "${BOOT_MODULES[@]}" >"$R/etc/boot-modules"

# --- /init --------------------------------------------------------------------
cat >"$R/init" <<'INIT'
#!/bin/sh
# Test-guest init: mount the pseudo filesystems, load the block modules, run
# /guest/script.sh, report its status on the console, power off.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm /root
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs tmpfs /dev/shm
echo 1 >/proc/sys/kernel/printk 2>/dev/null
for m in $(cat /etc/boot-modules); do
    modprobe "$m" 2>/dev/null || echo "init: modprobe $m failed"
done
# A virtio disk is probed asynchronously after modprobe returns: if the machine
# has a virtio-blk PCI function (vendor 1af4, device 1001 legacy / 1042 modern),
# poll (bounded, 5 s) for its node.
has_vblk=0
for d in /sys/bus/pci/devices/*; do
    case "$(cat "$d/vendor" 2>/dev/null):$(cat "$d/device" 2>/dev/null)" in
    0x1af4:0x1001 | 0x1af4:0x1042) has_vblk=1 ;;
    esac
done
if [ $has_vblk = 1 ]; then
    i=0
    while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do
        usleep 50000
        i=$((i + 1))
    done
    [ -b /dev/vda ] || echo "init: virtio-blk device present but no /dev/vda"
fi
if [ -f /guest/script.sh ]; then
    echo "init: running guest script"
    # /guest/env holds the variables given with run-guest.sh --env.
    (cd /guest && { [ ! -f /guest/env ] || . /guest/env; } && exec /bin/sh /guest/script.sh)
    rc=$?
else
    echo "init: no /guest/script.sh in the initramfs"
    rc=127
fi
sync
echo
echo "VBLK_GUEST_EXIT=$rc"
poweroff -f
INIT
chmod 0755 "$R/init"

# --- archive --------------------------------------------------------------------
(cd "$R" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >"$WORK/initrd.cpio"

mv "$WORK/vmlinux" "$OUT/vmlinux"
mv "$WORK/initrd.cpio" "$OUT/initrd.cpio"
echo "$KREL" >"$OUT/kernel-release"
echo "$KEY" >"$OUT/build-key"
echo "build-guest.sh: built $OUT/vmlinux and $OUT/initrd.cpio ($KPKG $KVERSION," \
    "initrd $(($(stat -c %s "$OUT/initrd.cpio") / 1048576)) MiB)"
