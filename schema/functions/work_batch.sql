-- whizbang: the work batch. One call is one statement: one round trip, one transaction, for
-- everything an instance has to say (reports of finished, failed and released rows; units of
-- work with expected versions, events, outbox and inbox rows; inbox rows a unit completes) and
-- everything it asks for (claims of pending rows). The arguments are parallel arrays read
-- through unnest (no JSON parsing); the answer is wb_batch_row rows (see 0001_baseline.sql).
--
-- Why it is written as it is:
-- - Generic plans (plan_cache_mode = force_generic_plan): every statement is planned once per
--   connection instead of on every call, which for a small batch is most of its cost.
-- - enable_seqscan = off: a generic plan is made again whenever a table it reads changes in
--   pg_class, and a VACUUM of a drained wb_outbox or wb_inbox truncates it to zero pages. The
--   planner then believes the table empty and plans a sequential scan for each per-row probe
--   (the order probe of the writer's inserts above all), and keeps that plan while the table
--   fills up again under load, so every inserted row reads every queued row: a batch of 1,000
--   events behind 1,000 queued rows took ten times as long. With autovacuum on this happens
--   whenever a queue drains. Every statement is meant to go through an index; where none
--   applies the planner still picks the cheapest path it has. Every function of the schema
--   has the same setting.
-- - jit = off: JIT's cost is paid on every call of a generic plan estimated expensive, never
--   repaid by statements that touch a few hundred rows.
-- - Leases are looked up by primary key, row by row, in scalar subqueries the planner cannot
--   turn into joins: a generic plan made while the tables were new and unanalysed joined every
--   row against all of the instance's leases.
-- - The lease fence: a batch that writes rows claimed for the writer takes the instance's
--   advisory lock (wb_instance_key) in shared mode before any row lock, so nothing gives up
--   the instance's partitions while its rows are still invisible (see leases.sql).
-- - Stream versions: one upsert per stream, adding the batch's appends. Only a batch with
--   expected versions locks its streams first (they are checked before anything is written);
--   a unit whose expectation fails comes back as 'conflict' and writes nothing, the rest
--   commits. Every statement that locks stream rows sorts by bytes (COLLATE "C"), so every
--   path takes them in one order whatever the database's collation.
-- - The events are appended last, after the queue rows and the claims: the position counter
--   row, whose lock serialises every appending batch until it commits, is held for the insert
--   and the commit only.
--
-- The caller numbers the batch. It holds the batch in order, so it sends what numbering the
-- appends by sorts and window functions here would compute (see the Rust `Numbering`): each
-- appended stream once with its count of appends, in byte order (the order its rows are locked
-- in), in s_stream / s_count; and per message (0 where it is not appended) its stream's place
-- in s_stream (m_sidx), how many appends of its stream follow it in the batch (m_vback), and
-- its place among the batch's appends (m_apos). The upsert hands back each stream's new
-- version in s_stream's order; a message's version is its stream's new version less m_vback,
-- its position the batch's last position less the appends plus m_apos. When a unit conflicted
-- (its appends do not count) or the upsert's answer is not in the order asked, the batch is
-- numbered here instead.
--
-- Idempotency records (k_ arrays, at most one per unit; see 0003_idempotency.sql) are written
-- first; a unit whose key is already recorded comes back as a 'taken' row (unit, the key in
-- stream_id), a kind wb_batch_row's comment in 0001_baseline.sql predates.
--
-- The packed answer: the common cases come back in one row each instead of one row per item.
-- - 'appended_v' (the caller's numbering was used, i.e. no unit conflicted): `position` is the
--   batch's last position and `payload` each appended stream's new version in s_stream's
--   order, as a binary bigint[] (array_send); the caller derives every event's version and
--   position as above. A batch with a conflict gets one 'appended' row per event.
-- - 'wclaims_o': `payload` holds the ids of the outbox rows claimed for the writer and `meta`
--   their generations, as binary uuid[] and bigint[]; each row's partition is the caller's
--   m_part. Inbox claims ('wclaim_i') stay one row each.
CREATE OR REPLACE FUNCTION {{schema}}.wb_process_work_batch(
    p_instance uuid,
    p_lease_s double precision,
    p_max_partitions integer,
    p_max_attempts integer,
    p_backoff_base_ms bigint,
    p_backoff_max_ms bigint,
    -- reports: queue 'o' | 'i'; op 'done' | 'fail' | 'transient' | 'release'
    r_queue text[], r_op text[], r_id uuid[], r_part integer[], r_gen bigint[], r_error text[],
    -- units: claim-for-writer flag per unit (unit n is element n + 1)
    u_claim boolean[],
    -- expectations: unit, stream, expected version (0 = no stream)
    x_unit integer[], x_stream text[], x_expected bigint[],
    -- messages of the units, in order: append to the event store, outbox topic, inbox
    m_unit integer[], m_id uuid[], m_kind text[], m_stream text[], m_part integer[],
    m_corr uuid[], m_cause uuid[], m_type text[], m_ts bigint[], m_meta bytea[], m_payload bytea[],
    m_append boolean[], m_topic text[], m_inbox boolean[],
    -- inbox rows completed by their unit
    c_unit integer[], c_id uuid[], c_part integer[], c_gen bigint[],
    p_claim_outbox integer, p_claim_inbox integer,
    -- NULL, or the rows this instance really has in flight, per queue (see WorkBatch::in_flight)
    p_in_flight_outbox uuid[], p_in_flight_inbox uuid[],
    -- the caller's numbering (see the top of this file): appended streams, distinct and in byte order,
    -- with their appends; per message (0 where not appended) its stream's place in s_stream,
    -- the appends of its stream after it, its place among the batch's appends
    s_stream text[], s_count bigint[], m_sidx integer[], m_vback bigint[], m_apos bigint[],
    -- idempotency records: unit, key, request hash, encoded outcome (at most one per unit)
    k_unit integer[], k_key text[], k_hash bytea[], k_outcome bytea[]
) RETURNS SETOF {{schema}}.wb_batch_row LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET jit = off SET enable_seqscan = off AS $$
DECLARE
    v_conflicts integer[] := '{}';
    v_actual bigint;
    v_count bigint;
    v_appends bigint := 0;
    v_last bigint;
    v_parts integer[];
    v_room integer;
    v_notify boolean := false;
    v_n integer;
    v_all_appended boolean;
    v_sv_stream text[];
    v_sv_version bigint[];
    v_numbered boolean := false;
    v_done uuid[];
    v_gen bigint[];
    v_claimed_id uuid[];
    v_claimed_gen bigint[];
    v_taken integer[] := '{}';
BEGIN
    -- The writer's new rows go into partitions it leases (below) without locking each lease
    -- row; this shared lock is what the heartbeat's exclusive one waits for before it gives up
    -- a partition that looks idle (see wb_acquire). Taken first, before any row lock: a batch
    -- waiting for it (behind a heartbeat) holds nothing the heartbeat could wait for.
    IF cardinality(m_id) > 0 AND true = ANY (u_claim) THEN
        PERFORM pg_advisory_xact_lock_shared({{schema}}.wb_instance_key(p_instance));
    END IF;

    ---------------------------------------------------------------- reports (fenced)
    IF cardinality(r_id) > 0 AND r_op <@ ARRAY['done'] AND r_queue <@ ARRAY['o'] THEN
    -- Published outbox rows only (what a writer's own publisher reports): one DELETE, fenced
    -- row by row; the reports it did not apply are looked for only when there are some.
    WITH done AS (
        -- The lease looked up by primary key, row by row (a scalar subquery): joined, the
        -- generic plan (made while the lease table was small) read all of the instance's
        -- leases into a hash on every call, whose cost grew with the partitions it holds.
        DELETE FROM {{schema}}.wb_outbox o
         USING unnest(r_id, r_part, r_gen) AS t(id, part, gen)
         WHERE o.message_id = t.id AND o.claimed_by = p_instance AND o.claimed_generation = t.gen
           AND (SELECT l.generation FROM {{schema}}.wb_partition_leases l
                 WHERE l.partition = t.part AND l.instance_id = p_instance) = t.gen
        RETURNING o.message_id
    )
    SELECT array_agg(done.message_id) INTO v_done FROM done;
    IF coalesce(cardinality(v_done), 0) < cardinality(r_id) THEN
        RETURN QUERY
        SELECT 'stale', NULL::integer, t.id, NULL::text, NULL::bigint, NULL::bigint, NULL::integer,
               NULL::bigint, NULL::integer, NULL::text, NULL::uuid, NULL::uuid, NULL::text, NULL::text,
               NULL::bigint, NULL::bytea, NULL::bytea
          FROM unnest(r_id) AS t(id)
         WHERE t.id NOT IN (SELECT unnest(coalesce(v_done, '{}')));
    END IF;
    ELSIF cardinality(r_id) > 0 AND r_op <@ ARRAY['done'] THEN
    -- Completions only (the common case): the failure and release statements are not run.
    RETURN QUERY
    WITH r AS (
        SELECT * FROM unnest(r_queue, r_id, r_part, r_gen) AS t(q, id, part, gen)
    ),
    fenced AS (
        SELECT r.* FROM r
         WHERE (SELECT l.generation FROM {{schema}}.wb_partition_leases l
                 WHERE l.partition = r.part AND l.instance_id = p_instance) = r.gen
    ),
    o_done AS (
        DELETE FROM {{schema}}.wb_outbox o USING fenced f
         WHERE f.q = 'o' AND o.message_id = f.id
           AND o.claimed_by = p_instance AND o.claimed_generation = f.gen
        RETURNING o.message_id
    ),
    i_done AS (
        DELETE FROM {{schema}}.wb_inbox i USING fenced f
         WHERE f.q = 'i' AND i.message_id = f.id
           AND i.claimed_by = p_instance AND i.claimed_generation = f.gen
        RETURNING i.message_id
    ),
    i_processed AS (
        UPDATE {{schema}}.wb_dedup d SET processed_at = now()
          FROM i_done WHERE d.message_id = i_done.message_id
        RETURNING d.message_id
    )
    SELECT 'stale', NULL::integer, r.id, NULL::text, NULL::bigint, NULL::bigint, NULL::integer,
           NULL::bigint, NULL::integer, NULL::text, NULL::uuid, NULL::uuid, NULL::text, NULL::text,
           NULL::bigint, NULL::bytea, NULL::bytea
      FROM r WHERE r.id NOT IN (SELECT message_id FROM o_done UNION ALL SELECT message_id FROM i_done);
    ELSIF cardinality(r_id) > 0 THEN
    RETURN QUERY
    WITH r AS (
        SELECT * FROM unnest(r_queue, r_op, r_id, r_part, r_gen, r_error) AS t(q, op, id, part, gen, err)
    ),
    fenced AS (
        SELECT r.* FROM r
         WHERE (SELECT l.generation FROM {{schema}}.wb_partition_leases l
                 WHERE l.partition = r.part AND l.instance_id = p_instance) = r.gen
    ),
    o_done AS (
        DELETE FROM {{schema}}.wb_outbox o USING fenced f
         WHERE f.q = 'o' AND f.op = 'done' AND o.message_id = f.id
           AND o.claimed_by = p_instance AND o.claimed_generation = f.gen
        RETURNING o.message_id
    ),
    i_done AS (
        DELETE FROM {{schema}}.wb_inbox i USING fenced f
         WHERE f.q = 'i' AND f.op = 'done' AND i.message_id = f.id
           AND i.claimed_by = p_instance AND i.claimed_generation = f.gen
        RETURNING i.message_id
    ),
    i_processed AS (
        UPDATE {{schema}}.wb_dedup d SET processed_at = now()
          FROM i_done WHERE d.message_id = i_done.message_id
        RETURNING d.message_id
    ),
    o_fail AS (
        UPDATE {{schema}}.wb_outbox o SET
               claimed_by = NULL, claimed_generation = NULL,
               attempts = o.attempts + (f.op = 'fail')::integer,
               last_error = f.err,
               dead = (f.op = 'fail' AND o.attempts + 1 >= p_max_attempts),
               next_attempt_at = CASE
                   WHEN f.op = 'fail' AND o.attempts + 1 >= p_max_attempts THEN NULL
                   WHEN f.op = 'transient' THEN now() + p_backoff_base_ms * interval '1 millisecond'
                   ELSE now() + least(p_backoff_max_ms, p_backoff_base_ms * (2::numeric ^ least(o.attempts, 40))::bigint)
                                * interval '1 millisecond' END
          FROM fenced f
         WHERE f.q = 'o' AND f.op IN ('fail', 'transient') AND o.message_id = f.id
           AND o.claimed_by = p_instance AND o.claimed_generation = f.gen
        RETURNING o.message_id, o.dead, o.next_attempt_at
    ),
    i_fail AS (
        UPDATE {{schema}}.wb_inbox i SET
               claimed_by = NULL, claimed_generation = NULL,
               attempts = i.attempts + (f.op = 'fail')::integer,
               last_error = f.err,
               dead = (f.op = 'fail' AND i.attempts + 1 >= p_max_attempts),
               next_attempt_at = CASE
                   WHEN f.op = 'fail' AND i.attempts + 1 >= p_max_attempts THEN NULL
                   WHEN f.op = 'transient' THEN now() + p_backoff_base_ms * interval '1 millisecond'
                   ELSE now() + least(p_backoff_max_ms, p_backoff_base_ms * (2::numeric ^ least(i.attempts, 40))::bigint)
                                * interval '1 millisecond' END
          FROM fenced f
         WHERE f.q = 'i' AND f.op IN ('fail', 'transient') AND i.message_id = f.id
           AND i.claimed_by = p_instance AND i.claimed_generation = f.gen
        RETURNING i.message_id, i.dead, i.next_attempt_at
    ),
    o_release AS (
        UPDATE {{schema}}.wb_outbox o SET claimed_by = NULL, claimed_generation = NULL
          FROM fenced f
         WHERE f.q = 'o' AND f.op = 'release' AND o.message_id = f.id
           AND o.claimed_by = p_instance AND o.claimed_generation = f.gen
        RETURNING o.message_id
    ),
    i_release AS (
        UPDATE {{schema}}.wb_inbox i SET claimed_by = NULL, claimed_generation = NULL
          FROM fenced f
         WHERE f.q = 'i' AND f.op = 'release' AND i.message_id = f.id
           AND i.claimed_by = p_instance AND i.claimed_generation = f.gen
        RETURNING i.message_id
    ),
    applied AS (
        SELECT message_id FROM o_done UNION ALL SELECT message_id FROM i_done
        UNION ALL SELECT message_id FROM o_fail UNION ALL SELECT message_id FROM i_fail
        UNION ALL SELECT message_id FROM o_release UNION ALL SELECT message_id FROM i_release
    )
    SELECT 'stale', NULL::integer, r.id, NULL::text, NULL::bigint, NULL::bigint, NULL::integer,
           NULL::bigint, NULL::integer, NULL::text, NULL::uuid, NULL::uuid, NULL::text, NULL::text,
           NULL::bigint, NULL::bytea, NULL::bytea
      FROM r WHERE r.id NOT IN (SELECT message_id FROM applied)
    UNION ALL
    SELECT 'dead', NULL, d.message_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
           NULL, NULL, NULL, NULL
      FROM (SELECT message_id, dead FROM o_fail UNION ALL SELECT message_id, dead FROM i_fail) d
     WHERE d.dead
    UNION ALL
    SELECT 'retry', NULL, NULL, NULL,
           ceil(extract(epoch FROM min(d.at) - now()) * 1000)::bigint,
           NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
      FROM (SELECT next_attempt_at AS at FROM o_fail UNION ALL SELECT next_attempt_at FROM i_fail) d
    HAVING min(d.at) IS NOT NULL;
    IF 'release' = ANY (r_op) THEN
        v_notify := true;
    END IF;
    END IF;

    ---------------------------------------------------------------- units
    IF cardinality(m_id) > 0 OR cardinality(x_unit) > 0 OR cardinality(c_id) > 0
       OR cardinality(k_unit) > 0 THEN
        -- Idempotency keys first, before any stream row is locked, in byte order (every batch
        -- takes keys, then streams, in one order: no deadlock between instances). A key already
        -- recorded, or taken by an earlier unit of this batch, refuses its unit ('taken', the
        -- key in stream_id): it joins the conflicts and writes nothing. The insert waits for a
        -- concurrent batch holding the same key, and sees its row once it commits. A unit that
        -- conflicts on a version below gives its key back.
        IF cardinality(k_unit) > 0 THEN
            WITH k AS (
                SELECT t.*, min(t.ord) OVER (PARTITION BY t.key) AS first_ord
                  FROM unnest(k_unit, k_key, k_hash, k_outcome)
                       WITH ORDINALITY AS t(u, key, hash, outcome, ord)
            ),
            ins AS (
                INSERT INTO {{schema}}.wb_idempotency (idempotency_key, request_hash, outcome, event_ids)
                SELECT k.key, k.hash, k.outcome,
                       ARRAY(SELECT m.id FROM unnest(m_unit, m_id, m_append) WITH ORDINALITY AS m(u, id, a, ord)
                              WHERE m.u = k.u AND m.a ORDER BY m.ord)
                  FROM k WHERE k.ord = k.first_ord
                 ORDER BY k.key COLLATE "C"
                    ON CONFLICT (idempotency_key) DO NOTHING
                RETURNING idempotency_key
            )
            SELECT coalesce(array_agg(k.u), '{}') INTO v_taken
              FROM k WHERE k.ord <> k.first_ord OR k.key NOT IN (SELECT idempotency_key FROM ins);
            IF cardinality(v_taken) > 0 THEN
                v_conflicts := v_conflicts || v_taken;
                RETURN QUERY SELECT 'taken', k.u, NULL::uuid, k.key, NULL::bigint, NULL::bigint,
                       NULL::integer, NULL::bigint, NULL::integer, NULL::text, NULL::uuid, NULL::uuid,
                       NULL::text, NULL::text, NULL::bigint, NULL::bytea, NULL::bytea
                  FROM unnest(k_unit, k_key) AS k(u, key) WHERE k.u = ANY (v_taken);
            END IF;
        END IF;

        -- With expectations: the stream rows exist and are locked in a fixed order (no deadlock
        -- between instances) before the versions are checked. Without: the upsert below locks.
        IF cardinality(x_unit) > 0 THEN
        INSERT INTO {{schema}}.wb_streams (stream_id, version)
        SELECT s, 0 FROM (
            SELECT DISTINCT s FROM unnest(m_stream, m_append) AS t(s, a) WHERE a
            UNION SELECT unnest(x_stream)) AS streams(s)
         ORDER BY s COLLATE "C"
            ON CONFLICT (stream_id) DO NOTHING;
        PERFORM 1 FROM {{schema}}.wb_streams
          WHERE stream_id IN (SELECT s FROM unnest(m_stream, m_append) AS t(s, a) WHERE a
                              UNION SELECT unnest(x_stream))
          ORDER BY stream_id COLLATE "C" FOR UPDATE;
        END IF;

        -- Expected versions, unit by unit, counting the appends of the earlier accepted units.
        FOR v_n IN 1 .. coalesce(cardinality(x_unit), 0) LOOP
            CONTINUE WHEN x_unit[v_n] = ANY (v_conflicts);
            SELECT s.version + (
                       SELECT count(*) FROM unnest(m_unit, m_stream, m_append) AS t(u, st, a)
                        WHERE a AND st = x_stream[v_n] AND u < x_unit[v_n]
                          AND NOT (u = ANY (v_conflicts)))
              INTO v_actual
              FROM {{schema}}.wb_streams s WHERE s.stream_id = x_stream[v_n];
            IF v_actual <> x_expected[v_n] THEN
                v_conflicts := v_conflicts || x_unit[v_n];
                RETURN QUERY SELECT 'conflict', x_unit[v_n], NULL::uuid, x_stream[v_n], x_expected[v_n],
                       v_actual, NULL::integer, NULL::bigint, NULL::integer, NULL::text, NULL::uuid,
                       NULL::uuid, NULL::text, NULL::text, NULL::bigint, NULL::bytea, NULL::bytea;
            END IF;
        END LOOP;
        -- The keys of units that conflicted on a version are given back (inserted above, in
        -- this transaction): the caller may run the command again with the same key.
        IF cardinality(k_unit) > 0 AND cardinality(v_conflicts) > cardinality(v_taken) THEN
            DELETE FROM {{schema}}.wb_idempotency
             WHERE idempotency_key IN (
                   SELECT k.key FROM unnest(k_unit, k_key) AS k(u, key)
                    WHERE k.u = ANY (v_conflicts) AND NOT (k.u = ANY (v_taken)));
        END IF;

        -- Inbox rows completed by their (accepted) unit.
        IF cardinality(c_id) > 0 THEN
        RETURN QUERY
        WITH c AS (
            SELECT * FROM unnest(c_unit, c_id, c_part, c_gen) AS t(u, id, part, gen)
             WHERE NOT (u = ANY (v_conflicts))
        ),
        done AS (
            DELETE FROM {{schema}}.wb_inbox i USING c
             WHERE i.message_id = c.id
               AND (SELECT l.generation FROM {{schema}}.wb_partition_leases l
                     WHERE l.partition = c.part AND l.instance_id = p_instance) = c.gen
               AND i.claimed_by = p_instance AND i.claimed_generation = c.gen
            RETURNING i.message_id
        ),
        processed AS (
            UPDATE {{schema}}.wb_dedup d SET processed_at = now()
              FROM done WHERE d.message_id = done.message_id RETURNING d.message_id
        )
        SELECT 'stale', NULL::integer, c.id, NULL::text, NULL::bigint, NULL::bigint, NULL::integer,
               NULL::bigint, NULL::integer, NULL::text, NULL::uuid, NULL::uuid, NULL::text, NULL::text,
               NULL::bigint, NULL::bytea, NULL::bytea
          FROM c WHERE c.id NOT IN (SELECT message_id FROM done);
        END IF;

        -- Stream versions: one upsert per stream, in a fixed order (no deadlock between
        -- instances), adding this batch's appends; it locks each row until commit. It runs before
        -- the queue rows are inserted, so rows of one stream written by two batches at once get
        -- their queue order (seq) in the same order as their versions. The events themselves are
        -- written last (below), so the position counter row is held as briefly as possible.
        -- Counted with array functions (a plpgsql simple expression, no query) unless a unit
        -- conflicted.
        IF cardinality(v_conflicts) = 0 THEN
            v_appends := coalesce(cardinality(array_positions(m_append, true)), 0);
        ELSE
            SELECT count(*) INTO v_appends
              FROM unnest(m_unit, m_append) AS t(u, a) WHERE a AND NOT (u = ANY (v_conflicts));
        END IF;
        -- Without a conflict, the caller's count per stream (in byte order) is the batch's;
        -- each stream's new version comes back in that order for the event insert.
        IF v_appends > 0 AND cardinality(v_conflicts) = 0 THEN
            WITH up AS (
                INSERT INTO {{schema}}.wb_streams AS s (stream_id, version)
                SELECT * FROM unnest(s_stream, s_count)
                    ON CONFLICT (stream_id) DO UPDATE SET version = s.version + excluded.version
                RETURNING s.stream_id, s.version
            )
            SELECT array_agg(up.stream_id), array_agg(up.version)
              INTO v_sv_stream, v_sv_version FROM up;
            -- RETURNING follows the rows inserted, in practice; if ever not, number as before.
            v_numbered := v_sv_stream = s_stream;
        ELSIF v_appends > 0 THEN
            INSERT INTO {{schema}}.wb_streams AS s (stream_id, version)
            SELECT t.stream, count(*)
              FROM unnest(m_unit, m_stream, m_append) AS t(u, stream, a)
             WHERE t.a AND NOT (t.u = ANY (v_conflicts))
             GROUP BY t.stream ORDER BY t.stream COLLATE "C"
                ON CONFLICT (stream_id) DO UPDATE SET version = s.version + excluded.version;
        END IF;

        -- Writer claims: the new rows' partitions are leased first, so a row is inserted
        -- already claimed (no second write), unless an older row of its stream is waiting.
        -- v_gen holds, per message (its place in the m_ arrays), the generation of this
        -- instance's lease on its partition where the writer is to claim it: -1 where it is not
        -- to be claimed, 0 where this instance holds no such lease. In the steady state each
        -- lease is this instance's with time to spare (one primary-key look-up per message,
        -- shared by the outbox and inbox inserts below), and wb_acquire is not called at all.
        v_gen := ARRAY(
            SELECT CASE WHEN u_claim[t.u + 1] AND NOT (t.u = ANY (v_conflicts))
                             AND (t.topic IS NOT NULL OR t.inbox)
                        THEN coalesce((SELECT l.generation FROM {{schema}}.wb_partition_leases l
                                        WHERE l.partition = t.part AND l.instance_id = p_instance
                                          AND l.expires_at >= now() + p_lease_s * interval '0.5 second'), 0)
                        ELSE -1 END
              FROM unnest(m_unit, m_part, m_topic, m_inbox) WITH ORDINALITY AS t(u, part, topic, inbox, ord)
             ORDER BY t.ord);
        IF 0 = ANY (v_gen) THEN
            v_parts := ARRAY(
                SELECT DISTINCT t.part FROM unnest(m_part, v_gen) AS t(part, gen) WHERE t.gen >= 0);
            PERFORM {{schema}}.wb_acquire(p_instance, v_parts, p_lease_s, p_max_partitions);
            -- After it, a lease of this instance's is used however long it has left (as the
            -- heartbeat renews it); 0 stays where another instance holds the partition.
            v_gen := ARRAY(
                SELECT CASE WHEN t.gen >= 0
                            THEN coalesce((SELECT l.generation FROM {{schema}}.wb_partition_leases l
                                            WHERE l.partition = t.part AND l.instance_id = p_instance), 0)
                            ELSE -1 END
                  FROM unnest(m_part, v_gen) WITH ORDINALITY AS t(part, gen, ord)
                 ORDER BY t.ord);
        END IF;

        -- Outbox rows.
        IF cardinality(v_conflicts) = 0 THEN
            v_count := coalesce(cardinality(m_topic), 0)
                     - coalesce(cardinality(array_positions(m_topic, NULL)), 0);
        ELSE
            SELECT count(*) INTO v_count FROM unnest(m_unit, m_topic) AS t(u, topic)
             WHERE topic IS NOT NULL AND NOT (u = ANY (v_conflicts));
        END IF;
        IF v_count > 0 THEN
            v_all_appended := NOT EXISTS (
                SELECT 1 FROM unnest(m_topic, m_append) AS t(topic, a) WHERE t.topic IS NOT NULL AND NOT t.a);
            -- Rows already in the table are older than this batch's: any of them not in flight
            -- here holds the stream back (h), and the row is inserted unclaimed. One statement
            -- each way, differing only in ON CONFLICT: a batch whose outbox rows are all
            -- appended messages skips ON CONFLICT's speculative insertion;
            -- their ids are unique in wb_events, whose insert (below) fails the batch on a
            -- repeated id anyway.
            IF v_all_appended THEN
            WITH ins AS (
                INSERT INTO {{schema}}.wb_outbox (message_id, message_kind, stream_id, partition, topic,
                       correlation_id, causation_id, message_type, timestamp_us, meta, payload,
                       claimed_by, claimed_generation)
                SELECT t.id, t.kind, t.stream, t.part, t.topic, t.corr, t.cause, t.typ, t.ts, t.meta, t.payload,
                       CASE WHEN h.held IS NULL AND v_gen[t.ord] > 0 THEN p_instance END,
                       CASE WHEN h.held IS NULL AND v_gen[t.ord] > 0 THEN v_gen[t.ord] END
                  FROM unnest(m_unit, m_id, m_kind, m_stream, m_part, m_topic, m_corr, m_cause, m_type,
                              m_ts, m_meta, m_payload)
                       WITH ORDINALITY AS t(u, id, kind, stream, part, topic, corr, cause, typ, ts, meta, payload, ord)
                  LEFT JOIN LATERAL (
                       SELECT true AS held FROM {{schema}}.wb_outbox e
                        WHERE e.stream_id = t.stream
                          AND (e.dead OR e.claimed_by IS DISTINCT FROM p_instance
                               OR e.claimed_generation IS DISTINCT FROM v_gen[t.ord])
                        LIMIT 1) h ON v_gen[t.ord] > 0
                 WHERE t.topic IS NOT NULL AND NOT (t.u = ANY (v_conflicts))
                 ORDER BY t.ord
                RETURNING message_id, claimed_by, claimed_generation
            )
            SELECT array_agg(ins.message_id), array_agg(ins.claimed_generation)
              INTO v_claimed_id, v_claimed_gen
              FROM ins WHERE ins.claimed_by IS NOT NULL;
            ELSE
            WITH ins AS (
                INSERT INTO {{schema}}.wb_outbox (message_id, message_kind, stream_id, partition, topic,
                       correlation_id, causation_id, message_type, timestamp_us, meta, payload,
                       claimed_by, claimed_generation)
                SELECT t.id, t.kind, t.stream, t.part, t.topic, t.corr, t.cause, t.typ, t.ts, t.meta, t.payload,
                       CASE WHEN h.held IS NULL AND v_gen[t.ord] > 0 THEN p_instance END,
                       CASE WHEN h.held IS NULL AND v_gen[t.ord] > 0 THEN v_gen[t.ord] END
                  FROM unnest(m_unit, m_id, m_kind, m_stream, m_part, m_topic, m_corr, m_cause, m_type,
                              m_ts, m_meta, m_payload)
                       WITH ORDINALITY AS t(u, id, kind, stream, part, topic, corr, cause, typ, ts, meta, payload, ord)
                  LEFT JOIN LATERAL (
                       SELECT true AS held FROM {{schema}}.wb_outbox e
                        WHERE e.stream_id = t.stream
                          AND (e.dead OR e.claimed_by IS DISTINCT FROM p_instance
                               OR e.claimed_generation IS DISTINCT FROM v_gen[t.ord])
                        LIMIT 1) h ON v_gen[t.ord] > 0
                 WHERE t.topic IS NOT NULL AND NOT (t.u = ANY (v_conflicts))
                 ORDER BY t.ord
                    ON CONFLICT (message_id) DO NOTHING
                RETURNING message_id, claimed_by, claimed_generation
            )
            SELECT array_agg(ins.message_id), array_agg(ins.claimed_generation)
              INTO v_claimed_id, v_claimed_gen
              FROM ins WHERE ins.claimed_by IS NOT NULL;
            END IF;
            -- One answer row for all of them: their ids and generations as binary arrays
            -- (array_send), which the caller decodes as it would array columns.
            IF cardinality(v_claimed_id) > 0 THEN
                RETURN QUERY
                SELECT 'wclaims_o'::text, NULL::integer, NULL::uuid, NULL::text, NULL::bigint,
                       NULL::bigint, NULL::integer, NULL::bigint, NULL::integer, NULL::text, NULL::uuid,
                       NULL::uuid, NULL::text, NULL::text, NULL::bigint,
                       array_send(v_claimed_gen), array_send(v_claimed_id);
            END IF;
            IF coalesce(cardinality(v_claimed_id), 0) < v_count THEN
                v_notify := true;
            END IF;
        END IF;

        -- Inbox rows, deduplicated: the dedup key is taken first (its unique index is where two
        -- concurrent deliveries of one message collide); only fresh ids get a row.
        IF cardinality(v_conflicts) = 0 THEN
            v_count := coalesce(cardinality(array_positions(m_inbox, true)), 0);
        ELSE
            SELECT count(*) INTO v_count FROM unnest(m_unit, m_inbox) AS t(u, inbox)
             WHERE inbox AND NOT (u = ANY (v_conflicts));
        END IF;
        IF v_count > 0 THEN
            -- One statement: the inbox insert reads the dedup insert's answer. A dedup key that
            -- another transaction holds uncommitted (another instance storing the same redelivered
            -- message) is waited for, but the rest of the statement keeps the snapshot from
            -- before the wait: it cannot see that instance's row of the message. So a row whose
            -- stream has a duplicate earlier in this batch is not leased to the writer (the
            -- duplicate's own row may be another's claim, or not claimed yet); it is claimed in
            -- order with the rest. Before, the next row of such a stream was leased to the
            -- writer ahead of the other instance's row (tests/it/postgres/inbox_order.rs).
            RETURN QUERY
            WITH m AS (
                SELECT t.*, min(t.ord) OVER (PARTITION BY t.id) AS first_ord
                  FROM unnest(m_unit, m_id, m_kind, m_stream, m_part, m_corr, m_cause, m_type, m_ts,
                              m_meta, m_payload, m_inbox)
                       WITH ORDINALITY AS t(u, id, kind, stream, part, corr, cause, typ, ts, meta, payload, inbox, ord)
                 WHERE t.inbox AND NOT (t.u = ANY (v_conflicts))
            ),
            fresh AS (
                INSERT INTO {{schema}}.wb_dedup (message_id, correlation_id)
                SELECT id, corr FROM m WHERE ord = first_ord ORDER BY ord
                    ON CONFLICT (message_id) DO NOTHING
                RETURNING message_id
            ),
            first_dup AS (
                SELECT m.stream, min(m.ord) AS ord
                  FROM m
                 WHERE m.ord <> m.first_ord OR m.id NOT IN (SELECT message_id FROM fresh)
                 GROUP BY m.stream
            ),
            firsts AS (
                SELECT m.*, CASE WHEN v_gen[m.ord] > 0 AND (d.ord IS NULL OR d.ord > m.ord)
                                 THEN v_gen[m.ord] END AS lease_gen
                  FROM m
                  LEFT JOIN first_dup d ON d.stream = m.stream
                 WHERE m.ord = m.first_ord AND m.id IN (SELECT message_id FROM fresh)
            ),
            decided AS (
                SELECT f.*, CASE WHEN h.held IS NULL THEN f.lease_gen END AS gen
                  FROM firsts f
                  LEFT JOIN LATERAL (
                       SELECT true AS held FROM {{schema}}.wb_inbox e
                        WHERE e.stream_id = f.stream
                          AND (e.dead OR e.claimed_by IS DISTINCT FROM p_instance
                               OR e.claimed_generation IS DISTINCT FROM f.lease_gen)
                        LIMIT 1) h ON f.lease_gen IS NOT NULL
            ),
            ins AS (
                INSERT INTO {{schema}}.wb_inbox (message_id, message_kind, stream_id, partition,
                       correlation_id, causation_id, message_type, timestamp_us, meta, payload,
                       claimed_by, claimed_generation)
                SELECT id, kind, stream, part, corr, cause, typ, ts, meta, payload,
                       CASE WHEN gen IS NOT NULL THEN p_instance END, gen
                  FROM decided ORDER BY ord
                RETURNING message_id, partition, claimed_by, claimed_generation
            )
            SELECT 'dup', m.u, m.id, NULL::text, NULL::bigint, NULL::bigint, NULL::integer, NULL::bigint,
                   NULL::integer, NULL::text, NULL::uuid, NULL::uuid, NULL::text, NULL::text, NULL::bigint,
                   NULL::bytea, NULL::bytea
              FROM m WHERE m.ord <> m.first_ord OR m.id NOT IN (SELECT message_id FROM fresh)
            UNION ALL
            SELECT 'wclaim_i', NULL::integer, ins.message_id, NULL::text, NULL::bigint, NULL::bigint,
                   ins.partition, ins.claimed_generation, NULL::integer, NULL::text, NULL::uuid,
                   NULL::uuid, NULL::text, NULL::text, NULL::bigint, NULL::bytea, NULL::bytea
              FROM ins WHERE ins.claimed_by IS NOT NULL;
            -- Every message of m came back as a duplicate or a claim, unless a fresh row was
            -- left unclaimed: then another instance (or a later claim) must hear of it.
            GET DIAGNOSTICS v_n = ROW_COUNT;
            IF v_n < v_count THEN
                v_notify := true;
            END IF;
        END IF;
    END IF;

    ---------------------------------------------------------------- claims
    -- A recovery claim (the caller says what it has in flight, after a batch lost its answer):
    -- rows claimed for this instance that it does not have are given up first. The claims
    -- below hand out what their budgets allow, in order; the rest stay claimable rather than
    -- counting as in flight, which would let a newer row of their stream be handed to the
    -- writer ahead of them. (Rare: a scan of this instance's claims, no index needed.)
    IF p_in_flight_outbox IS NOT NULL THEN
        UPDATE {{schema}}.wb_outbox SET claimed_by = NULL, claimed_generation = NULL
         WHERE claimed_by = p_instance AND message_id <> ALL (p_in_flight_outbox);
    END IF;
    IF p_in_flight_inbox IS NOT NULL THEN
        UPDATE {{schema}}.wb_inbox SET claimed_by = NULL, claimed_generation = NULL
         WHERE claimed_by = p_instance AND message_id <> ALL (p_in_flight_inbox);
    END IF;
    IF p_claim_outbox > 0 OR p_claim_inbox > 0 THEN
        -- At the maximum, wb_acquire trades idle partitions of this instance for busy ones.
        -- (p_max_partitions at the largest integer: no limit, see wb_acquire; not counted.)
        IF p_max_partitions = 2147483647 THEN
            v_room := p_max_partitions;
        ELSE
            SELECT greatest(p_max_partitions - count(*), 16) INTO v_room
              FROM {{schema}}.wb_partition_leases WHERE instance_id = p_instance;
        END IF;
        IF v_room > 0 THEN
            v_parts := {{schema}}.wb_unheld_partitions_with_work(v_room);
            IF cardinality(v_parts) > 0 THEN
                PERFORM {{schema}}.wb_acquire(p_instance, v_parts, p_lease_s, p_max_partitions);
            END IF;
        END IF;
        IF p_claim_outbox > 0 THEN
            RETURN QUERY SELECT * FROM {{schema}}.wb_claim_outbox(p_instance, p_claim_outbox, p_in_flight_outbox);
        END IF;
        IF p_claim_inbox > 0 THEN
            RETURN QUERY SELECT * FROM {{schema}}.wb_claim_inbox(p_instance, p_claim_inbox, p_in_flight_inbox);
        END IF;
    END IF;

    ---------------------------------------------------------------- event-store appends
    -- Versions: the stream rows were bumped (and locked) above, so each stream's new events
    -- end at its current version. Positions come from the counter row, whose lock is held from
    -- here to the commit: positions are gap-free and become visible in order.
    IF v_appends > 0 THEN
        UPDATE {{schema}}.wb_position SET last = last + v_appends RETURNING last INTO v_last;
        IF v_numbered THEN
            INSERT INTO {{schema}}.wb_events (position, stream_id, version, message_id, correlation_id,
                   causation_id, message_type, timestamp_us, meta, payload)
            SELECT v_last - v_appends + t.apos, t.stream, v_sv_version[t.sidx] - t.vback, t.id, t.corr,
                   t.cause, t.typ, t.ts, t.meta, t.payload
              FROM unnest(m_id, m_stream, m_corr, m_cause, m_type, m_ts, m_meta, m_payload, m_append,
                          m_sidx, m_vback, m_apos)
                   AS t(id, stream, corr, cause, typ, ts, meta, payload, a, sidx, vback, apos)
             WHERE t.a;
            -- The caller numbered the appends: the last position and each stream's new version
            -- (in s_stream's order, as a binary array) are all it needs to give each event its
            -- own.
            RETURN QUERY
            SELECT 'appended_v'::text, NULL::integer, NULL::uuid, NULL::text, NULL::bigint, v_last,
                   NULL::integer, NULL::bigint, NULL::integer, NULL::text, NULL::uuid, NULL::uuid,
                   NULL::text, NULL::text, NULL::bigint, NULL::bytea, array_send(v_sv_version);
        ELSE
        RETURN QUERY
        WITH m AS (
            SELECT * FROM unnest(m_unit, m_id, m_stream, m_corr, m_cause, m_type, m_ts, m_meta,
                                 m_payload, m_append)
                   WITH ORDINALITY AS t(u, id, stream, corr, cause, typ, ts, meta, payload, a, ord)
             WHERE a AND NOT (u = ANY (v_conflicts))
        ),
        numbered AS (
            SELECT m.*,
                   s.version - count(*) OVER (PARTITION BY m.stream)
                       + row_number() OVER (PARTITION BY m.stream ORDER BY m.ord) AS version,
                   v_last - v_appends + row_number() OVER (ORDER BY m.ord) AS pos
              FROM m JOIN {{schema}}.wb_streams s ON s.stream_id = m.stream
        ),
        ins AS (
            INSERT INTO {{schema}}.wb_events (position, stream_id, version, message_id, correlation_id,
                   causation_id, message_type, timestamp_us, meta, payload)
            SELECT pos, stream, version, id, corr, cause, typ, ts, meta, payload FROM numbered
        )
        SELECT 'appended', u, id, stream, version, pos, NULL::integer, NULL::bigint, NULL::integer,
               NULL::text, NULL::uuid, NULL::uuid, NULL::text, NULL::text, NULL::bigint,
               NULL::bytea, NULL::bytea
          FROM numbered ORDER BY ord;
        END IF;
    END IF;

    IF v_notify THEN
        PERFORM pg_notify('wb_work_{{schema}}', '');
    END IF;
END;
$$;
