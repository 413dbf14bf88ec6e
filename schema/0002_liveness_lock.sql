-- whizbang: an instance's liveness lock, recorded beside its heartbeat.
--
-- Each instance holds a session-level advisory lock of its own (see wb_take_liveness in
-- functions/leases.sql) on connections it keeps open for its whole life; a process that dies
-- loses them, and the lock with them, at once. Another instance's heartbeat that finds the lock
-- free takes the dead instance's partitions over as if their leases had run out.
--
-- locked_at:    when the lock was taken, or taken again after every connection holding it was
--               lost (the start of the hold it is in, if it is held), on the database clock.
--               NULL: the instance holds no liveness lock (an instance of an older build) and is
--               judged by its leases only, as before this file.
-- lock_seen_at: the last time the lock was known held (taken, or found held by a heartbeat of
--               the instance or of another). A heartbeat judges another instance by its lock
--               only when that instance held it while the judge held its own (wb_heartbeat).
ALTER TABLE {{schema}}.wb_instances
    ADD COLUMN locked_at    timestamptz,
    ADD COLUMN lock_seen_at timestamptz;
