#!/usr/bin/env bash
# Runs the whole whizbang test suite: the one command for a fresh Debian machine (as root) and
# for our dev machines.
#
#   scripts/test.sh
#
# 1. Installs what is missing (apt-get: postgresql, rabbitmq-server, a C linker; rustup when
#    there is no cargo), only when missing.
# 2. Starts PostgreSQL on 127.0.0.1:5432 and RabbitMQ (with its AMQP 1.0 plugin) on
#    127.0.0.1:5672 when they are not answering, and waits for them with a deadline. A server
#    that cannot be reached fails this script: tests are never skipped.
# 3. cargo fmt --check, cargo clippy (warnings are errors), cargo test and the doc tests over the
#    whole workspace (the library, the operator CLI, the tools), the runtime contracts again on
#    one worker thread (WHIZBANG_TEST_WORKER_THREADS=1), the order_service example as a
#    smoke test, and the short form of the chaos run (scripts/chaos.sh --short: the main run,
#    then the Postgres-restart and broker-restart scenarios, on private servers of its own).
#
# Idempotent: on a machine where everything is installed and running it only checks and tests.
#
# Environment:
#   WHIZBANG_TEST_DATABASE_URL  default postgres://postgres@127.0.0.1:5432/postgres
#   WHIZBANG_TEST_AMQP_URL      default amqp://guest:guest@127.0.0.1:5672
#   SERVER_TIMEOUT              seconds to wait for each server (default 90)

set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# shellcheck source=scripts/servers.sh
source scripts/servers.sh
ensure_servers

# ---- 4. Checks and tests ----------------------------------------------------------------

# Each Postgres test works in a schema of its own (t_...), dropped by most tests when they pass;
# clear what earlier runs left behind so the database does not grow run after run.
step "drop test schemas left by earlier runs"
psql "$WHIZBANG_TEST_DATABASE_URL" -Xqt -c "SELECT string_agg(format('DROP SCHEMA %I CASCADE;', nspname), ' ')
    FROM pg_namespace WHERE nspname LIKE 't\_%' OR nspname LIKE 'bench\_%' OR nspname LIKE 'chaos\_%'" \
    | psql "$WHIZBANG_TEST_DATABASE_URL" -Xq >/dev/null || die "cannot clean old test schemas"

step "cargo fmt --all --check"
cargo fmt --all --check || die "formatting differs: run cargo fmt"

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings || die "clippy found problems"

# The library without its optional backends: each feature set builds and lints clean, so a
# service that needs only one of them is not handed a broken build.
for features in "--no-default-features" "--no-default-features --features postgres" \
    "--no-default-features --features amqp" "--no-default-features --features web" \
    "--no-default-features --features operator" "--no-default-features --features metrics" \
    "--no-default-features --features otel" "--no-default-features --features otlp"; do
    step "cargo clippy -p whizbang --lib $features -- -D warnings"
    # shellcheck disable=SC2086 # the feature flags are separate words
    cargo clippy -p whizbang --lib $features -- -D warnings || die "the library does not build with $features"
done

# --no-fail-fast: every test binary runs, so one run reports every failure. A failure's panic
# message sits in the middle of a long output: it is repeated at the end, where a CI summary that
# keeps only the head and the tail of the log still shows it.
step "cargo test --workspace --all-targets --no-fail-fast"
test_log=$(mktemp)
if ! cargo test --workspace --all-targets --no-fail-fast 2>&1 | tee "$test_log"; then
    echo "==> why they failed (each panic and the lines after it)"
    grep -A6 -E "^---- |panicked at" "$test_log" | grep -vE "^ +[0-9]+: |^ +at " | head -120
    die "tests failed (see the failures listed above)"
fi
rm -f "$test_log"

# The runtime contracts (ordering, read-your-writes, failures, supervision, ...) and the whole
# runtime on Postgres again, with every partition on one worker thread: the run above used one
# per core.
step "WHIZBANG_TEST_WORKER_THREADS=1 cargo test --test it -- contract:: postgres::runtime"
WHIZBANG_TEST_WORKER_THREADS=1 cargo test --test it -- contract:: postgres::runtime ||
    die "the runtime contracts failed on one worker thread"

step "cargo test --workspace --doc"
cargo test --workspace --doc || die "doc tests failed"

step "smoke test: cargo run --release --example order_service"
cargo run --release --example order_service || die "the order_service example failed"

step "smoke test: the order_service example on the Postgres store (config/postgres.toml)"
smoke_schema="smoke_pg_$$"
WHIZBANG_SCHEMA="$smoke_schema" WHIZBANG_DATABASE_URL="$WHIZBANG_TEST_DATABASE_URL" \
    cargo run --release --example order_service -- --config config/postgres.toml \
    || die "the order_service example failed on the Postgres store"
step "smoke test: the operator commands on what the example left (status, replay)"
WHIZBANG_SCHEMA="$smoke_schema" WHIZBANG_DATABASE_URL="$WHIZBANG_TEST_DATABASE_URL" \
    cargo run --release --bin whizbang -- --config config/postgres.toml status \
    || die "whizbang status failed on the example's schema"
WHIZBANG_SCHEMA="$smoke_schema" WHIZBANG_DATABASE_URL="$WHIZBANG_TEST_DATABASE_URL" \
    cargo run --release --example order_service -- --config config/postgres.toml \
    replay order-summary --from scratch \
    || die "the order_service example's replay command failed"
psql "$WHIZBANG_TEST_DATABASE_URL" -Xqc "DROP SCHEMA IF EXISTS $smoke_schema CASCADE; DROP SCHEMA IF EXISTS ${smoke_schema}_inventory CASCADE" >/dev/null

step "smoke test: the order_api example over HTTP (POST /orders, then SIGTERM)"
api_port=18480
cargo build --release --example order_api || die "the order_api example does not build"
"${CARGO_TARGET_DIR:-target}/release/examples/order_api" --listen "127.0.0.1:$api_port" &
api_pid=$!
for _ in $(seq 1 300); do
    rc=0
    curl -s "http://127.0.0.1:$api_port/orders/none" -o /dev/null || rc=$?
    [ "$rc" -ne 7 ] && break # 7: could not connect (not listening yet)
    sleep 0.1
done
status=$(curl -s --max-time 60 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$api_port/orders" \
    -H 'Content-Type: application/json' \
    -d '{"order_id":"S-1","customer_id":"smoke","lines":[{"sku":"WIDGET","quantity":1,"unit_price_cents":2500}]}' \
    || true)
kill -TERM "$api_pid"
wait "$api_pid" || die "order_api did not stop cleanly on SIGTERM"
[ "$status" = "201" ] || die "POST /orders answered $status, not 201"

step "smoke test: scripts/amqp-smoke.sh (order_service and inventory_service over AMQP)"
scripts/amqp-smoke.sh || die "the two services did not exchange their events over AMQP"

step "fault injection: scripts/chaos.sh --short (kills, restarts, hangs, dead letters)"
scripts/chaos.sh --short || die "the short chaos run failed"

step "all passed"
