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
# WHIZBANG_RABBITMQ_NODE names the broker node (rabbitmqctl -n; default: rabbitmqctl's own),
# e.g. the private node of scripts/chaos.sh.

set -euo pipefail

TOPOLOGY_TIMEOUT="${TOPOLOGY_TIMEOUT:-60}"
VHOST="${RABBITMQ_VHOST:-/}"

die() {
    printf 'amqp-topology.sh: %s\n' "$*" >&2
    exit 1
}

NODE_ARGS=()
if [[ -n ${WHIZBANG_RABBITMQ_NODE:-} ]]; then
    NODE_ARGS=(-n "$WHIZBANG_RABBITMQ_NODE")
fi
rmqctl() {
    if [[ $EUID -eq 0 ]]; then
        rabbitmqctl "${NODE_ARGS[@]+"${NODE_ARGS[@]}"}" "$@"
    elif command -v sudo >/dev/null; then
        sudo rabbitmqctl "${NODE_ARGS[@]+"${NODE_ARGS[@]}"}" "$@"
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

exchanges=()   # topic exchanges
queues=()      # "exchange queue" pairs: plain subscription queues, bound with #
sharded=()     # "topic sub shards" triples
for spec in "${specs[@]}"; do
    topic=${spec%%:*}
    subs=""
    [[ $spec == *:* ]] && subs=${spec#*:}
    name_ok "$topic" || die "bad topic name in '$spec'"
    exchanges+=("$topic")
    IFS=',' read -r -a sub_list <<<"$subs"
    for sub in "${sub_list[@]}"; do
        [[ -z $sub ]] && continue
        shards=0
        if [[ $sub == */* ]]; then
            shards=${sub#*/}
            sub=${sub%%/*}
            [[ $shards =~ ^[1-9][0-9]{0,3}$ ]] || die "bad shard count in '$spec' (1 to 9999)"
        fi
        name_ok "$sub" || die "bad subscription name '$sub' in '$spec'"
        if ((shards)); then
            sharded+=("$topic $sub $shards")
        else
            queues+=("$topic $topic.$sub")
        fi
    done
done

# Every subscription queue (plain or shard) with the dead-letter exchange its policy names.
all_queues=()  # "queue dead-letter-name" pairs
for pair in "${queues[@]+"${queues[@]}"}"; do
    all_queues+=("${pair#* } ${pair#* }.dead")
done
for triple in "${sharded[@]+"${sharded[@]}"}"; do
    read -r topic sub shards <<<"$triple"
    for ((i = 0; i < shards; i++)); do
        all_queues+=("$topic.$sub.$i $topic.$sub.dead")
    done
done

if ((delete)); then
    # One Erlang call for everything (each rabbitmqctl start costs about a second).
    terms=()
    del_queue() {
        terms+=("rabbit_amqqueue:with(rabbit_misc:r(<<\"$VHOST\">>, queue, <<\"$1\">>), fun(Q) -> rabbit_amqqueue:delete(Q, false, false, <<\"whizbang\">>) end, fun(_) -> ok end)")
    }
    del_exchange() {
        terms+=("rabbit_exchange:delete(rabbit_misc:r(<<\"$VHOST\">>, exchange, <<\"$1\">>), false, <<\"whizbang\">>)")
    }
    del_policy() {
        terms+=("rabbit_policy:delete(<<\"$VHOST\">>, <<\"$1\">>, <<\"whizbang\">>)")
    }
    for pair in "${queues[@]+"${queues[@]}"}"; do
        q=${pair#* }
        del_queue "$q"
        del_queue "$q.dead"
        del_exchange "$q.dead"
        del_policy "whizbang-dead-letter-$q"
    done
    for triple in "${sharded[@]+"${sharded[@]}"}"; do
        read -r topic sub shards <<<"$triple"
        for ((i = 0; i < shards; i++)); do
            del_queue "$topic.$sub.$i"
        done
        del_queue "$topic.$sub.dead"
        del_exchange "$topic.$sub.dead"
        del_exchange "$topic.$sub"
        del_policy "whizbang-dead-letter-$topic.$sub"
    done
    for x in "${exchanges[@]}"; do
        del_exchange "$x"
    done
    joined=$(printf '%s, ' "${terms[@]}")
    rmqctl eval "[${joined%, }]." >/dev/null || die "deleting ${specs[*]} failed"
    exit 0
fi

json_list() { # joins its arguments with commas
    local IFS=,
    printf '%s' "$*"
}
exchange_json() { # NAME TYPE ARGUMENTS-JSON
    printf '{"name":"%s","vhost":"%s","type":"%s","durable":true,"auto_delete":false,"internal":false,"arguments":%s}' \
        "$1" "$VHOST" "$2" "$3"
}
queue_json() { # NAME ARGUMENTS-JSON
    printf '{"name":"%s","vhost":"%s","durable":true,"auto_delete":false,"arguments":%s}' "$1" "$VHOST" "$2"
}
binding_json() { # SOURCE DESTINATION DESTINATION-TYPE ROUTING-KEY
    printf '{"source":"%s","vhost":"%s","destination":"%s","destination_type":"%s","routing_key":"%s","arguments":{}}' \
        "$1" "$VHOST" "$2" "$3" "$4"
}
policy_json() { # NAME QUEUE-PATTERN DEAD-LETTER-EXCHANGE
    printf '{"vhost":"%s","name":"%s","pattern":"%s","apply-to":"queues","priority":0,"definition":{"dead-letter-exchange":"%s"}}' \
        "$VHOST" "$1" "$2" "$3"
}
ex_json=()
for x in "${exchanges[@]}"; do
    ex_json+=("$(exchange_json "$x" topic '{}')")
done
q_json=()
b_json=()
p_json=()
dead_letter() { # NAME QUEUE-PATTERN: the fanout exchange and queue NAME, and the policy
    ex_json+=("$(exchange_json "$1" fanout '{}')")
    q_json+=("$(queue_json "$1" '{}')")
    b_json+=("$(binding_json "$1" "$1" queue '')")
    p_json+=("$(policy_json "whizbang-dead-letter-${1%.dead}" "$2" "$1")")
}
quote_re() { sed 's/[.]/\\\\./g' <<<"$1"; } # a name as a regex literal, escaped for JSON
for pair in "${queues[@]+"${queues[@]}"}"; do
    x=${pair% *}
    q=${pair#* }
    q_json+=("$(queue_json "$q" '{}')")
    b_json+=("$(binding_json "$x" "$q" queue '#')")
    dead_letter "$q.dead" "^$(quote_re "$q")\$"
done
for triple in "${sharded[@]+"${sharded[@]}"}"; do
    read -r topic sub shards <<<"$triple"
    # The hash exchange picks a shard from the message annotations section, which whizbang
    # fills with the stream id alone (x-opt-partition-key): one stream, one shard.
    ex_json+=("$(exchange_json "$topic.$sub" x-consistent-hash '{"hash-header":"x-amqp-1.0-message-annotations"}')")
    b_json+=("$(binding_json "$topic" "$topic.$sub" exchange '#')")
    for ((i = 0; i < shards; i++)); do
        q_json+=("$(queue_json "$topic.$sub.$i" '{"x-single-active-consumer":true}')")
        b_json+=("$(binding_json "$topic.$sub" "$topic.$sub.$i" queue 1)")
    done
    dead_letter "$topic.$sub.dead" "^$(quote_re "$topic.$sub")\\\\.[0-9]+\$"
done

defs=$(mktemp /tmp/whizbang-topology.XXXXXX.json)
trap 'rm -f "$defs"' EXIT
printf '{"exchanges":[%s],"queues":[%s],"bindings":[%s],"policies":[%s]}\n' \
    "$(json_list "${ex_json[@]}")" "$(json_list "${q_json[@]+"${q_json[@]}"}")" \
    "$(json_list "${b_json[@]+"${b_json[@]}"}")" "$(json_list "${p_json[@]+"${p_json[@]}"}")" >"$defs"
chmod 644 "$defs" # rabbitmqctl reads it as the rabbitmq user
# Retried until the deadline: the broker may be (re)starting its application.
deadline=$((SECONDS + TOPOLOGY_TIMEOUT))
until import_out=$(rmqctl import_definitions "$defs" 2>&1); do
    ((SECONDS < deadline)) || die "import_definitions failed: $import_out"
    sleep 0.5
done

# The import is asynchronous: wait until every exchange, queue, binding and policy is listed.
missing() {
    local have_x have_q have_b have_p
    have_x=$(rmqctl list_exchanges -p "$VHOST" --quiet --no-table-headers name 2>/dev/null) || return 0
    have_q=$(rmqctl list_queues -p "$VHOST" --quiet --no-table-headers name 2>/dev/null) || return 0
    have_b=$(rmqctl list_bindings -p "$VHOST" --quiet --no-table-headers source_name destination_name routing_key 2>/dev/null) || return 0
    have_p=$(rmqctl list_policies -p "$VHOST" --quiet --no-table-headers 2>/dev/null | cut -f2) || return 0
    local x pair dead triple topic sub shards i
    for x in "${exchanges[@]}"; do
        grep -qxF "$x" <<<"$have_x" || return 0
    done
    for pair in "${all_queues[@]+"${all_queues[@]}"}"; do
        grep -qxF "${pair% *}" <<<"$have_q" || return 0
        grep -qxF "${pair#* }" <<<"$have_q" || return 0
        grep -qxF "${pair#* }" <<<"$have_x" || return 0
        dead=${pair#* }
        grep -qxF "whizbang-dead-letter-${dead%.dead}" <<<"$have_p" || return 0
    done
    for pair in "${queues[@]+"${queues[@]}"}"; do
        grep -qP "^\Q${pair% *}\E\t\Q${pair#* }\E\t#$" <<<"$have_b" || return 0
    done
    for triple in "${sharded[@]+"${sharded[@]}"}"; do
        read -r topic sub shards <<<"$triple"
        grep -qxF "$topic.$sub" <<<"$have_x" || return 0
        grep -qP "^\Q$topic\E\t\Q$topic.$sub\E\t#$" <<<"$have_b" || return 0
        for ((i = 0; i < shards; i++)); do
            grep -qP "^\Q$topic.$sub\E\t\Q$topic.$sub.$i\E\t1$" <<<"$have_b" || return 0
        done
    done
    return 1
}
while missing; do
    ((SECONDS < deadline)) || die "topology ${specs[*]} not present after ${TOPOLOGY_TIMEOUT}s"
    sleep 0.2
done
printf 'amqp-topology.sh: declared %s\n' "${specs[*]}"
