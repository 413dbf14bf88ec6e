#!/usr/bin/env bash
# The Postgres server's instructions per stored event: wb_process_work_batch beside the bench's
# raw INSERT of the same rows, counted by callgrind in a single-user Postgres. Repeatable where
# the machine's timings are not (two runs of the same schema agree to within ~40 instructions
# in 3.4 billion), so a change to schema/ can be judged on a noisy machine.
#
#   tools/perf/callgrind-work-batch.sh [SCHEMA_DIR]     (default: schema/ of this checkout)
#
# Workload, one transaction per batch: batches of 1,000 one-event units over 4,000 streams (the
# store bench's shape), each unit appending its event and an outbox row claimed by the writer,
# and each batch completing the previous batch's outbox rows (as a writer's publisher reports
# them). The raw side inserts the same event and outbox rows with the bench's raw statement.
# Run for 10 and for 20 batches; the difference over 10,000 events is the figure, so start-up
# and catalog loading cancel out. The driver's own array building counts on both sides (it
# stands in for the wire protocol's parameter decoding); the server's fsync does not count.
#
# Needs: root (it runs Postgres as the postgres user), the PostgreSQL 15 server binaries,
# valgrind, python3. Takes about four minutes. Leaves nothing behind but its temp directory,
# which it removes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
schema_dir=$(readlink -f "${1:-schema}")
pgbin=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}
work=$(mktemp -d /tmp/wb-callgrind.XXXXXX)
chown postgres: "$work"
trap 'runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/data" stop -m fast >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
as_pg() { runuser -u postgres -- "$@"; }

# A cluster with the schema applied twice: `st` for the store, `rw` for the raw baseline.
as_pg "$pgbin/initdb" -D "$work/data" -A trust -U postgres >/dev/null
cat >>"$work/data/postgresql.conf" <<EOF
port = 5497
listen_addresses = ''
unix_socket_directories = '$work'
autovacuum = off
jit = off
shared_buffers = 256MB
checkpoint_timeout = 1d
max_wal_size = 10GB
EOF
as_pg "$pgbin/pg_ctl" -D "$work/data" -l "$work/server.log" start -w >/dev/null
for s in st rw; do
    as_pg "$pgbin/psql" -h "$work" -p 5497 -qc "CREATE SCHEMA $s"
    # The baseline, then the functions, as the runtime's migration applies them.
    for f in "$schema_dir"/[0-9]*.sql "$schema_dir"/functions/{partition_of,leases,claims,one_message,work_batch}.sql; do
        sed "s/{{schema}}/$s/g" "$f" | as_pg "$pgbin/psql" -h "$work" -p 5497 -q -v ON_ERROR_STOP=1 >/dev/null
    done
done
as_pg "$pgbin/pg_ctl" -D "$work/data" stop -m fast >/dev/null
cp -a "$work/data" "$work/clean"

function=wb_process_work_batch

