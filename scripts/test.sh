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
cargo test --release "$@"
