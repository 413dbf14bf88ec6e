#!/usr/bin/env bash
# The runtime's instructions per event in one interval round of `whizbang-bench store`,
# counted by callgrind: repeatable where the machine's timings are not (the ratio's rounds
# move by ±25% on a shared 2-vCPU VM; these counts by well under 1%).
#
# Counting starts when the scoped figure is printed and stops after the round (and its raw
# baselines); the bench's own raw-baseline and read-back work (`store::run`) is subtracted.
# Needs valgrind and the local Postgres; the bench's usual database settings apply.
#
#   tools/perf/callgrind-interval.sh [BENCH_BINARY] [OUTPUT_PREFIX]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bin=${1:-target/release/whizbang-bench}
out=${2:-target/callgrind-interval}
commands=20000
[ -x "$bin" ] || cargo build --release --bin whizbang-bench
rm -f "$out".out* "$out".txt
valgrind --tool=callgrind --callgrind-out-file="$out.out" "$bin" store --rounds 1 \
    --commands "$commands" --calls 50 --idle-seconds 1 --backlog 3300 >"$out.txt" 2>&1 &
pid=$!
wait_for() {
    until grep -q "$1" "$out.txt"; do
        kill -0 "$pid" 2>/dev/null || { echo "the bench stopped early: $out.txt" >&2; exit 1; }
        sleep 0.5
    done
}
wait_for store_scoped_events_per_s
callgrind_control -z "$pid" >/dev/null 2>&1
wait_for store_interval_events_per_s_rounds
callgrind_control -d "$pid" >/dev/null 2>&1
wait "$pid"
inclusive() { callgrind_annotate --inclusive=yes "$out.out.1" 2>/dev/null; }
# awk reads to the end (an early exit would fail the pipe under pipefail).
first() { awk -v pattern="$1" '!done && $0 ~ pattern {gsub(",", "", $1); print $1; done = 1}'; }
total=$(inclusive | first 'PROGRAM TOTALS')
bench=$(inclusive | first 'whizbang_bench::store::run::[{][{]closure[}][}] [[]')
echo "runtime_instructions_per_event: $(( (total - bench) / commands ))"
echo "profile: $out.out.1 (callgrind_annotate --inclusive=yes $out.out.1)"
