-- Named queries: each block starts with a line "-- name: <name> --" and runs to the next one.
-- Values are always bound parameters (%(name)s); no identifier is ever formatted in.

-- name: publish --
-- pgherald.publish_v1 as one plain statement: no PL/pgSQL call, no INSERT through SPI (a
-- tenth of a one-event transaction's server time). Same insert, same wake-up gate (one
-- notifying transaction at a time; none when the NOTIFY queue is over the configured usage;
-- CASE fixes the order): keep both in step, publish_v1 stays the reference (triggers call it).
WITH e AS (
    INSERT INTO pgherald.events_v1 (channel, key, payload, headers)
    VALUES (%(channel)s, %(key)s, CAST(%(payload)s AS jsonb), CAST(%(headers)s AS jsonb))
    RETURNING id
)
SELECT e.id,
       CASE WHEN pg_try_advisory_xact_lock(hashtext('pgherald.wake_v1'), 0) THEN
           CASE WHEN pg_notification_queue_usage() < coalesce(CAST(nullif(
                    current_setting('pgherald.wake_max_queue_usage', true), '') AS float8), 0.5)
           THEN pg_notify('pgherald_wake_v1', '') END
       END
FROM e

-- name: schema_installed --
SELECT to_regclass('pgherald.events_v1') IS NOT NULL
   AND to_regprocedure('pgherald.publish_v1(text, jsonb, text, jsonb)') IS NOT NULL

-- name: applied_migrations --
SELECT name FROM pgherald.migrations ORDER BY name

-- name: record_migration --
INSERT INTO pgherald.migrations (name) VALUES (%(name)s) ON CONFLICT (name) DO NOTHING

-- name: uninstall --
DROP SCHEMA IF EXISTS pgherald CASCADE

-- name: create_group --
-- A new group starts at the given position in every partition; an existing one is untouched.
INSERT INTO pgherald.positions_v1 (group_name, partition, tx, event_id, skip)
SELECT %(group)s, p, CAST(%(tx)s AS xid8), %(event_id)s, CAST(%(skip)s AS pg_snapshot)
FROM generate_series(0, 15) AS p
ON CONFLICT (group_name, partition) DO NOTHING

-- name: reset_group --
UPDATE pgherald.positions_v1
SET tx = CAST(%(tx)s AS xid8), event_id = %(event_id)s, skip = CAST(%(skip)s AS pg_snapshot),
    updated_at = now()
WHERE group_name = %(group)s

-- name: position_now --
-- Everything committed before now is behind us: older transactions than the snapshot's xmin
-- are all finished; anything newer is still to come.
SELECT pg_snapshot_xmin(pg_current_snapshot())::text, 0::bigint, pg_current_snapshot()::text

-- name: position_before_id --
SELECT tx::text, id - 1 FROM pgherald.events_v1 WHERE id = %(id)s

-- name: position_before_time --
SELECT tx::text, id - 1 FROM pgherald.events_v1 WHERE created_at >= %(at)s
ORDER BY tx, id LIMIT 1

-- name: read_batch --
-- The next events of a group in the partitions it holds, in (tx, id) order, only from
-- transactions older than every running one: nothing committed later can sort before them.
-- Each partition is read after the consumer's own cursor when it passes one (txs/ids, so that
-- it can read the next batch before acknowledging this one), else after the stored position
-- (NULL). per_partition keeps each partition's index scan short (the caller adapts it, so that
-- about `limit` rows are read in all, not `limit` per partition).
SELECT e.id, e.tx::text, e.channel, e.key, e.payload::text, e.headers::text, e.created_at,
       e.partition
FROM unnest(CAST(%(partitions)s AS smallint[]), CAST(%(txs)s AS xid8[]),
            CAST(%(ids)s AS bigint[])) AS c(partition, tx, event_id)
JOIN pgherald.positions_v1 AS p ON p.group_name = %(group)s AND p.partition = c.partition
CROSS JOIN LATERAL (
    SELECT * FROM pgherald.events_v1 AS e
    WHERE e.partition = p.partition
      AND (e.tx, e.id) > (coalesce(c.tx, p.tx), coalesce(c.event_id, p.event_id))
      AND e.tx < pg_snapshot_xmin(pg_current_snapshot())
      AND (p.skip IS NULL OR NOT pg_visible_in_snapshot(e.tx, p.skip))
    ORDER BY e.tx, e.id
    LIMIT CAST(%(per_partition)s AS integer)
) AS e
ORDER BY e.tx, e.id
LIMIT CAST(%(limit)s AS integer)

-- name: ack --
UPDATE pgherald.positions_v1 AS p
SET tx = v.tx::xid8, event_id = v.event_id, updated_at = now()
FROM unnest(%(partitions)s::smallint[], %(txs)s::text[], %(ids)s::bigint[])
     AS v(partition, tx, event_id)
WHERE p.group_name = %(group)s AND p.partition = v.partition

-- name: group_members --
-- Live consumers of a group: sessions holding its shared membership lock.
SELECT count(DISTINCT pid) FROM pg_locks
WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND classid = (hashtext(%(lock_name)s)::bigint & 4294967295)::oid
  AND objid = 1000 AND objsubid = 2 AND granted

-- name: status --
SELECT p.group_name,
       count(*) FILTER (WHERE e.id IS NOT NULL) AS lag_events,
       extract(epoch FROM now() - min(e.created_at)) AS lag_seconds,
       max(p.updated_at) AS updated_at,
       max(p.event_id) AS last_event_id
FROM pgherald.positions_v1 AS p
LEFT JOIN pgherald.events_v1 AS e
       ON e.partition = p.partition AND (e.tx, e.id) > (p.tx, p.event_id)
      AND (p.skip IS NULL OR NOT pg_visible_in_snapshot(e.tx, p.skip))
GROUP BY p.group_name
ORDER BY p.group_name

-- name: queue_usage --
SELECT pg_notification_queue_usage(), (SELECT count(*) FROM pgherald.events_v1),
       (SELECT max(id) FROM pgherald.events_v1)

-- name: prune --
-- Events older than the cutoff that every group has passed (unless forced).
DELETE FROM pgherald.events_v1 AS e
WHERE e.created_at < %(before)s
  AND (%(force)s OR NOT EXISTS (
        SELECT 1 FROM pgherald.positions_v1 AS p
        WHERE p.partition = e.partition AND (e.tx, e.id) > (p.tx, p.event_id)
          AND (p.skip IS NULL OR NOT pg_visible_in_snapshot(e.tx, p.skip))))
