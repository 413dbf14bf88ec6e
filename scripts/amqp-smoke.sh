#!/usr/bin/env bash
# Two processes over the real broker (config/amqp.toml: Postgres store, AMQP transport on the
# local RabbitMQ): examples/inventory_service consumes what examples/order_service publishes.
# Fails when the order service fails or the inventory service has not applied both orders
# within its timeout.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Schemas of this run only (the order service's and `<schema>_inventory`), dropped at the end,
# so that a schema left by an older build never gets in the way.
db="${WHIZBANG_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export WHIZBANG_DATABASE_URL="$db"
export WHIZBANG_SCHEMA="smoke_$(date +%s)_$$"
drop_schemas() {
    psql "$db" -Xqc "DROP SCHEMA IF EXISTS $WHIZBANG_SCHEMA CASCADE; DROP SCHEMA IF EXISTS ${WHIZBANG_SCHEMA}_inventory CASCADE" >/dev/null 2>&1 || true
}

scripts/amqp-topology.sh orders:inventory
# Start from an empty subscription so that the two orders of this run are the ones counted.
if [[ $EUID -eq 0 ]]; then rabbitmqctl purge_queue orders.inventory >/dev/null; else sudo rabbitmqctl purge_queue orders.inventory >/dev/null; fi
cargo build --release --quiet --example order_service --example inventory_service
examples="${CARGO_TARGET_DIR:-target}/release/examples"

log=$(mktemp /tmp/whizbang-inventory.XXXXXX.log)
"$examples"/inventory_service --config config/amqp.toml --orders 2 --timeout-secs 60 >"$log" 2>&1 &
inventory=$!
trap 'kill "$inventory" 2>/dev/null || true; rm -f "$log"; drop_schemas' EXIT
"$examples"/order_service --config config/amqp.toml
if ! wait "$inventory"; then
    cat "$log" >&2
    echo "amqp-smoke.sh: the inventory service did not apply both orders" >&2
    exit 1
fi
cat "$log"
