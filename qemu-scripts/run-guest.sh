#!/usr/bin/env bash
# run-guest.sh --script GUEST_SCRIPT [--socket SOCK] [options]
#
# Boots the test guest built by build-guest.sh in QEMU, with a vhost-user-blk
# disk (/dev/vda in the guest) served by the backend listening on SOCK, runs
# GUEST_SCRIPT inside it and exits with that script's status.
#
# Options:
#   --socket SOCK        vhost-user-blk backend socket (omit for a guest without disk)
#   --script FILE        guest script (required; repeatable: the scripts run in the
#                        given order in one boot, stopping at the first failure)
#   --queues N           num-queues of vhost-user-blk-pci (default 1)
#   --timeout S          whole-run limit in seconds (default 300)
#   --socket-timeout S   how long to wait for SOCK to listen (default 30)
#   --guest-dir DIR      build-guest.sh output (default $VBLK_GUEST_DIR or <repo>/target/guest)
#   --guest-file FILE    extra file copied to /guest/ in the guest (repeatable)
#   --env K=V            variable exported to the guest script (repeatable)
#   --log FILE           console log (default: a temporary file, kept on failure)
#   --accel tcg|kvm|auto default auto: KVM only if it is real KVM (not PVM), else TCG
#   --mem SIZE           guest memory (default 1G; shared memfd, as vhost-user needs)
#   --hugepages          back guest memory with 2 MiB huge pages (a hugetlb memfd:
#                        needs SIZE / 2 MiB free pages, see /proc/sys/vm/nr_hugepages)
#   --quiet              do not copy the console to stdout
#   --initrd-only FILE   only write the initramfs with the scripts to FILE and exit
#   --qmp PATH           also serve QMP on the Unix socket PATH (e.g. to pause and resume the VM)
#                        (for booting by hand, e.g. with cloud-hypervisor: README.md)
#
# Exit status: the guest script's status, read from the "VBLK_GUEST_EXIT=<n>"
# marker that the guest's /init prints; 124 on timeout; 125 when QEMU ended
# without a marker (or could not start). On any failure the log tail is printed.
set -euo pipefail
HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
# shellcheck source-path=SCRIPTDIR
source "$HERE/lib.sh"

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
    exit 2
}
die() {
    echo "run-guest.sh: $*" >&2
    exit 125
}

SOCK="" INITRD_ONLY="" QMP="" QUEUES=1 TIMEOUT=300 SOCK_TIMEOUT=30 LOG="" ACCEL=auto MEM=1G QUIET=0 HUGE=""
GUEST_DIR=${VBLK_GUEST_DIR:-$(repo_root)/target/guest}
SCRIPTS=() FILES=() ENVS=()
while (($#)); do
    case $1 in
    --socket) SOCK=$2; shift 2 ;;
    --script) SCRIPTS+=("$2"); shift 2 ;;
    --queues) QUEUES=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --socket-timeout) SOCK_TIMEOUT=$2; shift 2 ;;
    --guest-dir) GUEST_DIR=$2; shift 2 ;;
    --guest-file) FILES+=("$2"); shift 2 ;;
    --env) ENVS+=("$2"); shift 2 ;;
    --log) LOG=$2; shift 2 ;;
    --accel) ACCEL=$2; shift 2 ;;
    --mem) MEM=$2; shift 2 ;;
    --hugepages) HUGE=",hugetlb=on,hugetlbsize=2M"; shift ;;
    --quiet) QUIET=1; shift ;;
    --initrd-only) INITRD_ONLY=$2; shift 2 ;;
    --qmp) QMP=$2; shift 2 ;;
    -h | --help) usage ;;
    *) echo "run-guest.sh: unknown argument $1" >&2; usage ;;
    esac
done

((${#SCRIPTS[@]} > 0)) || die "--script is required"
for s in "${SCRIPTS[@]}"; do
    [[ -f $s ]] || die "guest script $s not found"
done
[[ $QUEUES =~ ^[1-9][0-9]*$ ]] || die "--queues must be a positive integer, not '$QUEUES'"
[[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "--timeout must be a positive integer, not '$TIMEOUT'"
QEMU=${QEMU:-qemu-system-x86_64}
QBOOT=/usr/share/qemu/qboot.rom
if [[ -z $INITRD_ONLY ]]; then
    command -v "$QEMU" >/dev/null || die "$QEMU not found; run qemu-scripts/install-deps.sh"
    [[ -f $QBOOT ]] || die "$QBOOT not found; run qemu-scripts/install-deps.sh"
fi
for f in vmlinux initrd.cpio; do
    [[ -s $GUEST_DIR/$f ]] || die "$GUEST_DIR/$f missing; run qemu-scripts/build-guest.sh $GUEST_DIR"
done

case $ACCEL in
tcg) MACHINE_ACCEL=tcg CPU=max ;;
kvm) MACHINE_ACCEL=kvm CPU=host ;;
auto) if kvm_usable; then MACHINE_ACCEL=kvm CPU=host; else MACHINE_ACCEL=tcg CPU=max; fi ;;
*) die "--accel must be tcg, kvm or auto" ;;
esac

RUN=$(mktemp -d "${TMPDIR:-/tmp}/vblk-guest.XXXXXX")
KEEP_LOG=0
# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() {
    rm -rf "$RUN/initrd" "$RUN/extra"
    if ((KEEP_LOG == 0)); then rm -rf "$RUN"; fi
}
trap cleanup EXIT
if [[ -z $LOG ]]; then
    LOG=$RUN/console.log
