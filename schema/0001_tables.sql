-- whizbang: tables of one service's schema. {{schema}} is replaced by the configured schema
-- name (validated as a plain identifier) when the migration is applied.

-- Running instances of the service; liveness by heartbeat, judged on the database clock.
CREATE TABLE {{schema}}.wb_instances (
    instance_id uuid PRIMARY KEY,
    service     text NOT NULL,
    host        text NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now()
);

-- One row per partition ever leased. instance_id NULL = free. generation is the fencing token:
-- it grows every time the partition changes hands, and every report must carry the current one.
CREATE TABLE {{schema}}.wb_partition_leases (
    partition   integer PRIMARY KEY,
    instance_id uuid,
    generation  bigint NOT NULL DEFAULT 1,
    expires_at  timestamptz
);
CREATE INDEX wb_partition_leases_instance ON {{schema}}.wb_partition_leases (instance_id);

-- Current version of each stream; the row is locked while a batch appends to the stream.
CREATE TABLE {{schema}}.wb_streams (
    stream_id text PRIMARY KEY,
    version   bigint NOT NULL
);

-- The global position counter. Appenders take their positions from it under its row lock, so
-- positions are gap-free and become visible in order (a reader never skips an event whose
-- transaction is still open).
CREATE TABLE {{schema}}.wb_position (
    id   boolean PRIMARY KEY DEFAULT true CHECK (id),
    last bigint NOT NULL
);
INSERT INTO {{schema}}.wb_position (id, last) VALUES (true, 0);

-- The event store.
CREATE TABLE {{schema}}.wb_events (
    position       bigint PRIMARY KEY,
    stream_id      text NOT NULL,
    version        bigint NOT NULL,
    message_id     uuid NOT NULL UNIQUE,
    correlation_id uuid NOT NULL,
    causation_id   uuid,
    message_type   text NOT NULL,
    timestamp_us   bigint NOT NULL,
    meta           bytea NOT NULL,
    payload        bytea NOT NULL,
    stored_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (stream_id, version)
);
CREATE INDEX wb_events_correlation ON {{schema}}.wb_events (correlation_id);

-- Messages to publish. A row leaves the table when the broker accepted it. claimed_by /
-- claimed_generation name the instance and lease it is in flight under; dead = parked after
-- max attempts (later rows of its stream wait behind it).
CREATE TABLE {{schema}}.wb_outbox (
    seq                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id         uuid NOT NULL UNIQUE,
    message_kind       text NOT NULL,
    stream_id          text NOT NULL,
    partition          integer NOT NULL,
    topic              text NOT NULL,
    correlation_id     uuid NOT NULL,
    causation_id       uuid,
    message_type       text NOT NULL,
    timestamp_us       bigint NOT NULL,
    meta               bytea NOT NULL,
    payload            bytea NOT NULL,
    attempts           integer NOT NULL DEFAULT 0,
    next_attempt_at    timestamptz,
    last_error         text,
    claimed_by         uuid,
    claimed_generation bigint,
    dead               boolean NOT NULL DEFAULT false,
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX wb_outbox_stream ON {{schema}}.wb_outbox (stream_id, seq);
CREATE INDEX wb_outbox_partition ON {{schema}}.wb_outbox (partition, seq);
CREATE INDEX wb_outbox_correlation ON {{schema}}.wb_outbox (correlation_id);

-- Messages to process here (events for perspectives, commands for receptors). A row leaves
-- the table when processed; its id stays in wb_dedup.
CREATE TABLE {{schema}}.wb_inbox (
    seq                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id         uuid NOT NULL UNIQUE,
    message_kind       text NOT NULL,
    stream_id          text NOT NULL,
    partition          integer NOT NULL,
    correlation_id     uuid NOT NULL,
    causation_id       uuid,
    message_type       text NOT NULL,
    timestamp_us       bigint NOT NULL,
    meta               bytea NOT NULL,
    payload            bytea NOT NULL,
    attempts           integer NOT NULL DEFAULT 0,
    next_attempt_at    timestamptz,
    last_error         text,
    claimed_by         uuid,
    claimed_generation bigint,
    dead               boolean NOT NULL DEFAULT false,
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX wb_inbox_stream ON {{schema}}.wb_inbox (stream_id, seq);
CREATE INDEX wb_inbox_partition ON {{schema}}.wb_inbox (partition, seq);
CREATE INDEX wb_inbox_correlation ON {{schema}}.wb_inbox (correlation_id);

-- Every inbox message id ever received. Inserted before the inbox row (its unique key is what
-- makes two concurrent deliveries of one message collide); processed_at set when done; purged
-- after the retention period.
CREATE TABLE {{schema}}.wb_dedup (
    message_id     uuid PRIMARY KEY,
    correlation_id uuid NOT NULL,
    received_at    timestamptz NOT NULL DEFAULT now(),
    processed_at   timestamptz
);
CREATE INDEX wb_dedup_processed ON {{schema}}.wb_dedup (processed_at) WHERE processed_at IS NOT NULL;
CREATE INDEX wb_dedup_correlation ON {{schema}}.wb_dedup (correlation_id);

-- How far each perspective has read the event store (for resume and rebuild).
CREATE TABLE {{schema}}.wb_perspective_checkpoints (
    perspective text PRIMARY KEY,
    position    bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- The stable stream -> partition hash, the same function as whizbang::routing::partition_of
-- (FNV-1a 64-bit over the UTF-8 bytes, modulo the partition count), for operators' queries.
CREATE FUNCTION {{schema}}.wb_partition_of(p_stream text, p_count integer) RETURNS integer
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    h numeric := 14695981039346656037;
    b integer;
    bytes bytea := convert_to(p_stream, 'UTF8');
BEGIN
    FOR i IN 0 .. length(bytes) - 1 LOOP
        b := get_byte(bytes, i);
        -- xor of the low byte, then multiply modulo 2^64 (numeric avoids bigint overflow).
        h := h - mod(h, 256) + (mod(h, 256)::integer # b);
        h := mod(h * 1099511628211, 18446744073709551616);
    END LOOP;
    RETURN mod(h, p_count)::integer;
END;
$$;
