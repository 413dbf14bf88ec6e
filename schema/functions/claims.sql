-- whizbang: claims of pending work, costing what they hand out, not what is queued.
--
-- 1. A claim walks the queue in `seq` order (the primary key) and stops as soon as it has its
--    budget. Each row it passes is checked on its own: not dead, not waiting for a retry, not
--    in flight here, and no earlier row of its stream dead or waiting (one probe of the
--    (stream_id, seq) index that stops at the first such row). It passes rows it cannot take
--    (in flight here, in other instances' partitions, held back), so its cost follows the rows
--    ahead of the first `budget` claimable ones, not the length of the queue (a window over a
--    backlog of 438,000 rows took over a second per claim). The walks are planned with bitmap
--    scans and sorts ruled out: the planner, free to choose, read the whole queue, sorted it
--    and probed every row (it cannot know that the walk stops early).
-- 2. Partitions with work nobody holds are found by skipping through the partial index of
--    unclaimed rows one partition at a time, and only as many as there is room for.
-- 3. Most claims find nothing (an idle instance's fallback poll, the claim after completions
--    when the queue holds only rows in flight here), and starting and ending the walk's large
--    plan costs far more than running it over empty queues. So the public names are probes: a
--    plain EXISTS with the walk's own conditions (less the held-back check, which only removes
--    rows, so the probe finds a row whenever the walk would), calling the walk (`…_walk`,
--    `…_search`) only when it finds one.
-- 4. JIT compilation is off: its cost (tens to hundreds of milliseconds per execution) is paid
--    on every call of a generic plan estimated expensive, never repaid by statements that
--    touch a few hundred rows.
-- Generic plans and sequential scans off, as everywhere (see work_batch.sql).

-- Partitions with rows ready to claim that no live lease holds: rows nobody has claimed
-- (through the partial index of unclaimed rows, one partition at a time, as many as asked
-- for), and partitions whose holder's lease ran out with work behind it.
CREATE OR REPLACE FUNCTION {{schema}}.wb_unheld_partitions_search(p_limit integer) RETURNS integer[]
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET jit = off SET enable_seqscan = off AS $$
BEGIN
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

-- Claims up to p_budget rows of wb_outbox in this instance's live partitions for it, oldest
-- first: never a dead row or one waiting for its retry, never one it has in flight (claimed
-- under the partition's current generation and, after a lost answer, named in p_in_flight),
-- never past an earlier row of the same stream that is dead or waiting for its retry and not
-- in flight. A candidate another transaction has locked is skipped with every later candidate
-- of its stream.
CREATE OR REPLACE FUNCTION {{schema}}.wb_claim_outbox_walk(p_instance uuid, p_budget integer, p_in_flight uuid[])
RETURNS SETOF {{schema}}.wb_batch_row LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET enable_bitmapscan = off SET enable_sort = off SET jit = off SET enable_seqscan = off AS $$
BEGIN
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

-- As wb_claim_outbox_walk, for wb_inbox.
CREATE OR REPLACE FUNCTION {{schema}}.wb_claim_inbox_walk(p_instance uuid, p_budget integer, p_in_flight uuid[])
RETURNS SETOF {{schema}}.wb_batch_row LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET enable_bitmapscan = off SET enable_sort = off SET jit = off SET enable_seqscan = off AS $$
BEGIN
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
    -- An event of this service's own event store comes with its version and position (the
    -- perspectives' EventMeta); a command, or an event received from another service, without.
    SELECT 'claim_i'::text, NULL::integer, c.message_id, c.stream_id, ev.version, ev."position", c.partition,
           c.claimed_generation, c.attempts, NULL::text, c.correlation_id, c.causation_id,
           c.message_type, c.message_kind, c.timestamp_us, c.meta, c.payload
      FROM claimed c LEFT JOIN {{schema}}.wb_events ev ON ev.message_id = c.message_id
     ORDER BY c.seq;
END;
$$;

-- The probe of wb_unheld_partitions_search: no unclaimed live row in either queue and no lease
-- that ran out while held (its two branches need one or the other) means nothing to find.
CREATE OR REPLACE FUNCTION {{schema}}.wb_unheld_partitions_with_work(p_limit integer) RETURNS integer[]
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET jit = off SET enable_seqscan = off AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM {{schema}}.wb_outbox WHERE claimed_by IS NULL AND NOT dead)
       AND NOT EXISTS (SELECT 1 FROM {{schema}}.wb_inbox WHERE claimed_by IS NULL AND NOT dead)
       AND NOT EXISTS (SELECT 1 FROM {{schema}}.wb_partition_leases
                        WHERE instance_id IS NOT NULL AND expires_at <= now()) THEN
        RETURN '{}';
    END IF;
    RETURN {{schema}}.wb_unheld_partitions_search(p_limit);
END;
$$;

-- The probe of wb_claim_outbox_walk: no row in this instance's live partitions that is neither
-- dead, nor waiting for its retry, nor in flight here means nothing to claim.
CREATE OR REPLACE FUNCTION {{schema}}.wb_claim_outbox(p_instance uuid, p_budget integer, p_in_flight uuid[])
RETURNS SETOF {{schema}}.wb_batch_row LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET enable_bitmapscan = off SET enable_sort = off SET jit = off SET enable_seqscan = off AS $$
BEGIN
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
    RETURN QUERY SELECT * FROM {{schema}}.wb_claim_outbox_walk(p_instance, p_budget, p_in_flight);
END;
$$;

-- The probe of wb_claim_inbox_walk.
CREATE OR REPLACE FUNCTION {{schema}}.wb_claim_inbox(p_instance uuid, p_budget integer, p_in_flight uuid[])
RETURNS SETOF {{schema}}.wb_batch_row LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET enable_bitmapscan = off SET enable_sort = off SET jit = off SET enable_seqscan = off AS $$
BEGIN
    IF NOT EXISTS (
           SELECT 1 FROM {{schema}}.wb_inbox i JOIN {{schema}}.wb_partition_leases m
                  ON m.partition = i.partition
            WHERE m.instance_id = p_instance AND m.expires_at > now()
              AND NOT i.dead
              AND NOT coalesce(i.next_attempt_at > now(), false)
              AND NOT coalesce(i.claimed_by = p_instance AND i.claimed_generation = m.generation
                               AND (p_in_flight IS NULL OR i.message_id = ANY (p_in_flight)), false)) THEN
        RETURN;
    END IF;
    RETURN QUERY SELECT * FROM {{schema}}.wb_claim_inbox_walk(p_instance, p_budget, p_in_flight);
END;
$$;
