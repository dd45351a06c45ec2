-- 0.1.0: positions per (group, channel, partition), reads filtered by channel in the database
-- (see docs/durable.md). Stop consumers of earlier versions before this runs: they use
-- positions_v1, which goes.

-- The read index leads with the channel: a group reads its own channels' events only, so its
-- read and lag cost nothing for other channels' events.
DROP INDEX pgherald.events_v1_read;
CREATE INDEX events_v1_read ON pgherald.events_v1 (channel, partition, tx, id);

-- The channels the log holds events of: one index probe each (a loose scan of the read index,
-- which leads with the channel), however many events.
CREATE FUNCTION pgherald.log_channels_v1() RETURNS SETOF text
LANGUAGE sql STABLE ROWS 100 AS $$
    WITH RECURSIVE c(channel) AS (
        (SELECT channel FROM pgherald.events_v1 ORDER BY channel LIMIT 1)
        UNION ALL
        SELECT (SELECT e.channel FROM pgherald.events_v1 AS e WHERE e.channel > c.channel
                ORDER BY e.channel LIMIT 1)
        FROM c WHERE c.channel IS NOT NULL
    )
    SELECT channel FROM c WHERE channel IS NOT NULL
$$;

-- Where each consumer group is, per channel and partition: the last (tx, id) it acknowledged.
-- channel '' is the group's start: where a channel the group has not read yet begins (its
-- rows are copied from these when a consumer first reads it). Nothing is lost in the move:
-- each group's position per partition becomes its start, so every channel it read goes on
-- from where it was.
CREATE TABLE pgherald.positions_v2 (
    group_name text NOT NULL CHECK (group_name <> ''),
    channel text NOT NULL CHECK (octet_length(channel) <= 63),
    partition smallint NOT NULL CHECK (partition BETWEEN 0 AND 255),
    tx xid8 NOT NULL,
    event_id bigint NOT NULL,
    -- A group started "now" skips what had committed by then, although older transactions
    -- (anywhere on the server) may still run: the snapshot taken at its creation says what.
    skip pg_snapshot,
    updated_at timestamptz NOT NULL DEFAULT now(),
    -- On the start rows: the group's consumers read every channel (so `status` counts the
    -- channels they have not read yet as lag too).
    every_channel boolean NOT NULL DEFAULT false,
    PRIMARY KEY (group_name, channel, partition)
);

INSERT INTO pgherald.positions_v2 (group_name, channel, partition, tx, event_id, skip, updated_at)
SELECT group_name, '', partition, tx, event_id, skip, updated_at FROM pgherald.positions_v1;

DROP TABLE pgherald.positions_v1;
