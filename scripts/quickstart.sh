#!/usr/bin/env bash
# One command from a fresh machine to a VM guest served by vblkcache:
# installs the packages (QEMU from bookworm-backports, busybox, fio...), builds
# the daemon, creates a source image and a cache file, starts
# `vblkcache serve` with its defaults (write-back, 64K blocks, cache sized to
# the cache file), boots a small Linux guest against it under QEMU and runs
# fio with verification plus an ext4 round trip in the guest.
#
# Extra arguments go to qemu-scripts/serve-and-boot.sh (see its --help), e.g.
#   scripts/quickstart.sh --size 2G --cache-size 512M --workdir /var/tmp/vblk --keep
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) -eq 0 ]]; then
    bash qemu-scripts/install-deps.sh
else
    sudo bash qemu-scripts/install-deps.sh
fi
cargo build --release
exec bash qemu-scripts/serve-and-boot.sh "$@"
