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

# SIGTERM, as an orchestrator sends it: the waiting service stops cleanly (exit 0) in time.
"$examples"/inventory_service --config config/amqp.toml >"$log" 2>&1 &
inventory=$!
deadline=$((SECONDS + 60))
until grep -q "waiting for orders" "$log"; do
    if ((SECONDS > deadline)) || ! kill -0 "$inventory" 2>/dev/null; then
        cat "$log" >&2
        echo "amqp-smoke.sh: the inventory service did not start waiting for orders" >&2
        exit 1
    fi
    sleep 0.1
done
kill -TERM "$inventory"
deadline=$((SECONDS + 30))
while kill -0 "$inventory" 2>/dev/null; do
    if ((SECONDS > deadline)); then
        echo "amqp-smoke.sh: the inventory service was still running 30 s after SIGTERM" >&2
        exit 1
    fi
    sleep 0.1
done
if ! wait "$inventory" || ! grep -q "stop requested" "$log"; then
    cat "$log" >&2
    echo "amqp-smoke.sh: the inventory service did not stop cleanly on SIGTERM" >&2
    exit 1
fi
echo "amqp-smoke.sh: SIGTERM stopped the inventory service cleanly"
