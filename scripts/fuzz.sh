#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time, one after the
# other, and prints libFuzzer's final figures for each. Meant to be run before
# a release (it does not fit CI's time budget). See FUZZING.md.
#
#   scripts/fuzz.sh [-t SECONDS] [TARGET...]
#
# -t SECONDS  time per target (default 30)
# TARGET      a subset of: virtio_request meta_decode cache_open control_request
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). Uses the nightly toolchain if
# rustup has one, otherwise RUSTC_BOOTSTRAP=1 with the stable one (cargo-fuzz
# needs -Zsanitizer). New corpus entries go to fuzz/corpus/TARGET (not checked
# in); the checked-in seeds are in fuzz/seeds/TARGET, reproducers of past
# findings in fuzz/regressions/TARGET (run first). Exits non-zero if any
# target finds a crash; the reproducer is in fuzz/artifacts/TARGET.
set -euo pipefail

secs=30
while getopts "t:h" opt; do
    case $opt in
        t) secs=$OPTARG ;;
        h) sed -n '2,16p' "$0"; exit 0 ;;
        *) exit 2 ;;
    esac
done
shift $((OPTIND - 1))
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(virtio_request meta_decode cache_open control_request)
fi
case $secs in
    ''|*[!0-9]*) echo "fuzz.sh: -t wants a number of seconds, got '$secs'" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/../fuzz"
if ! command -v cargo-fuzz >/dev/null; then
    echo "fuzz.sh: cargo-fuzz not found; run 'cargo install cargo-fuzz'" >&2
    exit 2
fi
toolchain=()
if rustup run nightly rustc --version >/dev/null 2>&1; then
    toolchain=(+nightly)
else
    export RUSTC_BOOTSTRAP=1
fi

# -a: debug assertions, so integer overflow panics instead of wrapping.
for t in "${targets[@]}"; do cargo "${toolchain[@]}" fuzz build -a "$t"; done

failed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    # Inputs must be able to grow to a whole guest request / metadata page.
    case $t in
        virtio_request) max_len=20000 ;;
        meta_decode) max_len=4200 ;;
        cache_open) max_len=2048 ;;
        *) max_len=4096 ;;
    esac
    log=$(mktemp)
    # Reproducers of past findings must keep passing.
    if [ -d "regressions/$t" ]; then
        if ! cargo "${toolchain[@]}" fuzz run -a "$t" "regressions/$t" -- -runs=0 >"$log" 2>&1; then
            echo "!! $t: a regression input fails again:"
            tail -40 "$log"
            failed+=("$t")
        fi
    fi
    echo "== $t: ${secs}s"
    if cargo "${toolchain[@]}" fuzz run -a "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -max_len="$max_len" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1; then
        grep -a -E "^#[0-9]+.*(DONE|pulse)" "$log" | tail -1
        grep -a -E "stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)" "$log"
    else
        echo "!! $t failed; last lines:"
        tail -40 "$log"
        failed+=("$t")
    fi
    rm -f "$log"
done
if [ ${#failed[@]} -ne 0 ]; then
    echo "fuzz.sh: crashes or errors in: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz.sh: no crash in ${targets[*]}"
