#!/usr/bin/env bash
# Fault injection across processes: three writer instances of one service and a consumer
# service, as separate processes on the local Postgres and RabbitMQ; one writer is killed with
# SIGKILL every few seconds and started again; the broker and the Postgres server are each
# restarted once mid-run. At the end it prints lost, duplicates, order_violations, stuck_rows
# and takeover_s_max (one `name: value` line each, with the rest of the run's figures), writes
# them to target/chaos/results.json, and exits non-zero when a bound is missed.
#
#   scripts/chaos.sh            the full form: 200 streams x 100 events (about 70 s)
#   scripts/chaos.sh --short    the short form CI runs: 60 streams x 50 events (about 55 s)
#
# Further arguments go to `whizbang-chaos run` (see `cargo run --release --bin whizbang-chaos
# -- run --help`: --streams, --events, --rate, --kill-every-s, --keep, ...). Lease times come
# from config/chaos.toml. Needs root (or password-less sudo) to restart the servers; installs
# and starts them first when missing, like scripts/test.sh.

set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# shellcheck source=scripts/servers.sh
source scripts/servers.sh
ensure_servers

step "cargo run --release --bin whizbang-chaos -- run $*"
WHIZBANG_DATABASE_URL="$WHIZBANG_TEST_DATABASE_URL" WHIZBANG_AMQP_URL="$WHIZBANG_TEST_AMQP_URL" \
    cargo run --release --bin whizbang-chaos -- run "$@" || die "the chaos run failed (see above)"
