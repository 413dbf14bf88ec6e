-- whizbang: partition leases and instance liveness.
--
-- A partition is leased to at most one live instance; its generation (the fencing token) grows
-- every time it changes hands, and every row claim and report carries the one it was made
-- under, so a report from a lease that is gone is refused ('stale'). Lease times are the
-- database's now(), never a client's clock.
--
-- The lease fence: a writing batch must not have its partition given up while it inserts rows
-- claimed under the lease (still invisible to everyone else). Rather than lock every lease row
-- it writes into (a 1,000-unit batch would update ~1,000 lease rows), it holds a per-instance
-- advisory lock in shared mode from before its rows exist until it commits; whatever gives up
-- this instance's partitions (wb_heartbeat, wb_acquire making room, a graceful release) takes
-- it exclusively, so "no rows here" and "nothing claimed here" are never stale. Shared for
-- batches, so several batches of one instance run at once.
--
-- The liveness lock: a lease bounds how long a dead instance's partitions wait (the lease,
-- 300 s by default), which for a process that crashed is far too long. So each instance also
-- holds a session-level advisory lock of its own, in shared mode, on connections it keeps open
-- for its whole life (wb_take_liveness; the runtime holds it on a dedicated connection and on
-- its LISTEN connection, so one dropped connection does not free it). A process that dies
-- loses its connections, and with them the lock, at once; another instance's heartbeat that
-- finds the lock free takes the dead instance's partitions over exactly as if their leases had
-- run out (wb_heartbeat). The lease and its fencing token still protect against an instance
-- that is alive but stalled or cut off: its connections stay open, so its lock stays held.
--
-- Every function here runs generic plans (planned once per connection, not per call), with
-- sequential scans off: see work_batch.sql for why both. And with JIT off: a sequential scan
-- that is still the only path (the heartbeat's look at wb_instances, which has no index on
-- last_seen) is costed above jit_above_cost once sequential scans are off, so the heartbeat,
-- called on its own rather than from a batch function that already turned JIT off, compiled
-- such statements on every call: 0.6-0.7 s per heartbeat in whizbang-bench http, all of it
-- holding the instance's exclusive lock, so every writing batch of the instance waited.

-- The key of an instance's advisory lock (per schema: instances of services in other schemas
-- never wait for each other).
CREATE OR REPLACE FUNCTION {{schema}}.wb_instance_key(p_instance uuid) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT hashtextextended('whizbang-instance:{{schema}}:' || p_instance::text, 0)
$$;

-- The liveness lock's key is the two-integer form, pg_advisory_lock(class, key): a lock space
-- apart from wb_instance_key's one-bigint form (the two never meet), with the schema as the
-- class, so all the liveness locks of one schema are found in pg_locks by classid, and the
-- instance as the key. Two instances whose keys collide (a 1 in 2^32 chance per pair of one
-- schema; across schemas the classes differ too) only make each other look alive while either
-- runs: the dead one's partitions then wait for its leases, as without the lock.
CREATE OR REPLACE FUNCTION {{schema}}.wb_liveness_class() RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT hashtext('whizbang-liveness:{{schema}}')
$$;

CREATE OR REPLACE FUNCTION {{schema}}.wb_liveness_key(p_instance uuid) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT hashtext(p_instance::text)
$$;

-- Takes the liveness locks of p_instances for the calling session (shared: the instance's
-- connections hold it together) and records when (locked_at, lock_seen_at), unless another
-- session of the instance held the lock already: then it has been held without a break, and
-- locked_at (the start of that unbroken hold) stands. The instances' rows are locked first and
-- the times written before the commit: a heartbeat reads an instance's row with FOR UPDATE
-- before it looks at the lock, so it sees either the lock free and the old times or the lock
-- held and the new ones, never the lock held with times from before a loss. The caller takes
-- each lock once per session (a second take would need a second release).
CREATE OR REPLACE FUNCTION {{schema}}.wb_take_liveness(p_instances uuid[]) RETURNS void
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET jit = off SET enable_seqscan = off AS $$
DECLARE
    v_held uuid[];
BEGIN
    PERFORM 1 FROM {{schema}}.wb_instances WHERE instance_id = ANY (p_instances)
      ORDER BY instance_id FOR UPDATE;
    v_held := ARRAY(
        SELECT i FROM unnest(p_instances) AS t(i)
         WHERE EXISTS (
               SELECT 1 FROM pg_locks l
                WHERE l.locktype = 'advisory' AND l.granted AND l.mode = 'ShareLock'
                  AND l.objsubid = 2 AND l.pid <> pg_backend_pid()
                  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                  AND l.classid = {{schema}}.wb_liveness_class()::oid
                  AND l.objid = {{schema}}.wb_liveness_key(t.i)::oid));
    PERFORM pg_advisory_lock_shared({{schema}}.wb_liveness_class(), {{schema}}.wb_liveness_key(i))
       FROM unnest(p_instances) AS t(i);
    UPDATE {{schema}}.wb_instances
       SET locked_at = clock_timestamp(), lock_seen_at = clock_timestamp()
     WHERE instance_id = ANY (p_instances)
       AND (locked_at IS NULL OR NOT (instance_id = ANY (v_held)));
