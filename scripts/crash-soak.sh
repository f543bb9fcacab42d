#!/bin/sh
# Crash soak: the SIGKILL loop of tests/crash_kill9.rs for many iterations,
# then the power-cut sweep of tests/engine_crash.rs over more workloads, for
# humans before a release. Usage: scripts/crash-soak.sh [ITERATIONS]
# (default 1000 kills, split between the 4K and 64K block-size runs).
# Each kill is followed by `vblkcache check`, a restart, and a full-disk
# comparison against what the client knows was flushed or written since.
set -eu
iterations="${1:-1000}"
case "$iterations" in
    ''|*[!0-9]*) echo "crash-soak: ITERATIONS must be a number, got '$iterations'" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
echo "crash-soak: $iterations kills (release build)"
start=$(date +%s)
CRASH_ITERATIONS="$iterations" cargo test --release --test crash_kill9 -- --nocapture --test-threads 1
# And the power-cut sweep of the engine over more write-back workloads than
# the suite runs (one per 10 kills, at least 20).
seeds=$(( iterations / 10 > 20 ? iterations / 10 : 20 ))
CRASH_SEEDS="$seeds" cargo test --release --test engine_crash crash_soak_writeback -- --ignored --nocapture
echo "crash-soak: passed in $(( $(date +%s) - start ))s"
