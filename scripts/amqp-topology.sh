#!/usr/bin/env bash
# Declares (or deletes) the RabbitMQ topology whizbang's AMQP transport expects, for the
# RabbitMQ flavour of [transport.amqp] (the default address templates):
#
#   topic T           -> durable topic exchange T          (sent to as /exchange/T)
#   subscription S    -> durable queue T.S bound to T with # (received from as /amq/queue/T.S)
#
# Usage:
#   scripts/amqp-topology.sh [TOPIC:SUB[,SUB...]]...            declare, then wait until present
#   scripts/amqp-topology.sh --delete TOPIC:SUB[,SUB...]...     delete queues and exchanges
#
# With no TOPIC argument it declares the topology of the examples and the default configs:
# orders:inventory. Tests declare their own per-test topics the same way, so they run in
# parallel without sharing queues.
#
# Declaring is idempotent: `rabbitmqctl import_definitions` of a generated JSON file. The import
# is asynchronous, so the script then polls list_exchanges / list_queues / list_bindings until
# everything is there (deadline TOPOLOGY_TIMEOUT seconds, default 60) and fails otherwise.
# Needs root (or sudo) for rabbitmqctl. Names: letters, digits, '.', '_' and '-'.

set -euo pipefail

TOPOLOGY_TIMEOUT="${TOPOLOGY_TIMEOUT:-60}"
VHOST="${RABBITMQ_VHOST:-/}"

die() {
    printf 'amqp-topology.sh: %s\n' "$*" >&2
    exit 1
}

rmqctl() {
    if [[ $EUID -eq 0 ]]; then
        rabbitmqctl "$@"
    elif command -v sudo >/dev/null; then
        sudo rabbitmqctl "$@"
    else
        die "need root (or sudo) to run rabbitmqctl"
    fi
}

delete=0
if [[ ${1:-} == --delete ]]; then
    delete=1
    shift
    (($#)) || die "--delete needs TOPIC:SUB arguments"
fi
specs=("$@")
((${#specs[@]})) || specs=(orders:inventory)

name_ok() { [[ $1 =~ ^[A-Za-z0-9._-]+$ ]]; }

exchanges=()
queues=()   # "exchange queue" pairs
for spec in "${specs[@]}"; do
    topic=${spec%%:*}
    subs=""
    [[ $spec == *:* ]] && subs=${spec#*:}
    name_ok "$topic" || die "bad topic name in '$spec'"
    exchanges+=("$topic")
    IFS=',' read -r -a sub_list <<<"$subs"
    for sub in "${sub_list[@]}"; do
        [[ -z $sub ]] && continue
        name_ok "$sub" || die "bad subscription name '$sub' in '$spec'"
        queues+=("$topic $topic.$sub")
    done
done

if ((delete)); then
    # One Erlang call for everything (each rabbitmqctl start costs about a second).
    terms=()
    for pair in "${queues[@]}"; do
        q=${pair#* }
        terms+=("rabbit_amqqueue:with(rabbit_misc:r(<<\"$VHOST\">>, queue, <<\"$q\">>), fun(Q) -> rabbit_amqqueue:delete(Q, false, false, <<\"whizbang\">>) end, fun(_) -> ok end)")
    done
    for x in "${exchanges[@]}"; do
        terms+=("rabbit_exchange:delete(rabbit_misc:r(<<\"$VHOST\">>, exchange, <<\"$x\">>), false, <<\"whizbang\">>)")
    done
    joined=$(printf '%s, ' "${terms[@]}")
    rmqctl eval "[${joined%, }]." >/dev/null || die "deleting ${specs[*]} failed"
    exit 0
fi

json_list() { # joins its arguments with commas
    local IFS=,
    printf '%s' "$*"
}
ex_json=()
for x in "${exchanges[@]}"; do
    ex_json+=("{\"name\":\"$x\",\"vhost\":\"$VHOST\",\"type\":\"topic\",\"durable\":true,\"auto_delete\":false,\"internal\":false,\"arguments\":{}}")
done
q_json=()
b_json=()
for pair in "${queues[@]}"; do
    x=${pair% *}
    q=${pair#* }
    q_json+=("{\"name\":\"$q\",\"vhost\":\"$VHOST\",\"durable\":true,\"auto_delete\":false,\"arguments\":{}}")
    b_json+=("{\"source\":\"$x\",\"vhost\":\"$VHOST\",\"destination\":\"$q\",\"destination_type\":\"queue\",\"routing_key\":\"#\",\"arguments\":{}}")
done

defs=$(mktemp /tmp/whizbang-topology.XXXXXX.json)
trap 'rm -f "$defs"' EXIT
printf '{"exchanges":[%s],"queues":[%s],"bindings":[%s]}\n' \
    "$(json_list "${ex_json[@]}")" "$(json_list "${q_json[@]+"${q_json[@]}"}")" \
    "$(json_list "${b_json[@]+"${b_json[@]}"}")" >"$defs"
chmod 644 "$defs" # rabbitmqctl reads it as the rabbitmq user
# Retried until the deadline: the broker may be (re)starting its application.
deadline=$((SECONDS + TOPOLOGY_TIMEOUT))
until import_out=$(rmqctl import_definitions "$defs" 2>&1); do
    ((SECONDS < deadline)) || die "import_definitions failed: $import_out"
    sleep 0.5
done

# The import is asynchronous: wait until every exchange, queue and binding is listed.
missing() {
    local have_x have_q have_b
    have_x=$(rmqctl list_exchanges -p "$VHOST" --quiet --no-table-headers name 2>/dev/null) || return 0
    have_q=$(rmqctl list_queues -p "$VHOST" --quiet --no-table-headers name 2>/dev/null) || return 0
    have_b=$(rmqctl list_bindings -p "$VHOST" --quiet --no-table-headers source_name destination_name routing_key 2>/dev/null) || return 0
    local x pair
    for x in "${exchanges[@]}"; do
        grep -qxF "$x" <<<"$have_x" || return 0
    done
    for pair in "${queues[@]}"; do
        grep -qxF "${pair#* }" <<<"$have_q" || return 0
        grep -qP "^\Q${pair% *}\E\t\Q${pair#* }\E\t#$" <<<"$have_b" || return 0
    done
    return 1
}
while missing; do
    ((SECONDS < deadline)) || die "topology ${specs[*]} not present after ${TOPOLOGY_TIMEOUT}s"
    sleep 0.2
done
printf 'amqp-topology.sh: declared %s\n' "${specs[*]}"
