-- whizbang: takeovers told apart from other lease acquisitions. `taken_from` is the instance a
-- partition was taken from without its consent (its lease had run out, or its liveness lock was
-- free so its leases were expired), set by wb_acquire when it leases the partition and cleared by
-- the new holder's next heartbeat, which reports it (whizbang_leases_taken_over_total). A
-- partition given up (released, idle, above the fair share) has no holder, so leasing it next is
-- not a takeover.
ALTER TABLE {{schema}}.wb_partition_leases ADD COLUMN taken_from uuid;
