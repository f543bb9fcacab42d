#!/bin/sh
# Runs the engine micro-benchmarks in release mode and keeps the table and the
# JSON report under target/bench-engine/ (named by date).
# Usage: benches/run-engine.sh [--quick] [other bench options]
set -eu
cd "$(dirname "$0")/.."
out=target/bench-engine
mkdir -p "$out"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
cargo bench --bench engine -- --json-out "$out/engine-$stamp.json" "$@" | tee "$out/engine-$stamp.txt"
echo "saved $out/engine-$stamp.txt and $out/engine-$stamp.json"
