-- whizbang: a claim with nothing to take costs a probe, not the claim.
--
-- A work batch that claims runs three statements besides its own: the search for partitions
-- with work nobody holds (0005) and the two claims (0005). Each is a large plan (recursive
-- CTEs, unions, row locks, a window, an update and its five indexes), and starting and ending
-- such a plan costs far more than running it over empty queues: on an idle 2-core machine
-- 60-80 us each, ~250 us for the batch, against 5-14 us for a plain EXISTS probe. Most claims
-- find nothing (the idle instance's fallback poll, the claim after completions when the queue
-- holds only rows in flight here), so each now probes first and returns at once when nothing
-- could be taken:
-- 1. the search: no unclaimed live row in either queue and no lease that ran out while held
--    (its two branches need one or the other);
-- 2. each claim: no row in this instance's live partitions that is neither dead, nor waiting
--    for its retry, nor in flight here (the walk's own conditions, less the held-back probe,
--    which only removes rows; so the probe finds a row whenever the walk would).
-- The probe passes the rows the walk would pass before its first candidate, so a claim that
-- does find work pays at most that walk twice; a claim of nothing no longer pays the plan.
-- Otherwise the functions are 0005's as they were.

CREATE OR REPLACE FUNCTION {{schema}}.wb_unheld_partitions_with_work(p_limit integer) RETURNS integer[]
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET jit = off AS $$
BEGIN
    -- Probes first: rows nobody has claimed (the partial index of unclaimed rows), a lease
    -- that ran out while still held. The search below needs one or the other to find anything.
    IF NOT EXISTS (SELECT 1 FROM {{schema}}.wb_outbox WHERE claimed_by IS NULL AND NOT dead)
       AND NOT EXISTS (SELECT 1 FROM {{schema}}.wb_inbox WHERE claimed_by IS NULL AND NOT dead)
       AND NOT EXISTS (SELECT 1 FROM {{schema}}.wb_partition_leases
                        WHERE instance_id IS NOT NULL AND expires_at <= now()) THEN
        RETURN '{}';
    END IF;
    RETURN ARRAY(
        SELECT c.partition FROM (
            SELECT w.partition FROM (
                WITH RECURSIVE o(partition) AS (
                    (SELECT partition FROM {{schema}}.wb_outbox
                      WHERE claimed_by IS NULL AND NOT dead
                        AND (next_attempt_at IS NULL OR next_attempt_at <= now())
                      ORDER BY partition LIMIT 1)
                    UNION ALL
                    SELECT (SELECT x.partition FROM {{schema}}.wb_outbox x
                             WHERE x.claimed_by IS NULL AND NOT x.dead
                               AND (x.next_attempt_at IS NULL OR x.next_attempt_at <= now())
                               AND x.partition > o.partition
                             ORDER BY x.partition LIMIT 1)
                      FROM o WHERE o.partition IS NOT NULL
                ),
                i(partition) AS (
                    (SELECT partition FROM {{schema}}.wb_inbox
                      WHERE claimed_by IS NULL AND NOT dead
                        AND (next_attempt_at IS NULL OR next_attempt_at <= now())
                      ORDER BY partition LIMIT 1)
                    UNION ALL
                    SELECT (SELECT x.partition FROM {{schema}}.wb_inbox x
                             WHERE x.claimed_by IS NULL AND NOT x.dead
                               AND (x.next_attempt_at IS NULL OR x.next_attempt_at <= now())
                               AND x.partition > i.partition
                             ORDER BY x.partition LIMIT 1)
                      FROM i WHERE i.partition IS NOT NULL
                )
                SELECT partition FROM o WHERE partition IS NOT NULL
                UNION
                SELECT partition FROM i WHERE partition IS NOT NULL) w
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
         ORDER BY c.partition LIMIT p_limit);
END;
$$;

CREATE OR REPLACE FUNCTION {{schema}}.wb_claim_outbox(p_instance uuid, p_budget integer, p_in_flight uuid[])
RETURNS SETOF {{schema}}.wb_batch_row LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET enable_bitmapscan = off SET enable_sort = off SET jit = off AS $$
BEGIN
    -- The walk's own conditions, without the held-back probe and the order: when no row
    -- passes them the claim below could take nothing.
    IF NOT EXISTS (
           SELECT 1 FROM {{schema}}.wb_outbox o JOIN {{schema}}.wb_partition_leases m
                  ON m.partition = o.partition
            WHERE m.instance_id = p_instance AND m.expires_at > now()
              AND NOT o.dead
              AND NOT coalesce(o.next_attempt_at > now(), false)
              AND NOT coalesce(o.claimed_by = p_instance AND o.claimed_generation = m.generation
                               AND (p_in_flight IS NULL OR o.message_id = ANY (p_in_flight)), false)) THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH mine AS (
        SELECT partition, generation FROM {{schema}}.wb_partition_leases
         WHERE instance_id = p_instance AND expires_at > now()
    ),
    cand AS (
        -- The walk in seq order; LIMIT stops it.
        SELECT o.seq, o.stream_id, m.generation
          FROM {{schema}}.wb_outbox o JOIN mine m ON m.partition = o.partition
         WHERE NOT o.dead
           AND NOT coalesce(o.next_attempt_at > now(), false)
           AND NOT coalesce(o.claimed_by = p_instance AND o.claimed_generation = m.generation
                            AND (p_in_flight IS NULL OR o.message_id = ANY (p_in_flight)), false)
           -- A scalar subquery with LIMIT (not NOT EXISTS, which the planner may turn into an
           -- anti-join reading the whole partition): one index probe per row passed.
           AND NOT coalesce((
               SELECT true FROM {{schema}}.wb_outbox e
                WHERE e.stream_id = o.stream_id AND e.seq < o.seq
                  AND (e.dead
                       OR (coalesce(e.next_attempt_at > now(), false)
                           AND NOT coalesce(e.claimed_by = p_instance
                                            AND e.claimed_generation = m.generation
                                            AND (p_in_flight IS NULL OR e.message_id = ANY (p_in_flight)),
                                            false)))
                LIMIT 1), false)
         ORDER BY o.seq LIMIT p_budget
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
    SELECT 'claim_o'::text, NULL::integer, c.message_id, c.stream_id, NULL::bigint, c.seq, c.partition,
           c.claimed_generation, c.attempts, c.topic, c.correlation_id, c.causation_id,
           c.message_type, c.message_kind, c.timestamp_us, c.meta, c.payload
      FROM claimed c ORDER BY c.seq;
END;
$$;

CREATE OR REPLACE FUNCTION {{schema}}.wb_claim_inbox(p_instance uuid, p_budget integer, p_in_flight uuid[])
RETURNS SETOF {{schema}}.wb_batch_row LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET enable_bitmapscan = off SET enable_sort = off SET jit = off AS $$
BEGIN
    -- The walk's own conditions, without the held-back probe and the order: when no row
    -- passes them the claim below could take nothing.
    IF NOT EXISTS (
           SELECT 1 FROM {{schema}}.wb_inbox o JOIN {{schema}}.wb_partition_leases m
                  ON m.partition = o.partition
            WHERE m.instance_id = p_instance AND m.expires_at > now()
              AND NOT o.dead
              AND NOT coalesce(o.next_attempt_at > now(), false)
              AND NOT coalesce(o.claimed_by = p_instance AND o.claimed_generation = m.generation
                               AND (p_in_flight IS NULL OR o.message_id = ANY (p_in_flight)), false)) THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH mine AS (
        SELECT partition, generation FROM {{schema}}.wb_partition_leases
         WHERE instance_id = p_instance AND expires_at > now()
    ),
    cand AS (
        -- The walk in seq order; LIMIT stops it.
        SELECT o.seq, o.stream_id, m.generation
          FROM {{schema}}.wb_inbox o JOIN mine m ON m.partition = o.partition
         WHERE NOT o.dead
           AND NOT coalesce(o.next_attempt_at > now(), false)
           AND NOT coalesce(o.claimed_by = p_instance AND o.claimed_generation = m.generation
                            AND (p_in_flight IS NULL OR o.message_id = ANY (p_in_flight)), false)
           -- A scalar subquery with LIMIT (not NOT EXISTS, which the planner may turn into an
           -- anti-join reading the whole partition): one index probe per row passed.
           AND NOT coalesce((
               SELECT true FROM {{schema}}.wb_inbox e
                WHERE e.stream_id = o.stream_id AND e.seq < o.seq
                  AND (e.dead
                       OR (coalesce(e.next_attempt_at > now(), false)
                           AND NOT coalesce(e.claimed_by = p_instance
                                            AND e.claimed_generation = m.generation
                                            AND (p_in_flight IS NULL OR e.message_id = ANY (p_in_flight)),
                                            false)))
                LIMIT 1), false)
         ORDER BY o.seq LIMIT p_budget
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
    SELECT 'claim_i'::text, NULL::integer, c.message_id, c.stream_id, NULL::bigint, c.seq, c.partition,
           c.claimed_generation, c.attempts, NULL::text, c.correlation_id, c.causation_id,
           c.message_type, c.message_kind, c.timestamp_us, c.meta, c.payload
      FROM claimed c ORDER BY c.seq;
END;
$$;
