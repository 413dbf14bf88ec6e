-- whizbang: the work batch of one message, written row by row.
--
-- `wb_process_work_batch` takes every batch as arrays and writes them with set-based
-- statements (unnest, window functions, CTEs). For the batch a `local_invoke` or a scoped
-- flush sends most often (one unit writing one message: its event, its outbox row, its inbox
-- row for a local perspective, beside the completions of earlier rows) those statements cost
-- more to start than to run: written by single-row statements, the same rows cost about two
-- thirds. This function is that batch written row by row. It does what `wb_process_work_batch`
-- does for the same input, step for step and in the same order (the store picks it only for
-- batches it can take; see `PostgresStore::process_work_batch`):
-- 1. the instance's shared advisory lock when the unit claims its rows for the writer;
-- 2. completions, fenced by partition and generation ('stale' for those that no longer apply);
-- 3. the stream version bump (which locks the stream row until commit);
-- 4. the lease of the message's partition, taken or renewed when needed;
-- 5. the outbox row, claimed by the writer unless an older row of its stream holds it back;
-- 6. the inbox row behind its dedup key ('dup' when the id was seen before), claimed likewise;
-- 7. the event, last, so the position counter row is locked as briefly as possible;
-- 8. a notification when a row was left for a claim.
-- m_id NULL: no message (completions only).
CREATE OR REPLACE FUNCTION {{schema}}.wb_process_one_message(
    p_instance uuid,
    p_lease_s double precision,
    p_max_partitions integer,
    -- completions: queue 'o' | 'i'
    r_queue text[], r_id uuid[], r_part integer[], r_gen bigint[],
    -- the unit's claim-for-writer flag, then its one message
    p_claim boolean,
    m_id uuid, m_kind text, m_stream text, m_part integer, m_corr uuid, m_cause uuid, m_type text,
    m_ts bigint, m_meta bytea, m_payload bytea, m_append boolean, m_topic text, m_inbox boolean
) RETURNS SETOF {{schema}}.wb_batch_row LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET jit = off SET enable_seqscan = off AS $$
DECLARE
    v_version bigint;
    v_position bigint;
    v_gen bigint;
    v_leased boolean;
    v_mine boolean;
    v_notify boolean := false;
    v_row {{schema}}.wb_batch_row;
BEGIN
    IF m_id IS NOT NULL AND p_claim THEN
        PERFORM pg_advisory_xact_lock_shared({{schema}}.wb_instance_key(p_instance));
    END IF;

    IF cardinality(r_id) > 0 THEN
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
    END IF;

    IF m_id IS NULL THEN
        RETURN;
    END IF;

    IF m_append THEN
        INSERT INTO {{schema}}.wb_streams AS s (stream_id, version) VALUES (m_stream, 1)
            ON CONFLICT (stream_id) DO UPDATE SET version = s.version + 1
        RETURNING s.version INTO v_version;
    END IF;

    IF p_claim AND (m_topic IS NOT NULL OR m_inbox) THEN
        SELECT l.instance_id = p_instance
               AND l.expires_at >= now() + p_lease_s * interval '0.5 second', l.generation
          INTO v_leased, v_gen
          FROM {{schema}}.wb_partition_leases l WHERE l.partition = m_part;
        IF v_leased IS NOT TRUE THEN
            PERFORM {{schema}}.wb_acquire(p_instance, ARRAY[m_part], p_lease_s, p_max_partitions);
            -- NULL when the partition is not (or no longer) this instance's.
            SELECT l.generation INTO v_gen
              FROM {{schema}}.wb_partition_leases l
             WHERE l.partition = m_part AND l.instance_id = p_instance;
        END IF;
    END IF;

    IF m_topic IS NOT NULL THEN
        -- Rows already in the table are older than this one: any of them not in flight here
        -- holds the stream back.
        INSERT INTO {{schema}}.wb_outbox (message_id, message_kind, stream_id, partition, topic,
               correlation_id, causation_id, message_type, timestamp_us, meta, payload,
               claimed_by, claimed_generation)
        SELECT m_id, m_kind, m_stream, m_part, m_topic, m_corr, m_cause, m_type, m_ts, m_meta,
               m_payload, CASE WHEN x.mine THEN p_instance END, CASE WHEN x.mine THEN v_gen END
          FROM (SELECT v_gen IS NOT NULL AND NOT EXISTS (
                       SELECT 1 FROM {{schema}}.wb_outbox e
                        WHERE e.stream_id = m_stream
                          AND (e.dead OR e.claimed_by IS DISTINCT FROM p_instance
                               OR e.claimed_generation IS DISTINCT FROM v_gen)) AS mine) x
            ON CONFLICT (message_id) DO NOTHING
        RETURNING claimed_by IS NOT NULL INTO v_mine;
        IF v_mine THEN
            v_row := ROW('wclaim_o', NULL, m_id, NULL, NULL, NULL, m_part, v_gen, NULL, NULL, NULL,
                         NULL, NULL, NULL, NULL, NULL, NULL);
            RETURN NEXT v_row;
        ELSE
            v_notify := true;
        END IF;
    END IF;

    IF m_inbox THEN
        WITH fresh AS (
            INSERT INTO {{schema}}.wb_dedup (message_id, correlation_id) VALUES (m_id, m_corr)
                ON CONFLICT (message_id) DO NOTHING
            RETURNING message_id
        )
        INSERT INTO {{schema}}.wb_inbox (message_id, message_kind, stream_id, partition,
               correlation_id, causation_id, message_type, timestamp_us, meta, payload,
               claimed_by, claimed_generation)
        SELECT m_id, m_kind, m_stream, m_part, m_corr, m_cause, m_type, m_ts, m_meta, m_payload,
               CASE WHEN x.mine THEN p_instance END, CASE WHEN x.mine THEN v_gen END
          FROM fresh, (SELECT v_gen IS NOT NULL AND NOT EXISTS (
                              SELECT 1 FROM {{schema}}.wb_inbox e
                               WHERE e.stream_id = m_stream
                                 AND (e.dead OR e.claimed_by IS DISTINCT FROM p_instance
                                      OR e.claimed_generation IS DISTINCT FROM v_gen)) AS mine) x
        RETURNING claimed_by IS NOT NULL INTO v_mine;
        IF NOT FOUND THEN
            v_row := ROW('dup', 0, m_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                         NULL, NULL, NULL, NULL);
            RETURN NEXT v_row;
        ELSIF v_mine THEN
            v_row := ROW('wclaim_i', NULL, m_id, NULL, NULL, NULL, m_part, v_gen, NULL, NULL, NULL,
                         NULL, NULL, NULL, NULL, NULL, NULL);
            RETURN NEXT v_row;
        ELSE
            v_notify := true;
        END IF;
    END IF;

    IF m_append THEN
        WITH p AS (
            UPDATE {{schema}}.wb_position SET last = last + 1 RETURNING last
        )
        INSERT INTO {{schema}}.wb_events (position, stream_id, version, message_id, correlation_id,
               causation_id, message_type, timestamp_us, meta, payload)
        SELECT p.last, m_stream, v_version, m_id, m_corr, m_cause, m_type, m_ts, m_meta, m_payload
          FROM p
        RETURNING position INTO v_position;
        v_row := ROW('appended', 0, m_id, m_stream, v_version, v_position, NULL, NULL, NULL, NULL,
                     NULL, NULL, NULL, NULL, NULL, NULL, NULL);
        RETURN NEXT v_row;
    END IF;

    IF v_notify THEN
        PERFORM pg_notify('wb_work_{{schema}}', '');
    END IF;
END;
$$;