# The driver: one DO block (one transaction) per batch, for postgres --single -j (a statement
# ends at a semicolon followed by a blank line, so the blocks hold no blank line).
driver() { # MODE BATCHES
    python3 - "$1" "$2" "$function" <<'PY'
import sys
mode, batches, function, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], 1000
schema = 'st' if mode == 'store' else 'rw'
meta, payload = r"'\x929080'::bytea", r"'\x92a874702d31323334cd0102'::bytea"
print(f"""CREATE TABLE public.reports (r_id uuid[], r_part int[], r_gen bigint[]);

INSERT INTO public.reports VALUES ('{{}}', '{{}}', '{{}}');

INSERT INTO {schema}.wb_instances (instance_id, service, host)
VALUES ('00000000-0000-0000-0000-000000000001', 'callgrind', 'callgrind');
""")
for b in range(batches):
    rows = f"""    SELECT array_agg(md5('m' || b || '-' || i)::uuid ORDER BY i) AS id,
           array_agg('tp-' || ((b * n + i) % 4000) ORDER BY i) AS st,
           array_agg(abs(hashtext('tp-' || ((b * n + i) % 4000))) % 10000 ORDER BY i) AS part,
           array_agg(md5('c' || b || '-' || i)::uuid ORDER BY i) AS corr,
           array_agg((1700000000000000 + b * n + i)::bigint ORDER BY i) AS ts,
           array_agg(i ORDER BY i) AS unit,
           array_agg((i + 1)::bigint ORDER BY i) AS apos
      INTO a FROM generate_series(0, n - 1) i;"""
    if mode == 'store':
        work = f"""    SELECT * INTO r FROM public.reports;
    FOR rec IN
      WITH srt AS (SELECT s, row_number() OVER (ORDER BY s COLLATE "C") AS k FROM unnest(a.st) s)
      SELECT * FROM st.{function}(
        inst, 300::double precision, 10000, 10, 100::bigint, 60000::bigint,
        array_fill('o'::text, ARRAY[cardinality(r.r_id)]), array_fill('done'::text, ARRAY[cardinality(r.r_id)]),
        r.r_id, r.r_part, r.r_gen, array_fill(NULL::text, ARRAY[cardinality(r.r_id)]),
        array_fill(true, ARRAY[n]),
        '{{}}'::int[], '{{}}'::text[], '{{}}'::bigint[],
        a.unit, a.id, array_fill('event'::text, ARRAY[n]), a.st, a.part,
        a.corr, array_fill(NULL::uuid, ARRAY[n]), array_fill('BenchRecorded'::text, ARRAY[n]), a.ts,
        array_fill({meta}, ARRAY[n]), array_fill({payload}, ARRAY[n]),
        array_fill(true, ARRAY[n]), array_fill('bench'::text, ARRAY[n]), array_fill(false, ARRAY[n]),
        '{{}}'::int[], '{{}}'::uuid[], '{{}}'::int[], '{{}}'::bigint[],
        0, 0, NULL::uuid[], NULL::uuid[],
        (SELECT array_agg(s ORDER BY k) FROM srt), array_fill(1::bigint, ARRAY[n]),
        (SELECT array_agg(srt.k::int ORDER BY x.o) FROM unnest(a.st) WITH ORDINALITY x(s, o) JOIN srt ON srt.s = x.s),
        array_fill(0::bigint, ARRAY[n]), a.apos)
    LOOP
      IF rec.kind = 'wclaim_o' THEN
        nr_id := nr_id || rec.message_id; nr_part := nr_part || rec.partition; nr_gen := nr_gen || rec.generation;
      ELSIF rec.kind = 'wclaims_o' AND octet_length(rec.payload) = 20 + 20 * n THEN
        -- Packed answer: all n rows claimed, every lease at its first generation (this run
        -- leases each partition once); decoding the arrays in plpgsql would cost more than
        -- the runtime's decoding does.
        nr_id := a.id; nr_part := a.part; nr_gen := array_fill(1::bigint, ARRAY[n]);
      ELSIF rec.kind NOT IN ('appended', 'appended_v') THEN
        RAISE EXCEPTION 'unexpected answer row % (% bytes)', rec.kind, octet_length(rec.payload);
      END IF;
    END LOOP;
    IF cardinality(nr_id) <> n THEN RAISE EXCEPTION 'batch % claimed % rows', b, cardinality(nr_id); END IF;
    UPDATE public.reports SET r_id = nr_id, r_part = nr_part, r_gen = nr_gen;"""
    else:
        work = f"""    WITH e AS (
      INSERT INTO rw.wb_events (position, stream_id, version, message_id, correlation_id,
             causation_id, message_type, timestamp_us, meta, payload)
      SELECT b * n + o, s, 1 + b / 4, id, c, NULL, 'BenchRecorded', t, {meta}, {payload}
        FROM unnest(a.id, a.st, a.corr, a.ts) WITH ORDINALITY AS x(id, s, c, t, o))
    INSERT INTO rw.wb_outbox (message_id, message_kind, stream_id, partition, topic,
           correlation_id, causation_id, message_type, timestamp_us, meta, payload)
    SELECT id, 'event', s, p, 'bench', c, NULL, 'BenchRecorded', t, {meta}, {payload}
      FROM unnest(a.id, a.st, a.part, a.corr, a.ts) AS x(id, s, p, c, t);"""
    print(f"""DO $$
DECLARE
  inst uuid := '00000000-0000-0000-0000-000000000001';
  n int := {n};
  b int := {b};
  r record;
  a record;
  rec record;
  nr_id uuid[] := '{{}}'; nr_part int[] := '{{}}'; nr_gen bigint[] := '{{}}';
BEGIN
{rows}
{work}
END $$;
""")
print(f"SELECT count(*) AS events FROM {schema}.wb_events;\n")
PY
}

count() { # MODE BATCHES -> instructions of the whole single-user run
    rm -rf "$work/data"
    cp -a "$work/clean" "$work/data"
    driver "$1" "$2" >"$work/driver.sql"
    as_pg valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" --dump-instr=no \
        "$pgbin/postgres" --single -j -D "$work/data" postgres <"$work/driver.sql" \
        >"$work/out.txt" 2>"$work/valgrind.txt"
    if grep -qE "ERROR|FATAL" "$work/out.txt"; then
        grep -E "ERROR|FATAL" "$work/out.txt" | head -3 >&2
        exit 1
    fi
    grep -q "events = \"$(($2 * 1000))\"" "$work/out.txt" || {
        echo "the $1 run did not store $(($2 * 1000)) events" >&2
        exit 1
    }
    awk '/^totals:/ {print $2}' "$work/cg.out"
}

per_event() { echo $(( ($(count "$1" 20) - $(count "$1" 10)) / 10000 )); }
store=$(per_event store)
raw=$(per_event raw)
echo "store_server_instructions_per_event: $store"
echo "raw_server_instructions_per_event: $raw"
echo "store_vs_raw_instructions: $(python3 -c "print(f'{$store / $raw:.2f}')")"
