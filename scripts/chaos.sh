#!/usr/bin/env bash
# Fault injection across processes: three writer instances of one service and a consumer
# service, as separate processes on the local Postgres and RabbitMQ; one writer is killed with
# SIGKILL every few seconds and started again; the broker and the Postgres server are each
# restarted once mid-run. At the end it prints lost, duplicates, order_violations, stuck_rows,
# takeover_s_max and crash_takeover_s_max (writer 0 runs with a 300 s lease: its kills are
# taken over through its liveness lock, within the heartbeat + 2 s) (one `name: value` line
# each, with the rest of the run's figures), writes them to target/chaos/results.json, and
# fails when a bound is missed.
#
# Then the two single-fault scenarios, in both forms: `whizbang-chaos pg-restart` (the Postgres
# server restarted under load: every stored event applied once, in order, here and downstream;
# every successful send stored once) and `whizbang-chaos broker-restart` (the broker stopped and
# started mid-run: nothing lost, nothing applied twice, order kept). Each writes
# target/chaos/<scenario>.json and fails the script when a check fails. They restart servers
# the parallel test suite uses, which is why they run here and not in `cargo test`.
#
#   scripts/chaos.sh            the full form: 200 streams x 100 events (about 70 s), then the
#                               scenarios (about 40 s)
#   scripts/chaos.sh --short    the short form CI runs: 60 streams x 50 events (about 55 s), then
#                               the scenarios
#
# Further arguments go to `whizbang-chaos run` (see `cargo run --release --bin whizbang-chaos
# -- run --help`: --streams, --events, --rate, --kill-every-s, --keep, ...). Lease times come
# from config/chaos.toml. `cargo run --release --bin whizbang-chaos -- report --markdown` prints
# the figures with their bounds. Needs root (or password-less sudo) to restart the servers;
# installs and starts them first when missing, like scripts/test.sh.

set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# shellcheck source=scripts/servers.sh
source scripts/servers.sh
ensure_servers

export WHIZBANG_DATABASE_URL="$WHIZBANG_TEST_DATABASE_URL" WHIZBANG_AMQP_URL="$WHIZBANG_TEST_AMQP_URL"

# Results of an earlier run must not pass for this one's.
target_dir="${CARGO_TARGET_DIR:-target}"
rm -f "$target_dir"/chaos/{results,pg-restart,broker-restart}.json

step "cargo run --release --bin whizbang-chaos -- run $*"
cargo run --release --bin whizbang-chaos -- run "$@" || die "the chaos run failed (see above)"

step "cargo run --release --bin whizbang-chaos -- pg-restart"
cargo run --release --bin whizbang-chaos -- pg-restart \
    || die "the Postgres-restart scenario failed (see above)"

step "cargo run --release --bin whizbang-chaos -- broker-restart"
cargo run --release --bin whizbang-chaos -- broker-restart \
    || die "the broker-restart scenario failed (see above)"
