-- whizbang: the work batch, third version: cheaper per row, and safe with several batches of
-- one instance in flight at once.
--
-- 1. Stream versions: one upsert per stream (INSERT ... ON CONFLICT DO UPDATE adding the
--    batch's appends) replaces insert-if-missing, lock, and update. Only a batch with expected
--    versions still locks its streams first (the versions are checked before anything is
--    written). A 1,000-unit batch wrote each stream row three times; now once.
-- 2. The events are appended last, after the queue rows and the claims: the position counter
--    row, whose lock serialises every appending batch until it commits, is held for the
--    insert and the commit only, not for the whole batch.
-- 3. Leases: a writer's batch no longer updates (and so locks) the lease row of every
--    partition it writes into. A lease is renewed only in its second half (the heartbeat
--    renews them all anyway); the protection the lock gave (the heartbeat must not give up a
--    partition while a batch is inserting rows claimed under it) is a per-instance advisory
--    lock instead: shared for a writing batch, taken before any row lock; exclusive for the
--    heartbeat and for wb_acquire when it gives up idle partitions to make room (tried, not
--    waited for: with another batch of the instance in flight the room is not made this time).
--    A 1,000-unit batch updated ~1,000 lease rows; now none in the steady state.
-- 4. The lease of each row (fencing of reports, the writer's claim of new rows) is looked up
--    by primary key, row by row, in a scalar subquery the planner cannot turn into a join.
--    The generic plans are made once per connection, often while the tables are new and
--    unanalysed; the join form then got a nested loop over all of the instance's leases for
--    every row (1,000 new rows x 1,500 leases: ~1.5 million rows filtered, ~100 ms a batch).
-- 5. Fewer statements for the small batches of local_invoke: completions alone skip the
--    failure and release statements; the inbox dedup, duplicate answer and insert are one
--    statement; wb_acquire is called only when a partition is not already held with time to
--    spare; the append, outbox and inbox counts are array expressions, not queries. (A
--    one-unit batch with one completion, inside one transaction: 0.37 -> 0.29 ms; with its two
--    completions and its own commit: ~0.54 -> ~0.48 ms. Measured with psql on an idle 2-core
--    machine; the commit alone is ~0.2 ms.)
-- Otherwise reports, queue rows, inbox dedup and claims are 0003's as they were.

-- The key of an instance's advisory lock (per schema: instances of services in other schemas
-- never wait for each other).
CREATE FUNCTION {{schema}}.wb_instance_key(p_instance uuid) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT hashtextextended('whizbang-instance:{{schema}}:' || p_instance::text, 0)
$$;

-- Leases the given partitions to p_instance where they are free, expired or already its own,
-- up to p_max per instance; at the maximum it first gives up its own partitions that hold no
-- rows at all. Returns nothing; callers read the lease table.
CREATE OR REPLACE FUNCTION {{schema}}.wb_acquire(
    p_instance uuid, p_parts integer[], p_lease_s double precision, p_max integer
) RETURNS void LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_want integer[];
    v_room integer;
    v_freed integer;
BEGIN
    -- Its own leases past half their time are renewed (one that another batch is renewing
    -- right now is skipped, not waited for: two batches of one instance never deadlock on
    -- them). Looked for first without locking; in the steady state (the heartbeat renews every
    -- lease long before half its time) there is nothing to renew. Row by row by primary key:
    -- a generic plan of the set form scanned all of the instance's leases.
    IF EXISTS (SELECT 1 FROM unnest(p_parts) AS p
                WHERE (SELECT l.expires_at IS NULL
                              OR l.expires_at < now() + p_lease_s * interval '0.5 second'
                         FROM {{schema}}.wb_partition_leases l
                        WHERE l.partition = p AND l.instance_id = p_instance)) THEN
        UPDATE {{schema}}.wb_partition_leases l
           SET expires_at = now() + p_lease_s * interval '1 second'
          FROM (SELECT DISTINCT d.partition FROM unnest(p_parts) AS p,
                LATERAL (SELECT r.partition FROM {{schema}}.wb_partition_leases r
                          WHERE r.partition = p AND r.instance_id = p_instance
                            AND (r.expires_at IS NULL
                                 OR r.expires_at < now() + p_lease_s * interval '0.5 second')
                            FOR UPDATE SKIP LOCKED) AS d) AS due
         WHERE l.partition = due.partition;
    END IF;

    v_want := ARRAY(
        SELECT DISTINCT p FROM unnest(p_parts) AS p
         WHERE NOT EXISTS (
               SELECT 1 FROM {{schema}}.wb_partition_leases l
                WHERE l.partition = p AND l.instance_id IS NOT NULL
                  AND (l.instance_id = p_instance OR l.expires_at > now()))
         ORDER BY p);
    IF cardinality(v_want) = 0 THEN
        RETURN;
    END IF;
    SELECT p_max - count(*) INTO v_room
      FROM {{schema}}.wb_partition_leases WHERE instance_id = p_instance;
    -- Giving up an idle partition is safe only while no other batch of this instance is
    -- writing rows (still invisible here) into it: they hold the shared lock.
    IF cardinality(v_want) > v_room
       AND pg_try_advisory_xact_lock({{schema}}.wb_instance_key(p_instance)) THEN
        WITH idle AS (
            SELECT l.partition FROM {{schema}}.wb_partition_leases l
             WHERE l.instance_id = p_instance
               AND NOT (l.partition = ANY (p_parts))
               AND NOT EXISTS (SELECT 1 FROM {{schema}}.wb_outbox o WHERE o.partition = l.partition)
               AND NOT EXISTS (SELECT 1 FROM {{schema}}.wb_inbox i WHERE i.partition = l.partition)
             LIMIT cardinality(v_want) - v_room
             FOR UPDATE SKIP LOCKED),
        freed AS (
            UPDATE {{schema}}.wb_partition_leases l SET instance_id = NULL, expires_at = NULL
              FROM idle WHERE l.partition = idle.partition RETURNING 1)
        SELECT count(*) INTO v_freed FROM freed;
        v_room := v_room + v_freed;
    END IF;
    IF v_room <= 0 THEN
        RETURN;
    END IF;
    INSERT INTO {{schema}}.wb_partition_leases AS l (partition, instance_id, generation, expires_at)
    SELECT p, p_instance, 1, now() + p_lease_s * interval '1 second'
      FROM unnest(v_want[1:v_room]) AS p
        ON CONFLICT (partition) DO UPDATE
       SET instance_id = p_instance,
           generation = l.generation + 1,
           expires_at = excluded.expires_at
     WHERE l.instance_id IS NULL OR l.expires_at < now();
END;
$$;

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
    p_in_flight_outbox uuid[], p_in_flight_inbox uuid[]
) RETURNS SETOF {{schema}}.wb_batch_row LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan AS $$
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
BEGIN
    -- The writer's new rows go into partitions it leases (below) without locking each lease
    -- row; this shared lock is what the heartbeat's exclusive one waits for before it gives up
    -- a partition that looks idle (see wb_acquire). Taken first, before any row lock: a batch
    -- waiting for it (behind a heartbeat) holds nothing the heartbeat could wait for.
    IF cardinality(m_id) > 0 AND true = ANY (u_claim) THEN
        PERFORM pg_advisory_xact_lock_shared({{schema}}.wb_instance_key(p_instance));
    END IF;

    ---------------------------------------------------------------- reports (fenced)
    IF cardinality(r_id) > 0 AND r_op <@ ARRAY['done'] THEN
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
    IF cardinality(m_id) > 0 OR cardinality(x_unit) > 0 OR cardinality(c_id) > 0 THEN
        -- With expectations: the stream rows exist and are locked in a fixed order (no deadlock
        -- between instances) before the versions are checked. Without: the upsert below locks.
        IF cardinality(x_unit) > 0 THEN
        INSERT INTO {{schema}}.wb_streams (stream_id, version)
        SELECT s, 0 FROM (
            SELECT DISTINCT s FROM unnest(m_stream, m_append) AS t(s, a) WHERE a
            UNION SELECT unnest(x_stream)) AS streams(s)
         ORDER BY s
            ON CONFLICT (stream_id) DO NOTHING;
        PERFORM 1 FROM {{schema}}.wb_streams
          WHERE stream_id IN (SELECT s FROM unnest(m_stream, m_append) AS t(s, a) WHERE a
                              UNION SELECT unnest(x_stream))
          ORDER BY stream_id FOR UPDATE;
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
        IF v_appends > 0 THEN
            INSERT INTO {{schema}}.wb_streams AS s (stream_id, version)
            SELECT t.stream, count(*)
              FROM unnest(m_unit, m_stream, m_append) AS t(u, stream, a)
             WHERE t.a AND NOT (t.u = ANY (v_conflicts))
             GROUP BY t.stream ORDER BY t.stream
                ON CONFLICT (stream_id) DO UPDATE SET version = s.version + excluded.version;
        END IF;

        -- Writer claims: the new rows' partitions are leased first, so a row is inserted
        -- already claimed (no second write), unless an older row of its stream is waiting.
        v_parts := ARRAY(
            SELECT DISTINCT t.part FROM unnest(m_unit, m_part, m_topic, m_inbox) AS t(u, part, topic, inbox)
             WHERE u_claim[t.u + 1] AND NOT (t.u = ANY (v_conflicts))
               AND (t.topic IS NOT NULL OR t.inbox));
        -- In the steady state every one is already this instance's with time to spare (looked
        -- up row by row by primary key), and wb_acquire is not called at all.
        IF EXISTS (SELECT 1 FROM unnest(v_parts) AS p
                    WHERE (SELECT l.instance_id = p_instance
                                  AND l.expires_at >= now() + p_lease_s * interval '0.5 second'
                             FROM {{schema}}.wb_partition_leases l
                            WHERE l.partition = p) IS NOT TRUE) THEN
            PERFORM {{schema}}.wb_acquire(p_instance, v_parts, p_lease_s, p_max_partitions);
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
            RETURN QUERY
            WITH m AS (
                SELECT t.*, CASE WHEN u_claim[t.u + 1] THEN (
                           SELECT l.generation FROM {{schema}}.wb_partition_leases l
                            WHERE l.partition = t.part AND l.instance_id = p_instance) END AS gen
                  FROM unnest(m_unit, m_id, m_kind, m_stream, m_part, m_topic, m_corr, m_cause, m_type,
                              m_ts, m_meta, m_payload)
                       WITH ORDINALITY AS t(u, id, kind, stream, part, topic, corr, cause, typ, ts, meta, payload, ord)
                 WHERE t.topic IS NOT NULL AND NOT (t.u = ANY (v_conflicts))
            ),
            decided AS (
                -- Rows already in the table are older than this batch's: any of them not in
                -- flight here holds the stream back.
                SELECT m.*, m.gen IS NOT NULL AND NOT EXISTS (
                           SELECT 1 FROM {{schema}}.wb_outbox e
                            WHERE e.stream_id = m.stream
                              AND (e.dead OR e.claimed_by IS DISTINCT FROM p_instance
                                   OR e.claimed_generation IS DISTINCT FROM m.gen)) AS mine
                  FROM m
            ),
            ins AS (
                INSERT INTO {{schema}}.wb_outbox (message_id, message_kind, stream_id, partition, topic,
                       correlation_id, causation_id, message_type, timestamp_us, meta, payload,
                       claimed_by, claimed_generation)
                SELECT id, kind, stream, part, topic, corr, cause, typ, ts, meta, payload,
                       CASE WHEN mine THEN p_instance END, CASE WHEN mine THEN gen END
                  FROM decided ORDER BY ord
                    ON CONFLICT (message_id) DO NOTHING
                RETURNING message_id, partition, claimed_by, claimed_generation
            )
            SELECT 'wclaim_o', NULL::integer, ins.message_id, NULL::text, NULL::bigint, NULL::bigint,
                   ins.partition, ins.claimed_generation, NULL::integer, NULL::text, NULL::uuid, NULL::uuid,
                   NULL::text, NULL::text, NULL::bigint, NULL::bytea, NULL::bytea
              FROM ins WHERE ins.claimed_by IS NOT NULL;
            GET DIAGNOSTICS v_n = ROW_COUNT;
            IF v_n < v_count THEN
                v_notify := true;
            END IF;
        END IF;

        -- Inbox rows, deduplicated: the dedup key is taken first (its unique index is where two
        -- concurrent deliveries of one message collide); only fresh ids get a row. One
        -- statement (0003 took three): the inbox insert reads the dedup insert's answer.
        IF cardinality(v_conflicts) = 0 THEN
            v_count := coalesce(cardinality(array_positions(m_inbox, true)), 0);
        ELSE
            SELECT count(*) INTO v_count FROM unnest(m_unit, m_inbox) AS t(u, inbox)
             WHERE inbox AND NOT (u = ANY (v_conflicts));
        END IF;
        IF v_count > 0 THEN
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
            firsts AS (
                SELECT m.*, CASE WHEN u_claim[m.u + 1] THEN (
                           SELECT l.generation FROM {{schema}}.wb_partition_leases l
                            WHERE l.partition = m.part AND l.instance_id = p_instance) END AS gen
                  FROM m WHERE m.ord = m.first_ord AND m.id IN (SELECT message_id FROM fresh)
            ),
            decided AS (
                SELECT f.*, f.gen IS NOT NULL AND NOT EXISTS (
                           SELECT 1 FROM {{schema}}.wb_inbox e
                            WHERE e.stream_id = f.stream
                              AND (e.dead OR e.claimed_by IS DISTINCT FROM p_instance
                                   OR e.claimed_generation IS DISTINCT FROM f.gen)) AS mine
                  FROM firsts f
            ),
            ins AS (
                INSERT INTO {{schema}}.wb_inbox (message_id, message_kind, stream_id, partition,
                       correlation_id, causation_id, message_type, timestamp_us, meta, payload,
                       claimed_by, claimed_generation)
                SELECT id, kind, stream, part, corr, cause, typ, ts, meta, payload,
                       CASE WHEN mine THEN p_instance END, CASE WHEN mine THEN gen END
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
        SELECT greatest(p_max_partitions - count(*), 16) INTO v_room
          FROM {{schema}}.wb_partition_leases WHERE instance_id = p_instance;
        IF v_room > 0 THEN
            -- Partitions with work nobody holds. Not a scan of the queues: unclaimed rows come
            -- from the partial indexes, and rows still marked as claimed can only sit in a
            -- partition whose holder's lease ran out (a release clears the claims it gives up).
            v_parts := ARRAY(
                SELECT c.partition FROM (
                    SELECT DISTINCT partition FROM {{schema}}.wb_outbox
                     WHERE claimed_by IS NULL AND NOT dead
                       AND (next_attempt_at IS NULL OR next_attempt_at <= now())
                    UNION
                    SELECT DISTINCT partition FROM {{schema}}.wb_inbox
                     WHERE claimed_by IS NULL AND NOT dead
                       AND (next_attempt_at IS NULL OR next_attempt_at <= now())
                    UNION
                    SELECT l.partition FROM {{schema}}.wb_partition_leases l
                     WHERE l.instance_id IS NOT NULL AND l.expires_at <= now()
                       AND (EXISTS (SELECT 1 FROM {{schema}}.wb_outbox o
                                     WHERE o.partition = l.partition AND NOT o.dead)
                            OR EXISTS (SELECT 1 FROM {{schema}}.wb_inbox i
                                        WHERE i.partition = l.partition AND NOT i.dead))) c
                 WHERE NOT EXISTS (
                       SELECT 1 FROM {{schema}}.wb_partition_leases l
                        WHERE l.partition = c.partition AND l.instance_id IS NOT NULL
                          AND l.expires_at > now())
                 ORDER BY c.partition LIMIT v_room);
            IF cardinality(v_parts) > 0 THEN
                PERFORM {{schema}}.wb_acquire(p_instance, v_parts, p_lease_s, p_max_partitions);
            END IF;
        END IF;
        IF p_claim_outbox > 0 THEN
            RETURN QUERY
            WITH mine AS (
                SELECT partition, generation FROM {{schema}}.wb_partition_leases
                 WHERE instance_id = p_instance AND expires_at > now()
            ),
            flagged AS (
                SELECT o.seq, o.stream_id, o.dead, o.next_attempt_at, m.generation,
                       coalesce(o.claimed_by = p_instance AND o.claimed_generation = m.generation
                                AND (p_in_flight_outbox IS NULL OR o.message_id = ANY (p_in_flight_outbox)), false)
                           AS inflight
                  FROM {{schema}}.wb_outbox o JOIN mine m ON m.partition = o.partition
            ),
            rows AS (
                SELECT f.*,
                       bool_or(f.dead OR (coalesce(f.next_attempt_at > now(), false) AND NOT f.inflight))
                           OVER (PARTITION BY f.stream_id ORDER BY f.seq ROWS UNBOUNDED PRECEDING) AS blocked
                  FROM flagged f
            ),
            cand AS (
                SELECT seq, stream_id, generation FROM rows
                 WHERE NOT blocked AND NOT inflight
                 ORDER BY seq LIMIT p_claim_outbox
            ),
            locked AS (
                SELECT o.seq FROM {{schema}}.wb_outbox o WHERE o.seq IN (SELECT seq FROM cand)
                   FOR UPDATE SKIP LOCKED
            ),
            prefix AS (
                SELECT c.seq, c.generation,
                       bool_or(l.seq IS NULL) OVER (PARTITION BY c.stream_id ORDER BY c.seq
                                                    ROWS UNBOUNDED PRECEDING) AS cut
                  FROM cand c LEFT JOIN locked l ON l.seq = c.seq
            ),
            claimed AS (
                UPDATE {{schema}}.wb_outbox o SET claimed_by = p_instance, claimed_generation = p.generation
                  FROM prefix p WHERE o.seq = p.seq AND NOT p.cut
                RETURNING o.*
            )
            SELECT 'claim_o', NULL::integer, c.message_id, c.stream_id, NULL::bigint, c.seq, c.partition,
                   c.claimed_generation, c.attempts, c.topic, c.correlation_id, c.causation_id,
                   c.message_type, c.message_kind, c.timestamp_us, c.meta, c.payload
              FROM claimed c ORDER BY c.seq;
        END IF;
        IF p_claim_inbox > 0 THEN
            RETURN QUERY
            WITH mine AS (
                SELECT partition, generation FROM {{schema}}.wb_partition_leases
                 WHERE instance_id = p_instance AND expires_at > now()
            ),
            flagged AS (
                SELECT o.seq, o.stream_id, o.dead, o.next_attempt_at, m.generation,
                       coalesce(o.claimed_by = p_instance AND o.claimed_generation = m.generation
                                AND (p_in_flight_inbox IS NULL OR o.message_id = ANY (p_in_flight_inbox)), false)
                           AS inflight
                  FROM {{schema}}.wb_inbox o JOIN mine m ON m.partition = o.partition
            ),
            rows AS (
                SELECT f.*,
                       bool_or(f.dead OR (coalesce(f.next_attempt_at > now(), false) AND NOT f.inflight))
                           OVER (PARTITION BY f.stream_id ORDER BY f.seq ROWS UNBOUNDED PRECEDING) AS blocked
                  FROM flagged f
            ),
            cand AS (
                SELECT seq, stream_id, generation FROM rows
                 WHERE NOT blocked AND NOT inflight
                 ORDER BY seq LIMIT p_claim_inbox
            ),
            locked AS (
                SELECT o.seq FROM {{schema}}.wb_inbox o WHERE o.seq IN (SELECT seq FROM cand)
                   FOR UPDATE SKIP LOCKED
            ),
            prefix AS (
                SELECT c.seq, c.generation,
                       bool_or(l.seq IS NULL) OVER (PARTITION BY c.stream_id ORDER BY c.seq
                                                    ROWS UNBOUNDED PRECEDING) AS cut
                  FROM cand c LEFT JOIN locked l ON l.seq = c.seq
            ),
            claimed AS (
                UPDATE {{schema}}.wb_inbox o SET claimed_by = p_instance, claimed_generation = p.generation
                  FROM prefix p WHERE o.seq = p.seq AND NOT p.cut
                RETURNING o.*
            )
            SELECT 'claim_i', NULL::integer, c.message_id, c.stream_id, NULL::bigint, c.seq, c.partition,
                   c.claimed_generation, c.attempts, NULL::text, c.correlation_id, c.causation_id,
                   c.message_type, c.message_kind, c.timestamp_us, c.meta, c.payload
              FROM claimed c ORDER BY c.seq;
        END IF;
    END IF;

    ---------------------------------------------------------------- event-store appends
    -- Versions: the stream rows were bumped (and locked) above, so each stream's new events
    -- end at its current version. Positions come from the counter row, whose lock is held from
    -- here to the commit: positions are gap-free and become visible in order.
    IF v_appends > 0 THEN
        UPDATE {{schema}}.wb_position SET last = last + v_appends RETURNING last INTO v_last;
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

    IF v_notify THEN
        PERFORM pg_notify('wb_work_{{schema}}', '');
    END IF;
END;
$$;

CREATE OR REPLACE FUNCTION {{schema}}.wb_heartbeat(
    p_instance uuid, p_lease_s double precision, p_retention_s double precision
) RETURNS TABLE (live_instances integer, held integer[], released integer[])
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_live integer;
    v_total integer;
    v_fair integer;
    v_mine integer;
    v_released integer[];
    v_excess integer;
    v_p integer;
BEGIN
    -- Waits for this instance's batches that are writing rows into its partitions (they hold
    -- the shared lock from before their rows exist until they commit), and keeps new ones out
    -- until this transaction ends: "no rows" and "nothing claimed" below are not stale.
    PERFORM pg_advisory_xact_lock({{schema}}.wb_instance_key(p_instance));
    UPDATE {{schema}}.wb_instances SET last_seen = now() WHERE instance_id = p_instance;
    UPDATE {{schema}}.wb_partition_leases SET expires_at = now() + p_lease_s * interval '1 second'
     WHERE instance_id = p_instance;
    SELECT count(*) INTO v_live FROM {{schema}}.wb_instances
     WHERE last_seen > now() - p_lease_s * interval '1 second';
    v_live := greatest(v_live, 1);
    SELECT count(*) INTO v_total FROM {{schema}}.wb_partition_leases
     WHERE instance_id IS NOT NULL AND expires_at > now();
    SELECT count(*) INTO v_mine FROM {{schema}}.wb_partition_leases WHERE instance_id = p_instance;
    v_fair := ceil(v_total::numeric / v_live);

    -- Idle partitions (no rows at all) go at once. A batch writing rows into one of them
    -- holds the instance's shared lock from before the rows exist until it commits, and the
    -- exclusive lock above waited for it, so "no rows" seen here is not stale.
    WITH freed AS (
        UPDATE {{schema}}.wb_partition_leases l SET instance_id = NULL, expires_at = NULL
         WHERE l.instance_id = p_instance
           AND NOT EXISTS (SELECT 1 FROM {{schema}}.wb_outbox o WHERE o.partition = l.partition)
           AND NOT EXISTS (SELECT 1 FROM {{schema}}.wb_inbox i WHERE i.partition = l.partition)
        RETURNING l.partition
    )
    SELECT coalesce(array_agg(partition), '{}') INTO v_released FROM freed;

    -- Above the fair share, a few partitions with work but nothing of it in flight here go
    -- too. A claim does not lock the lease row, so the partition's rows are locked first
    -- (NOWAIT: one a batch is claiming right now is skipped; a claim that starts later skips
    -- the locked rows) and the check runs again in a statement of its own, which sees every
    -- claim committed before.
    v_excess := least(10, greatest(0, v_mine - v_fair));
    IF v_excess > 0 THEN
        FOR v_p IN
            SELECT l.partition FROM {{schema}}.wb_partition_leases l
             WHERE l.instance_id = p_instance
               AND NOT EXISTS (SELECT 1 FROM {{schema}}.wb_outbox o
                                WHERE o.partition = l.partition AND o.claimed_by = p_instance
                                  AND o.claimed_generation = l.generation)
               AND NOT EXISTS (SELECT 1 FROM {{schema}}.wb_inbox i
                                WHERE i.partition = l.partition AND i.claimed_by = p_instance
                                  AND i.claimed_generation = l.generation)
             ORDER BY l.partition
        LOOP
            EXIT WHEN v_excess <= 0;
            BEGIN
                PERFORM 1 FROM {{schema}}.wb_outbox WHERE partition = v_p FOR UPDATE NOWAIT;
                PERFORM 1 FROM {{schema}}.wb_inbox WHERE partition = v_p FOR UPDATE NOWAIT;
            EXCEPTION WHEN lock_not_available THEN
                CONTINUE;
            END;
            UPDATE {{schema}}.wb_partition_leases l SET instance_id = NULL, expires_at = NULL
             WHERE l.partition = v_p AND l.instance_id = p_instance
               AND NOT EXISTS (SELECT 1 FROM {{schema}}.wb_outbox o
                                WHERE o.partition = l.partition AND o.claimed_by = p_instance
                                  AND o.claimed_generation = l.generation)
               AND NOT EXISTS (SELECT 1 FROM {{schema}}.wb_inbox i
                                WHERE i.partition = l.partition AND i.claimed_by = p_instance
                                  AND i.claimed_generation = l.generation);
            IF FOUND THEN
                v_released := v_released || v_p;
                v_excess := v_excess - 1;
            END IF;
        END LOOP;
    END IF;
    -- Rows of a released partition are nobody's claims any more (the next holder's claim, and
    -- the search for partitions with work, see them as free).
    IF cardinality(v_released) > 0 THEN
        UPDATE {{schema}}.wb_outbox SET claimed_by = NULL, claimed_generation = NULL
         WHERE partition = ANY (v_released) AND claimed_by IS NOT NULL;
        UPDATE {{schema}}.wb_inbox SET claimed_by = NULL, claimed_generation = NULL
         WHERE partition = ANY (v_released) AND claimed_by IS NOT NULL;
    END IF;

    DELETE FROM {{schema}}.wb_dedup
     WHERE processed_at IS NOT NULL AND processed_at < now() - p_retention_s * interval '1 second';
    DELETE FROM {{schema}}.wb_instances
     WHERE last_seen < now() - 10 * p_lease_s * interval '1 second';

    -- Released partitions, or work behind a lease that ran out (its holder died): wake every
    -- instance, so one takes the partition over now rather than at its next fallback poll.
    IF cardinality(v_released) > 0 OR EXISTS (
           SELECT 1 FROM {{schema}}.wb_partition_leases l
            WHERE l.instance_id IS NOT NULL AND l.expires_at <= now()
              AND (EXISTS (SELECT 1 FROM {{schema}}.wb_outbox o
                            WHERE o.partition = l.partition AND NOT o.dead)
                   OR EXISTS (SELECT 1 FROM {{schema}}.wb_inbox i
                               WHERE i.partition = l.partition AND NOT i.dead))) THEN
        PERFORM pg_notify('wb_work_{{schema}}', '');
    END IF;
    RETURN QUERY SELECT v_live,
        ARRAY(SELECT partition FROM {{schema}}.wb_partition_leases
               WHERE instance_id = p_instance ORDER BY partition),
        v_released;
END;
$$;
