-- whizbang: idempotent commands. One row per idempotency key a caller gave a command
-- (DispatchOptions::idempotency_key), written by the work batch in the same transaction as the
-- command's events and queue rows (or alone, for a refusal): the key, the hash of the command's
-- type and body, the first outcome as the dispatcher encoded it, and the ids of the events that
-- outcome appended (their versions and positions are read from wb_events). The primary key is
-- where two concurrent dispatches with one key collide: the second insert waits for the first
-- transaction and then finds the key taken, and its unit writes nothing. Purged by the
-- heartbeat after store.dedup_retention_hours, counted from created_at.
CREATE TABLE {{schema}}.wb_idempotency (
    idempotency_key text PRIMARY KEY,
    request_hash    bytea NOT NULL,
    outcome         bytea NOT NULL,
    event_ids       uuid[] NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX wb_idempotency_created ON {{schema}}.wb_idempotency (created_at);
