#!/usr/bin/env bash
# Runs the whole test suite (unit, model, stress, crash, daemon with libblkio,
# QEMU guest end to end). Release mode: the stress and crash tests do more
# work per second and the guest test is I/O bound anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release "$@"
