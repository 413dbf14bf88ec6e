-- whizbang: exactly-once read models. One row per (read model, event) applied through
-- Store::apply_once or inline with a command (Store::commit_inline), inserted in the same
-- transaction as the read model's own writes: both commit or neither, so after any crash an
-- event whose row exists is not applied again. The insert comes first in that transaction: a
-- second instance applying the same event waits on the primary key for the first's
-- transaction, then finds the row and skips the event. Purged by the heartbeat after
-- store.dedup_retention_hours, counted from applied_at, with the inbox dedup records.
CREATE TABLE {{schema}}.wb_read_model_applied (
    read_model text NOT NULL,
    message_id uuid NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (read_model, message_id)
);
CREATE INDEX wb_read_model_applied_at ON {{schema}}.wb_read_model_applied (applied_at);
