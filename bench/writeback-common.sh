# Shared by bench/writeback.sh and bench/writeback-profile.sh (sourced).
# Needs BIN, LOAD, SIZE_MIB and W (work directory holding source.img).

# Starts a write-back daemon on $W/source.img with cache file $1 (its pid in
# $pid) and writes SIZE_MIB MiB to it sequentially with vbc-load, so that
# SIZE_MIB/64K contiguous blocks are dirty.
wb_start_filled() {
    "$BIN" serve --source "$W/source.img" --cache "$1" --socket "$W/v.sock" \
        --control "$W/c.sock" --mode writeback 2>"$W/daemon.log" &
    pid=$!
    until "$BIN" status --control "$W/c.sock" >/dev/null 2>&1; do
        kill -0 $pid || { cat "$W/daemon.log" >&2; exit 1; }
        sleep 0.05
    done
    "$LOAD" --socket "$W/v.sock" --pattern write --bs 1M --iodepth 8 --size "${SIZE_MIB}M" \
        --once --runtime 120s --ramp 0s --json >/dev/null
}

# The daemon's dirty block count.
wb_dirty() {
    "$BIN" status --json --control "$W/c.sock" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["dirty_blocks"])'
}
