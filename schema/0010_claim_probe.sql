-- whizbang: a claim with nothing to take costs a probe, not the claim.
--
-- A work batch that claims runs three statements besides its own: the search for partitions
-- with work nobody holds and the two claims (all 0005's). Each is a large plan (recursive CTEs,
-- unions, row locks, a window, an update and its indexes), and starting and ending such a plan
-- costs far more than running it over empty queues: on an idle 2-core machine 60-80 us each,
-- ~250 us for the batch, against 5-14 us for a plain EXISTS probe. Most claims find nothing
-- (the idle instance's fallback poll, the claim after completions when the queue holds only
-- rows in flight here), so each now probes first and returns at once when nothing could be
-- taken:
-- 1. the search: no unclaimed live row in either queue and no lease that ran out while held
--    (its two branches need one or the other);
-- 2. each claim: no row in this instance's live partitions that is neither dead, nor waiting
--    for its retry, nor in flight here (the walk's own conditions, less the held-back probe,
--    which only removes rows; so the probe finds a row whenever the walk would).
-- 0005's functions keep their bodies under new names (`…_walk`, `…_search`); the old names are
-- the probes, which call them when the probe finds something. A claim that does find work pays
-- the probe and one more function call; a claim of nothing no longer pays the plan.

ALTER FUNCTION {{schema}}.wb_unheld_partitions_with_work(integer)
    RENAME TO wb_unheld_partitions_search;
ALTER FUNCTION {{schema}}.wb_claim_outbox(uuid, integer, uuid[]) RENAME TO wb_claim_outbox_walk;
ALTER FUNCTION {{schema}}.wb_claim_inbox(uuid, integer, uuid[]) RENAME TO wb_claim_inbox_walk;

CREATE FUNCTION {{schema}}.wb_unheld_partitions_with_work(p_limit integer) RETURNS integer[]
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET jit = off AS $$
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

CREATE FUNCTION {{schema}}.wb_claim_outbox(p_instance uuid, p_budget integer, p_in_flight uuid[])
RETURNS SETOF {{schema}}.wb_batch_row LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET enable_bitmapscan = off SET enable_sort = off SET jit = off AS $$
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

CREATE FUNCTION {{schema}}.wb_claim_inbox(p_instance uuid, p_budget integer, p_in_flight uuid[])
RETURNS SETOF {{schema}}.wb_batch_row LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET enable_bitmapscan = off SET enable_sort = off SET jit = off AS $$
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
