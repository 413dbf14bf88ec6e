-- whizbang: the tables, indexes and types of one service's schema, applied once and recorded
-- with its checksum in wb_migrations. {{schema}} is replaced by the configured schema name
-- (validated as a plain identifier). The functions live in schema/functions/, re-applied
-- whenever their text changes; this file must not define any.

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
-- Every append rewrites its stream's row, and the version a batch replaces stays visible to
-- the batch running beside it (a batch is one statement holding its snapshot to the end): on
-- packed pages the new version went to another page, with a new index entry and a dead tuple
-- each time. Pages filled to 40% leave room for the versions still in view, so the update is
-- HOT (no index entry, pruned on the page). The cost is a table about 2.5 times larger than
-- packed, of one short row per stream.
CREATE TABLE {{schema}}.wb_streams (
    stream_id text PRIMARY KEY,
    version   bigint NOT NULL
) WITH (fillfactor = 40);

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
-- The rows nobody has claimed: the search for partitions with work nobody holds skips through
-- it one partition at a time instead of reading the queue.
CREATE INDEX wb_outbox_unclaimed ON {{schema}}.wb_outbox (partition) WHERE claimed_by IS NULL;

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
CREATE INDEX wb_inbox_unclaimed ON {{schema}}.wb_inbox (partition) WHERE claimed_by IS NULL;

-- Every inbox message id ever received. Inserted before the inbox row (its unique key is what
-- makes two concurrent deliveries of one message collide); processed_at set when done; purged
-- after the retention period (counted from receipt, once processed). processed_at is not
-- indexed and pages are filled to 70%, so marking a key processed is a HOT update: no index
-- entries, and the old version is pruned on its page.
CREATE TABLE {{schema}}.wb_dedup (
    message_id     uuid PRIMARY KEY,
    correlation_id uuid NOT NULL,
    received_at    timestamptz NOT NULL DEFAULT now(),
    processed_at   timestamptz
) WITH (fillfactor = 70);
CREATE INDEX wb_dedup_received ON {{schema}}.wb_dedup (received_at);
CREATE INDEX wb_dedup_correlation ON {{schema}}.wb_dedup (correlation_id);

-- How far each perspective has read the event store (for resume and rebuild).
CREATE TABLE {{schema}}.wb_perspective_checkpoints (
    perspective text PRIMARY KEY,
    position    bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- One row of a batch's answer; `kind` says which fields are set.
--   appended   unit, message_id, stream_id, version, position
--   appended_v position (= the batch's last position), payload (= each appended stream's new
--              version, in the caller's s_stream order, as a binary bigint[]): the whole
--              batch's appends in one row, when the caller's numbering was used
--   conflict   unit, stream_id, version (= expected, -1 for "no stream"), position (= actual)
--   dup        unit, message_id                         (inbox row seen before)
--   wclaim_o / wclaim_i   message_id, partition, generation   (new row leased to the writer)
--   wclaims_o  payload (= ids, binary uuid[]), meta (= generations, binary bigint[]): the
--              outbox rows leased to the writer, in one row; partitions are the caller's
--   claim_o / claim_i     the whole row                        (pending row claimed)
--   stale      message_id                               (report refused by fencing)
--   dead       message_id                               (dead-lettered in this batch)
--   retry      version (= milliseconds until the soonest failed row of this batch is due)
CREATE TYPE {{schema}}.wb_batch_row AS (
    kind           text,
    unit           integer,
    message_id     uuid,
    stream_id      text,
    version        bigint,
    "position"     bigint,
    partition      integer,
    generation     bigint,
    attempts       integer,
    topic          text,
    correlation_id uuid,
    causation_id   uuid,
    message_type   text,
    message_kind   text,
    timestamp_us   bigint,
    meta           bytea,
    payload        bytea
);
