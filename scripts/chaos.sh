#!/usr/bin/env bash
# Fault injection across processes, on PRIVATE servers of its own: three writer instances of
# one service and two consumer instances of another (a sharded subscription, a Postgres read
# model), as separate processes; every few seconds one of them gets SIGKILL and is started
# again; the broker and the Postgres server are each restarted once and hung once (SIGSTOP /
# SIGCONT), with a kill during each; poison messages and a failing perspective are
# dead-lettered, then requeued with the operator CLI. At the end it prints lost, duplicates,
# order_violations, stuck_rows, takeover_s_max, crash_takeover_s_max, consumer_kills, hangs,
# hang_recovery_s_max, dead_lettered, requeued, ... (one `name: value` line each), writes them
# to target/chaos/results.json, and fails when a bound is missed. See docs/chaos.md.
#
# Then the two single-fault scenarios: `whizbang-chaos pg-restart` and `whizbang-chaos
# broker-restart`, each writing target/chaos/<scenario>.json and failing the script when a
# check fails.
#
#   scripts/chaos.sh            the full form: 200 streams x 100 events
#   scripts/chaos.sh --short    the short form CI runs: 60 streams x 50 events
#
# The servers: the run restarts and hangs them, so it never uses the shared ones the tests
# use. It starts (and stops again when it ends) a Postgres cluster `chaos` on port 5434
# (pg_createcluster, trust authentication on 127.0.0.1) and a RabbitMQ node `chaos@localhost`
# on port 5673 (with the AMQP 1.0 and consistent-hash exchange plugins, no management
# plugin); a cluster or node that already runs is used as it is and left running.
# CHAOS_SHARED_SERVERS=1 uses the servers of scripts/servers.sh instead (only on a machine
# where nothing else uses them).
#
# Further arguments go to `whizbang-chaos run` (see `whizbang-chaos run --help`: --streams,
# --events, --rate, --kill-every-s, --flush-strategy, --keep, ...). Lease times come from
# config/chaos.toml. `target/release/whizbang-chaos report --markdown` prints the figures
# with their bounds, `... report --headline` a few lines for the README. Needs root (or
# password-less sudo); installs the server packages first when missing, like scripts/test.sh.

set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# shellcheck source=scripts/servers.sh
source scripts/servers.sh

CHAOS_PG_CLUSTER=${CHAOS_PG_CLUSTER:-chaos}
CHAOS_PG_PORT=${CHAOS_PG_PORT:-5434}
CHAOS_NODE=${CHAOS_NODE:-chaos@localhost}
CHAOS_AMQP_PORT=${CHAOS_AMQP_PORT:-5673}
CHAOS_DIST_PORT=${CHAOS_DIST_PORT:-25673}
CHAOS_RMQ_DIR=${CHAOS_RMQ_DIR:-/tmp/whizbang-chaos-rabbitmq}

started_pg=""
started_rmq=""
stop_private_servers() {
    if [[ -n $started_rmq ]]; then
        as_root rabbitmqctl -n "$CHAOS_NODE" stop >/dev/null 2>&1 ||
            note "could not stop $CHAOS_NODE: rabbitmqctl -n $CHAOS_NODE stop"
    fi
    if [[ -n $started_pg ]]; then
        as_root pg_ctlcluster "$started_pg" "$CHAOS_PG_CLUSTER" stop >/dev/null 2>&1 ||
            note "could not stop cluster $CHAOS_PG_CLUSTER: pg_ctlcluster $started_pg $CHAOS_PG_CLUSTER stop"
    fi
}

