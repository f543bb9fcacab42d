#!/usr/bin/env bash
# The test command: installs what the tests need (idempotent, about a second
# when everything is there), then runs every test: unit, model, stress,
# crash-point, kill -9, daemon with libblkio, QEMU guest end to end.
# Release mode: stress and crash tests do more per second, and the guest test
# is I/O bound anyway. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) -eq 0 ]]; then
    bash qemu-scripts/install-deps.sh
else
    sudo bash qemu-scripts/install-deps.sh
fi
# Huge pages for the tests of guest RAM on hugetlbfs (4 of 2 MiB for the
# unit test, 256 for a 512 MiB QEMU guest), only for the run: the previous
# setting is put back on exit. Tests skip what the kernel could not reserve.
HP=/proc/sys/vm/nr_hugepages
if [[ -w $HP && $(cat "$HP") -lt 260 ]]; then
    old=$(cat "$HP")
    trap 'echo "$old" > "$HP"' EXIT
    echo 260 > "$HP" || true
fi
cargo test --release "$@"
