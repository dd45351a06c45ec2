-- 0.1.0: dead letters, events a consumer group gave up on (see docs/durable.md).

-- Events a consumer group gave up on: undecodable, or a handler failed max_attempts times.
-- The event itself stays in the log (events_v1), referenced by id; (tx, partition) place it in
-- the group's order for redelivery. redeliver_at set: a redelivery was asked for; the group's
-- consumer that holds the partition hands the event out again before its next read, then
-- deletes the row (or, when it fails again, clears redeliver_at and adds the attempts).
CREATE TABLE pgherald.dead_letters_v1 (
    group_name text NOT NULL,
    event_id bigint NOT NULL,
    tx xid8 NOT NULL,
    channel text NOT NULL,
    partition smallint NOT NULL,
    error text NOT NULL,
    attempts integer NOT NULL,
    first_failed_at timestamptz NOT NULL,
    last_failed_at timestamptz NOT NULL,
    dead_at timestamptz NOT NULL DEFAULT now(),
    redeliver_at timestamptz,
    redeliveries integer NOT NULL DEFAULT 0,
    PRIMARY KEY (group_name, event_id)
);

-- What consumers probe once per rebalance_interval: pending redeliveries, in the group's order.
CREATE INDEX dead_letters_v1_redeliver ON pgherald.dead_letters_v1 (group_name, tx, event_id)
    WHERE redeliver_at IS NOT NULL;
