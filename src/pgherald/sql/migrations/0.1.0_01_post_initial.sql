-- 0.1.0: the first schema (event log, positions, publish_v1).
CREATE SCHEMA IF NOT EXISTS pgherald;

CREATE TABLE pgherald.migrations (
    name text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- The event log. Readers order by (tx, id), the writing transaction's id first, and only read
-- rows whose transaction is older than every transaction still running (the snapshot's xmin):
-- so an event whose transaction commits late can never be skipped (see docs/durable.md).
CREATE TABLE pgherald.events_v1 (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tx xid8 NOT NULL DEFAULT pg_current_xact_id(),
    channel text NOT NULL CHECK (channel <> '' AND octet_length(channel) <= 63),
    key text,
    -- 16 fixed partitions: events with the same key share one, so they stay in order within a
    -- consumer group; events without a key are spread by id.
    partition smallint GENERATED ALWAYS AS (hashtext(coalesce(key, id::text)) & 15) STORED,
    payload jsonb NOT NULL,
    headers jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX events_v1_read ON pgherald.events_v1 (partition, tx, id);
CREATE INDEX events_v1_created_at ON pgherald.events_v1 USING brin (created_at);

-- Where each consumer group is, per partition: the last (tx, id) it acknowledged.
CREATE TABLE pgherald.positions_v1 (
    group_name text NOT NULL CHECK (group_name <> ''),
    partition smallint NOT NULL CHECK (partition BETWEEN 0 AND 15),
    tx xid8 NOT NULL,
    event_id bigint NOT NULL,
    -- A group started "now" skips what had committed by then, although older transactions
    -- (anywhere on the server) may still run: the snapshot taken at its creation says what.
    skip pg_snapshot,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_name, partition)
);

-- publish: store the event in the caller's transaction and wake consumers, cheaply.
-- A NOTIFY in every writer's transaction would serialise all their commits on PostgreSQL's
-- global notify lock; instead at most one publishing transaction at a time notifies (whoever
-- holds the advisory lock), and consumers that wake keep reading briefly to catch the others.
-- No NOTIFY at all when the cluster's NOTIFY queue is half full (a stuck listener elsewhere):
-- a full queue would make this commit fail. Consumers also poll, so nothing waits forever.
CREATE FUNCTION pgherald.publish_v1(
    p_channel text, p_payload jsonb, p_key text DEFAULT NULL, p_headers jsonb DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
BEGIN
    INSERT INTO pgherald.events_v1 (channel, key, payload, headers)
    VALUES (p_channel, p_key, p_payload, p_headers)
    RETURNING id INTO v_id;
    IF pg_try_advisory_xact_lock(hashtext('pgherald.wake_v1'), 0)
       AND pg_notification_queue_usage()
           < coalesce(nullif(current_setting('pgherald.wake_max_queue_usage', true), '')::float8, 0.5)
    THEN
        PERFORM pg_notify('pgherald_wake_v1', '');
    END IF;
    RETURN v_id;
END
$$;
