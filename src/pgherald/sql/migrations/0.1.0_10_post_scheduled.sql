-- 0.1.0: delayed events (publish(..., deliver_at=...)) and periodic schedules (see docs/durable.md).

-- Delayed events wait here, not in the log: a group's position passes every (tx, id) that is
-- older than every running transaction, so an event stored early would be skipped. When due,
-- one statement (queries.sql release_scheduled) deletes them here and inserts them into
-- events_v1 in its own, new transaction: each is released exactly once.
CREATE TABLE pgherald.scheduled_v1 (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    deliver_at timestamptz NOT NULL,
    channel text NOT NULL CHECK (channel <> '' AND octet_length(channel) <= 63),
    key text,
    payload jsonb NOT NULL,
    headers jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX scheduled_v1_due ON pgherald.scheduled_v1 (deliver_at, id);

-- Periodic events (`pgherald schedule add`): next_tick is the next time to publish. Whoever
-- moves next_tick on (UPDATE ... WHERE next_tick = the tick it saw) publishes that tick, in the
-- same statement: one event per tick however many runners.
CREATE TABLE pgherald.schedules_v1 (
    name text PRIMARY KEY CHECK (name <> ''),
    cron text NOT NULL,
    timezone text NOT NULL DEFAULT 'UTC',
    channel text NOT NULL CHECK (channel <> '' AND octet_length(channel) <= 63),
    key text,
    payload jsonb NOT NULL,
    headers jsonb,
    next_tick timestamptz NOT NULL,
    last_tick timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