fi
: >"$LOG"

# The guest script (and extra files) travel in a second newc archive that is
# concatenated after the base initramfs; the kernel unpacks both in order.
mkdir -p "$RUN/extra/guest/tests"
# /init runs /guest/script.sh: a driver that runs the given scripts in order.
{
    echo '#!/bin/sh'
    n=0
    for s in "${SCRIPTS[@]}"; do
        n=$((n + 1))
        name="$n-$(basename "$s")"
        cp "$s" "$RUN/extra/guest/tests/$name"
        printf 'echo "=== guest test %s ==="\n' "$name"
        # shellcheck disable=SC2016 # $? and $rc are for the guest's shell
        printf '/bin/sh /guest/tests/%s || { rc=$?; echo "=== %s failed: $rc ==="; exit $rc; }\n' "$name" "$name"
    done
    echo 'exit 0'
} >"$RUN/extra/guest/script.sh"
for f in "${FILES[@]}"; do
    [[ -f $f ]] || die "guest file $f not found"
    cp "$f" "$RUN/extra/guest/"
done
{
    for kv in "${ENVS[@]}"; do
        [[ $kv == *=* && ${kv%%=*} =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "--env wants K=V, not '$kv'"
        printf 'export %s=%q\n' "${kv%%=*}" "${kv#*=}"
    done
} >"$RUN/extra/guest/env"
chmod -R a+rX "$RUN/extra"
cp "$GUEST_DIR/initrd.cpio" "$RUN/initrd"
(cd "$RUN/extra" && find guest | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >>"$RUN/initrd"
if [[ -n $INITRD_ONLY ]]; then
    mv "$RUN/initrd" "$INITRD_ONLY"
    echo "run-guest.sh: wrote $INITRD_ONLY" >&2
    exit 0
fi

ARGS=(
    -machine "q35,accel=$MACHINE_ACCEL,memory-backend=mem" -cpu "$CPU" -m "$MEM"
    -object "memory-backend-memfd,id=mem,size=$MEM,share=on$HUGE"
    -bios "$QBOOT" -kernel "$GUEST_DIR/vmlinux" -initrd "$RUN/initrd"
    -append "console=ttyS0 quiet panic=-1 rdinit=/init"
    -nographic -nodefaults -serial stdio -monitor none -no-reboot
)
if [[ -n $QMP ]]; then
    ARGS+=(-qmp "unix:$QMP,server=on,wait=off")
fi
if [[ -n $SOCK ]]; then
    case $SOCK in /*) ;; *) SOCK=$PWD/$SOCK ;; esac
    # Wait for the backend to listen, without connecting to it (see lib.sh).
    wait_for_listen "$SOCK" "$SOCK_TIMEOUT" || die "backend socket $SOCK is not listening"
    ARGS+=(-chardev "socket,id=c0,path=$SOCK"
        -device "vhost-user-blk-pci,chardev=c0,num-queues=$QUEUES")
fi

echo "run-guest.sh: booting ($MACHINE_ACCEL; ${SCRIPTS[*]##*/}; log $LOG)" >&2
start=$SECONDS
set +e
if ((QUIET)); then
    timeout -k 10 "$TIMEOUT" "$QEMU" "${ARGS[@]}" </dev/null >>"$LOG" 2>&1
    qrc=$?
else
    timeout -k 10 "$TIMEOUT" "$QEMU" "${ARGS[@]}" </dev/null 2>&1 | tee -a "$LOG"
    qrc=${PIPESTATUS[0]}
fi
set -e
elapsed=$((SECONDS - start))

marker=$(tr -d '\r' <"$LOG" | sed -n 's/^VBLK_GUEST_EXIT=\([0-9][0-9]*\)$/\1/p' | tail -n1)
fail() {
    KEEP_LOG=1
    echo "run-guest.sh: $1 (after ${elapsed}s); last console lines of $LOG:" >&2
    tail -n "${VBLK_LOG_LINES:-40}" "$LOG" | sed 's/^/    /' >&2
    exit "$2"
}
if ((qrc == 124 || qrc == 137)); then
    fail "timed out after ${TIMEOUT}s" 124
fi
if [[ -z $marker ]]; then
    fail "QEMU exited with status $qrc and no VBLK_GUEST_EXIT marker" 125
fi
if ((marker != 0)); then
    fail "guest script exited with status $marker" "$marker"
fi
echo "run-guest.sh: guest script passed in ${elapsed}s" >&2
exit 0
