-- whizbang: a processed inbox message's dedup key is updated in place (HOT), with no index
-- entries.
--
-- A processed inbox row leaves wb_inbox and its dedup key gets its processed_at. processed_at
-- was indexed (for the retention purge), so that update could never be a HOT update: every
-- processed message wrote a new dedup tuple plus an entry in each of its three indexes, beside
-- the inbox row's delete. Now:
-- 1. processed_at is not indexed; the purge finds old keys by received_at (the retention is
--    counted from receipt, and a key is purged only once its message was processed);
-- 2. dedup pages are filled to 70%, so the updated tuple fits on its page (HOT: no index
--    entries; the dead version is pruned on the page). Pages written before this migration
--    keep their old fill.
-- wb_heartbeat is 0004's with the purge changed as 1. says.

DROP INDEX {{schema}}.wb_dedup_processed;
CREATE INDEX wb_dedup_received ON {{schema}}.wb_dedup (received_at);
ALTER TABLE {{schema}}.wb_dedup SET (fillfactor = 70);

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
     WHERE received_at < now() - p_retention_s * interval '1 second' AND processed_at IS NOT NULL;
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