END;
$$;

-- Gives up the calling session's liveness locks of p_instances (a graceful stop).
CREATE OR REPLACE FUNCTION {{schema}}.wb_drop_liveness(p_instances uuid[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_unlock_shared({{schema}}.wb_liveness_class(), {{schema}}.wb_liveness_key(i))
       FROM unnest(p_instances) AS t(i);
END;
$$;

-- Leases the given partitions to p_instance where they are free, expired or already its own,
-- up to p_max per instance; at the maximum it first gives up its own partitions that hold no
-- rows at all (only when it gets the exclusive instance lock at once: with another batch of
-- the instance in flight, the room is not made this time). Its own leases are renewed only in
-- their second half (the heartbeat renews them all anyway), so a batch in the steady state
-- locks no lease row. Returns nothing; callers read the lease table.
CREATE OR REPLACE FUNCTION {{schema}}.wb_acquire(
    p_instance uuid, p_parts integer[], p_lease_s double precision, p_max integer
) RETURNS void LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET jit = off SET enable_seqscan = off AS $$
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
    -- p_max at the largest integer means no limit: the caller passes it when the instance may
    -- hold every partition (partitions.max_partitions_per_instance >= partition_count), so the
    -- limit cannot bind. The count is then skipped: it reads every lease the instance holds,
    -- thousands of rows on each call while an instance alone leases its partitions.
    IF p_max = 2147483647 THEN
        v_room := cardinality(v_want);
    ELSE
        SELECT p_max - count(*) INTO v_room
          FROM {{schema}}.wb_partition_leases WHERE instance_id = p_instance;
    END IF;
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
    -- Leased from another instance whose lease ran out: a takeover, reported by the next
    -- heartbeat (taken_from). Its own lease that ran out, or a free partition, is not one.
    INSERT INTO {{schema}}.wb_partition_leases AS l (partition, instance_id, generation, expires_at)
    SELECT p, p_instance, 1, now() + p_lease_s * interval '1 second'
      FROM unnest(v_want[1:v_room]) AS p
        ON CONFLICT (partition) DO UPDATE
       SET instance_id = p_instance,
           generation = l.generation + 1,
           expires_at = excluded.expires_at,
           taken_from = CASE WHEN l.instance_id <> p_instance THEN l.instance_id END
     WHERE l.instance_id IS NULL OR l.expires_at < now();
END;
$$;

-- Renews this instance's liveness and leases; takes over the partitions of instances whose
-- liveness lock is free (they died); gives up idle partitions at once and, above its fair share
-- (leased partitions / live instances), a few partitions with nothing in flight here; purges
-- processed dedup keys, idempotency keys and read-model records older than the retention and instances gone for ten leases; wakes every
-- instance when work became claimable.
--
-- An instance found dead by its lock has its live leases expired (expires_at = now()), nothing
-- else: from there everything is what a lease that ran out gets. The next claim of any instance
-- leases the partition under the next generation, so a report of the old holder (should it be
-- alive after all, cut off from its own connections) is refused as stale; until then the old
-- holder's own heartbeat may renew it, as it may renew a lease that ran out. Only a heartbeat
-- whose own instance holds its lock judges others, and only those known to have held their
-- lock at some moment of its own current hold (greatest(locked_at, lock_seen_at) > its
-- locked_at: they took it, or a heartbeat, theirs or another's, found it held, after it took
-- its own), or any once it has held its own for p_grace_s: after an event that dropped every
-- connection (a server restart, a failover), the first instance back must not take the lock
-- of one that is reconnecting for a death. An instance without a recorded lock (locked_at
-- NULL: an older build) is judged by its leases only.
CREATE OR REPLACE FUNCTION {{schema}}.wb_heartbeat(
    p_instance uuid, p_lease_s double precision, p_retention_s double precision,
    p_grace_s double precision DEFAULT 10
) RETURNS TABLE (live_instances integer, held integer[], released integer[], taken_over integer[])
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET jit = off SET enable_seqscan = off AS $$
DECLARE
    v_live integer;
    v_total integer;
    v_fair integer;
    v_mine integer;
    v_released integer[];
    v_excess integer;
    v_p integer;
    v_locked_at timestamptz;
    v_other record;
    v_taken_over integer[];
BEGIN
    -- Waits for this instance's batches that are writing rows into its partitions (they hold
    -- the shared lock from before their rows exist until they commit), and keeps new ones out
    -- until this transaction ends: "no rows" and "nothing claimed" below are not stale.
    PERFORM pg_advisory_xact_lock({{schema}}.wb_instance_key(p_instance));

    -- This instance's own liveness lock. The row first (a take in progress is waited for, see
    -- wb_take_liveness), then the lock. Free means every connection holding it is gone: the
    -- instance is reconnecting (or its process is dead, and this is a statement it sent before
    -- it died, run by the server after it). Either way it judges nobody, and records nothing:
    -- what a dead process's last statements write must not change how it is judged. Its
    -- leases are renewed as ever (an instance alone keeps working); others that find its lock
    -- free expire them, as for a crash.
    SELECT i.locked_at INTO v_locked_at FROM {{schema}}.wb_instances i
     WHERE i.instance_id = p_instance FOR UPDATE;
    IF v_locked_at IS NOT NULL
       AND pg_try_advisory_xact_lock({{schema}}.wb_liveness_class(),
                                     {{schema}}.wb_liveness_key(p_instance)) THEN
        v_locked_at := NULL;
    END IF;
    UPDATE {{schema}}.wb_instances
       SET last_seen = now(),
           lock_seen_at = CASE WHEN v_locked_at IS NULL THEN lock_seen_at ELSE now() END
     WHERE instance_id = p_instance;

    -- Other instances with live leases: a lock held is recorded as seen (the evidence a young
    -- judge needs, below); a lock free means dead. Nothing here waits on them: their row is
    -- skipped when locked (a take or a heartbeat of theirs is under way: alive, and no other
    -- judge is trying their lock at the same time, so a lock found held is held by them), their
    -- locks are only tried, and so are their lease rows.
    IF v_locked_at IS NOT NULL THEN
        FOR v_other IN
            SELECT i.instance_id, greatest(i.locked_at, i.lock_seen_at) AS seen
              FROM {{schema}}.wb_instances i
             WHERE i.instance_id <> p_instance AND i.locked_at IS NOT NULL
               AND EXISTS (SELECT 1 FROM {{schema}}.wb_partition_leases l
                            WHERE l.instance_id = i.instance_id AND l.expires_at > now())
             ORDER BY i.instance_id
             FOR UPDATE OF i SKIP LOCKED
        LOOP
            IF NOT pg_try_advisory_xact_lock({{schema}}.wb_liveness_class(),
                                             {{schema}}.wb_liveness_key(v_other.instance_id)) THEN
                UPDATE {{schema}}.wb_instances SET lock_seen_at = now()
                 WHERE instance_id = v_other.instance_id;
                CONTINUE;
            END IF;
            -- Free. Judged only if it held its lock at some moment of this instance's current
            -- hold of its own, or once that hold is older than the grace.
            CONTINUE WHEN NOT (v_other.seen > v_locked_at
                               OR v_locked_at < now() - p_grace_s * interval '1 second');
            -- A batch of it may outlive its process on the server, writing rows claimed under
            -- its leases (it holds this lock in shared mode until it commits): next heartbeat.
            CONTINUE WHEN NOT pg_try_advisory_xact_lock({{schema}}.wb_instance_key(v_other.instance_id));
            -- A lease row another transaction holds is skipped: next heartbeat. So is a lease a
            -- statement of the dead process renews after this (it is judged again as long as
            -- its lock is free and it has live leases).
            UPDATE {{schema}}.wb_partition_leases l SET expires_at = now()
             WHERE l.partition IN (SELECT m.partition FROM {{schema}}.wb_partition_leases m
                                    WHERE m.instance_id = v_other.instance_id
                                      AND m.expires_at > now()
                                      FOR UPDATE SKIP LOCKED);
            -- No longer counted live (by instances of this one's lease).
            UPDATE {{schema}}.wb_instances i
               SET last_seen = least(i.last_seen, now() - p_lease_s * interval '1 second')
             WHERE i.instance_id = v_other.instance_id;
        END LOOP;
    END IF;

    UPDATE {{schema}}.wb_partition_leases SET expires_at = now() + p_lease_s * interval '1 second'
     WHERE instance_id = p_instance;
    -- Partitions this instance took over since its last heartbeat (see wb_acquire): reported
    -- once, before any of them is released below.
    WITH taken AS (
        UPDATE {{schema}}.wb_partition_leases SET taken_from = NULL
         WHERE instance_id = p_instance AND taken_from IS NOT NULL
        RETURNING partition
    )
    SELECT coalesce(array_agg(partition ORDER BY partition), '{}') INTO v_taken_over FROM taken;
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
    DELETE FROM {{schema}}.wb_idempotency
     WHERE created_at < now() - p_retention_s * interval '1 second';
    DELETE FROM {{schema}}.wb_read_model_applied
     WHERE applied_at < now() - p_retention_s * interval '1 second';
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
        v_released, v_taken_over;
END;
$$;
