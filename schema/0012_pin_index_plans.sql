-- whizbang: the work functions keep their index plans after the queue tables are vacuumed empty.
--
-- The functions run generic plans (plan_cache_mode = force_generic_plan), made once per
-- connection and made again whenever a table they read changes in pg_class. A VACUUM of a
-- drained wb_outbox or wb_inbox is such a change, and it truncates the table to zero pages: the
-- planner then believes the table empty and plans a sequential scan for each per-row probe
-- (the order probe of the writer's inserts, above all). The plan is kept while the table fills
-- up again under load, so every inserted row reads every queued row: measured on 2026-11-29, a
-- batch of 1,000 events behind 1,000 queued rows took 127 ms instead of 11, and the bench's
-- throughput fell from ~30,000 to ~5,000 events/s (server CPU 40 -> 330 us per event). With
-- autovacuum on, as on any production server, this happens whenever a queue drains. Every
-- statement of these functions is meant to go through an index; where none applies (a scan of
-- a small table, or the rare recovery of an instance's own claims), the planner still picks
-- the cheapest path it has.
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure
          FROM pg_proc p
         -- regnamespace folds the name as the unquoted {{schema}} of the other statements does.
         WHERE p.pronamespace = '{{schema}}'::regnamespace
           AND p.proname IN ('wb_process_work_batch', 'wb_process_one_message', 'wb_acquire',
                             'wb_heartbeat', 'wb_claim_outbox', 'wb_claim_inbox',
                             'wb_claim_outbox_walk', 'wb_claim_inbox_walk',
                             'wb_unheld_partitions_with_work', 'wb_unheld_partitions_search')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET enable_seqscan = off', f);
    END LOOP;
END;
$$;