private_servers() {
    step "private servers: Postgres cluster $CHAOS_PG_CLUSTER on $CHAOS_PG_PORT, RabbitMQ $CHAOS_NODE on $CHAOS_AMQP_PORT"
    local version
    version=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -n | tail -1)
    [[ -n $version ]] || die "no Postgres server installed (/usr/lib/postgresql/<version>)"
    trap stop_private_servers EXIT
    if [[ ! -d /etc/postgresql/$version/$CHAOS_PG_CLUSTER ]]; then
        as_root pg_createcluster "$version" "$CHAOS_PG_CLUSTER" --port "$CHAOS_PG_PORT" \
            -o max_connections=300 -- --auth=trust >/dev/null ||
            die "pg_createcluster $version $CHAOS_PG_CLUSTER failed"
    fi
    if ! pg_isready -q -h 127.0.0.1 -p "$CHAOS_PG_PORT"; then
        as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$CHAOS_PG_CLUSTER" start ||
            die "pg_ctlcluster $version $CHAOS_PG_CLUSTER start failed"
        started_pg=$version
    fi
    wait_for "Postgres $CHAOS_PG_CLUSTER" pg_isready -q -h 127.0.0.1 -p "$CHAOS_PG_PORT" ||
        die "Postgres cluster $CHAOS_PG_CLUSTER does not answer on $CHAOS_PG_PORT"

    if ! amqp10_ready "$CHAOS_AMQP_PORT"; then
        as_root mkdir -p "$CHAOS_RMQ_DIR/mnesia" "$CHAOS_RMQ_DIR/log"
        printf '[rabbitmq_amqp1_0,rabbitmq_consistent_hash_exchange].\n' |
            as_root tee "$CHAOS_RMQ_DIR/enabled_plugins" >/dev/null
        printf 'listeners.tcp.local = 127.0.0.1:%s\nloopback_users = none\n' "$CHAOS_AMQP_PORT" |
            as_root tee "$CHAOS_RMQ_DIR/rabbitmq.conf" >/dev/null
        as_root chown -R rabbitmq:rabbitmq "$CHAOS_RMQ_DIR" 2>/dev/null || true
        (cd /tmp && as_root env RABBITMQ_NODENAME="$CHAOS_NODE" RABBITMQ_NODE_PORT="$CHAOS_AMQP_PORT" \
            RABBITMQ_DIST_PORT="$CHAOS_DIST_PORT" RABBITMQ_CONFIG_FILE="$CHAOS_RMQ_DIR/rabbitmq.conf" \
            RABBITMQ_MNESIA_BASE="$CHAOS_RMQ_DIR/mnesia" RABBITMQ_LOG_BASE="$CHAOS_RMQ_DIR/log" \
            RABBITMQ_PID_FILE="$CHAOS_RMQ_DIR/pid" \
            RABBITMQ_ENABLED_PLUGINS_FILE="$CHAOS_RMQ_DIR/enabled_plugins" \
            rabbitmq-server -detached) || die "rabbitmq-server -detached ($CHAOS_NODE) failed"
        started_rmq=1
        wait_for "AMQP 1.0 on $CHAOS_AMQP_PORT" amqp10_ready "$CHAOS_AMQP_PORT" ||
            die "RabbitMQ $CHAOS_NODE does not speak AMQP 1.0 on $CHAOS_AMQP_PORT (log: $CHAOS_RMQ_DIR/log)"
    fi
    export WHIZBANG_DATABASE_URL="postgres://postgres@127.0.0.1:$CHAOS_PG_PORT/postgres"
    export WHIZBANG_AMQP_URL="amqp://guest:guest@127.0.0.1:$CHAOS_AMQP_PORT"
    export WHIZBANG_CHAOS_PG_CLUSTER="$CHAOS_PG_CLUSTER" WHIZBANG_RABBITMQ_NODE="$CHAOS_NODE"
}

if [[ ${CHAOS_SHARED_SERVERS:-} == 1 ]]; then
    ensure_servers
    export WHIZBANG_DATABASE_URL="$WHIZBANG_TEST_DATABASE_URL" WHIZBANG_AMQP_URL="$WHIZBANG_TEST_AMQP_URL"
else
    ensure_packages
    private_servers
fi

# Results of an earlier run must not pass for this one's.
target_dir="${CARGO_TARGET_DIR:-target}"
rm -f "$target_dir"/chaos/{results,pg-restart,broker-restart}.json

step "cargo build --release --bin whizbang-chaos --bin whizbang"
cargo build --release --bin whizbang-chaos --bin whizbang || die "building the chaos tool failed"
chaos="$target_dir/release/whizbang-chaos"

step "whizbang-chaos run $*"
"$chaos" run "$@" || die "the chaos run failed (see above)"

step "whizbang-chaos pg-restart"
"$chaos" pg-restart || die "the Postgres-restart scenario failed (see above)"

step "whizbang-chaos broker-restart"
"$chaos" broker-restart || die "the broker-restart scenario failed (see above)"
