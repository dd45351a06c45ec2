-- Named queries: each block starts with a line "-- name: <name> --" and runs to the next one.
-- Values are always bound parameters (%(name)s); no identifier is ever formatted in.

-- name: publish --
-- pgherald.publish_v1 as one plain statement: no PL/pgSQL call, no INSERT through SPI (a
-- tenth of a one-event transaction's server time). The same insert and the same probe: a
-- consumer waits when the try of this session's key fails, and only then wake_v1 (the gate,
-- the note, the skip count) runs; kept out of the statement, its expressions cost nothing
-- when nobody waits. The probe sits in RETURNING: no CTE to scan. Keep it in step with
-- publish_v1, the reference (users call it; triggers inline the same probe).
INSERT INTO pgherald.events_v1 (channel, key, payload, headers)
VALUES (%(channel)s, %(key)s, CAST(%(payload)s AS jsonb), CAST(%(headers)s AS jsonb))
RETURNING id,
    CASE WHEN pg_try_advisory_lock(hashtext('pgherald.wake_v1'), 2 + mod(pg_backend_pid(), 16)) THEN
        CASE WHEN pg_advisory_unlock(hashtext('pgherald.wake_v1'), 2 + mod(pg_backend_pid(), 16)) THEN CAST(NULL AS void) END
    ELSE pgherald.wake_v1(id, created_at)
    END

-- name: publish_many --
-- `publish` for many events in one statement: the same insert and the same probe (keep them
-- in step with publish), tried once for the whole batch. The payloads come as one JSON
-- array (a text[] of JSON costs twice the whole statement in quoting), the keys (one per
-- payload, else NULL) as another; rows go in payload order (ORDER BY n), so the identity ids
-- follow it: ids sorted = payload order. An array of another length than count (a custom
-- dumps that wrote two values) inserts nothing.
-- MATERIALIZED: the array is parsed once, also under a generic plan.
WITH d AS MATERIALIZED (SELECT CAST(%(payloads)s AS jsonb) AS doc),
e AS (
    INSERT INTO pgherald.events_v1 (channel, key, payload, headers)
    SELECT %(channel)s, coalesce(v.k, CAST(%(key)s AS text)), v.p, CAST(%(headers)s AS jsonb)
    FROM d,
         ROWS FROM (jsonb_array_elements(d.doc),
                    jsonb_array_elements_text(CAST(%(keys)s AS jsonb)))
         WITH ORDINALITY AS v(p, k, n)
    WHERE jsonb_array_length(d.doc) = %(count)s
    ORDER BY v.n
    RETURNING id
)
SELECT ids.ids,
       CASE WHEN ids.ids IS NULL THEN CAST(NULL AS void)
       WHEN pg_try_advisory_lock(hashtext('pgherald.wake_v1'), 2 + mod(pg_backend_pid(), 16)) THEN
           CASE WHEN pg_advisory_unlock(hashtext('pgherald.wake_v1'), 2 + mod(pg_backend_pid(), 16)) THEN CAST(NULL AS void) END
       ELSE pgherald.wake_v1(NULL, NULL)  -- a plain wake-up: many events, no note
       END
FROM (SELECT array_agg(id ORDER BY id) AS ids FROM e) AS ids

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
-- A new group starts at the given position in every partition (its start rows, channel ''); an
-- existing one is untouched.
INSERT INTO pgherald.positions_v2 (group_name, channel, partition, tx, event_id, skip)
SELECT %(group)s, '', p, CAST(%(tx)s AS xid8), %(event_id)s, CAST(%(skip)s AS pg_snapshot)
FROM generate_series(0, pgherald.partition_count_v1() - 1) AS p
ON CONFLICT (group_name, channel, partition) DO NOTHING

-- name: register_channels --
-- Channels a consumer of the group reads: those it has not read before begin at the group's
-- start (a channel added to a group gets its whole backlog, from the start on).
INSERT INTO pgherald.positions_v2 (group_name, channel, partition, tx, event_id, skip)
SELECT s.group_name, c.channel, s.partition, s.tx, s.event_id, s.skip
FROM pgherald.positions_v2 AS s
CROSS JOIN unnest(CAST(%(channels)s AS text[])) AS c(channel)
WHERE s.group_name = %(group)s AND s.channel = ''
ON CONFLICT (group_name, channel, partition) DO NOTHING

-- name: every_channel --
-- Whether the group's consumers read every channel (see positions_v2.every_channel).
UPDATE pgherald.positions_v2 SET every_channel = CAST(%(every)s AS boolean)
WHERE group_name = %(group)s AND channel = '' AND every_channel <> CAST(%(every)s AS boolean)

-- name: log_channels --
-- The channels the log holds events of, and those the group has read (NULL group: none).
SELECT channel FROM pgherald.log_channels_v1() AS channel
UNION
SELECT DISTINCT channel FROM pgherald.positions_v2
WHERE group_name = %(group)s AND channel <> ''

-- name: reset_group --
-- Every channel of the group, and its start, to the given position.
UPDATE pgherald.positions_v2
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
-- The next events of a group on its channels in the partitions it holds, in (tx, id) order,
-- only from transactions older than every running one: nothing committed later can sort
-- before them. One index range per (channel, partition) (events_v1_read), so other channels'
-- events cost nothing. Each is read after the consumer's own cursor when it passes one
-- (txs/ids, so that it can read the next batch before acknowledging this one), else after the
-- stored position (NULL). shares keeps each range short (the caller sizes them by each
-- range's rate, so that about `limit` rows are read in all, not `limit` per range). The
-- consumer's session disables bitmap and sequential scans (see consumer.py _SETTINGS), so that
-- each range is a merge of ordered index scans over the day partitions that stops at its share.
-- The last column numbers each row's range (1 = the arrays' first): one value per row for the
-- consumer to count rows by range with, before it decodes them.
SELECT e.id, e.tx::text, e.channel, e.key, e.payload::text, e.headers::text, e.created_at,
       e.partition, c.n
FROM unnest(CAST(%(channels)s AS text[]), CAST(%(partitions)s AS smallint[]),
            CAST(%(txs)s AS xid8[]), CAST(%(ids)s AS bigint[]), CAST(%(shares)s AS integer[]))
     WITH ORDINALITY AS c(channel, partition, tx, event_id, share, n)
JOIN pgherald.positions_v2 AS p
  ON p.group_name = %(group)s AND p.channel = c.channel AND p.partition = c.partition
CROSS JOIN LATERAL (
    SELECT * FROM pgherald.events_v1 AS e
    WHERE e.channel = c.channel AND e.partition = p.partition
      AND (e.tx, e.id) > (coalesce(c.tx, p.tx), coalesce(c.event_id, p.event_id))
      AND e.tx < pg_snapshot_xmin(pg_current_snapshot())
      AND (p.skip IS NULL OR NOT pg_visible_in_snapshot(e.tx, p.skip))
    ORDER BY e.tx, e.id
    LIMIT c.share
) AS e
ORDER BY e.tx, e.id
LIMIT CAST(%(limit)s AS integer)

-- name: ack --
-- Forward only: an acknowledgement that comes late (a consumer's deferred ones, see
-- consumer.py ack_delay) never moves a position back past a dead letter or a reset. Returns
-- the transaction's id: the consumer's own, which publishes nothing (wake-up notes list the
-- transactions still running when an event was stored).
WITH a AS (
UPDATE pgherald.positions_v2 AS p
SET tx = v.tx::xid8, event_id = v.event_id, updated_at = now()
FROM unnest(%(channels)s::text[], %(partitions)s::smallint[], %(txs)s::text[],
            %(ids)s::bigint[]) AS v(channel, partition, tx, event_id)
WHERE p.group_name = %(group)s AND p.channel = v.channel AND p.partition = v.partition
  AND (p.tx, p.event_id) < (v.tx::xid8, v.event_id)
RETURNING 1
)
SELECT pg_current_xact_id_if_assigned()::text, count(*) FROM a

-- name: group_members --
-- Live consumers of a group: sessions holding its shared membership lock; and how many of
-- them have a lower pid than ours (our rank: the first `partitions % members` take one more).
SELECT count(DISTINCT pid), count(DISTINCT pid) FILTER (WHERE pid < pg_backend_pid())
FROM pg_locks
WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND classid = (hashtext(%(lock_name)s)::bigint & 4294967295)::oid
  AND objid = 1000 AND objsubid = 2 AND granted

-- name: join_group --
-- Membership: a shared session lock (second key 1000; partitions use 0..15), so the number of
-- live members is read from pg_locks, and a dead member's locks vanish with its session.
SELECT pg_advisory_lock_shared(hashtext(%(lock_name)s), 1000)

-- name: end_previous_session --
-- After a connection was given up (half-open: the server may not know yet), end its session
-- and wait (up to wait_ms) for it to be gone: a consumer's partition locks go now rather than
-- when the server's TCP keepalive notices, and a COMMIT still on the way (`cdc run
-- --into-log`'s log) finds no session to commit in. Only the session it was: same pid and
-- application name (pgwire.identity, taken at connection). No row: it is gone already;
-- false: still there after the wait. Raises when this role may not end it.
SELECT pg_terminate_backend(a.pid, CAST(%(wait_ms)s AS bigint)) FROM pg_stat_activity AS a
WHERE a.pid = CAST(%(pid)s AS int) AND a.pid <> pg_backend_pid()
  AND a.application_name = %(application_name)s

-- name: try_lock_partition --
SELECT pg_try_advisory_lock(hashtext(%(lock_name)s), %(partition)s)

-- name: unlock_partition --
SELECT pg_advisory_unlock(hashtext(%(lock_name)s), %(partition)s)

-- name: queue_usage --
SELECT pg_notification_queue_usage(), (SELECT count(*) FROM pgherald.events_v1),
       (SELECT max(id) FROM pgherald.events_v1)

-- name: prune --
-- Events older than the cutoff that every group reading their channel has passed (unless
-- forced), but the groups in `ignore` (abandoned ones: see abandoned_groups).
DELETE FROM pgherald.events_v1 AS e
WHERE e.created_at < %(before)s
  AND (%(force)s OR NOT EXISTS (
        SELECT 1 FROM pgherald.positions_v2 AS p
        WHERE p.channel = e.channel AND p.partition = e.partition
          AND (e.tx, e.id) > (p.tx, p.event_id)
          AND (p.skip IS NULL OR NOT pg_visible_in_snapshot(e.tx, p.skip))
          AND p.group_name <> ALL (CAST(%(ignore)s AS text[]))))

-- name: read_log --
-- The log after position (after_tx, after_id), in (tx, id) order, and only from transactions
-- older than every running one (as read_batch): nothing committed later can sort before what
-- this returns. Optional: up to (upto_tx, upto_id) inclusive, only some channels (NULL: every
-- channel the log holds, found by a loose scan of the read index: one probe per channel).
-- Read per (channel, partition) over events_v1_read: each LATERAL is one short index range,
-- so a read that finds nothing costs 16 index probes per channel however long the log. The
-- position is given as values, not looked up here: the planner then sees how little lies
-- after it (from the column statistics), and does not JIT-compile a poll that finds nothing
-- (10 ms at 10 M events). Each range gives at most per_partition rows (the caller stops at the
-- first range cut short, see logread.read). The casts sit above the LIMIT: computed for the
-- rows returned only. horizon is the snapshot's xmin: a read that returns fewer than `limit`
-- events, no range cut short, has seen everything before (horizon, 0). No events: one row,
-- its event columns NULL.
WITH h AS MATERIALIZED (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS horizon),
c AS MATERIALIZED (
    SELECT unnest(CAST(%(channels)s AS text[])) AS channel
    UNION ALL
    SELECT channel FROM pgherald.log_channels_v1() AS channel
    WHERE CAST(%(channels)s AS text[]) IS NULL
)
SELECT h.horizon::text, r.id, r.tx::text, r.channel, r.key, r.payload::text, r.headers::text,
       r.created_at, r.partition
FROM h
LEFT JOIN LATERAL (
    SELECT e.* FROM c
    CROSS JOIN generate_series(0, pgherald.partition_count_v1() - 1) AS p(partition)
    CROSS JOIN LATERAL (
        SELECT * FROM pgherald.events_v1 AS e
        WHERE e.channel = c.channel AND e.partition = CAST(p.partition AS smallint)
          AND (e.tx, e.id) > (CAST(%(after_tx)s AS xid8), CAST(%(after_id)s AS bigint))
          AND e.tx < h.horizon
          AND (CAST(%(upto_tx)s AS xid8) IS NULL
               OR (e.tx, e.id) <= (CAST(%(upto_tx)s AS xid8), CAST(%(upto_id)s AS bigint)))
        ORDER BY e.tx, e.id
        LIMIT CAST(%(per_partition)s AS integer)
    ) AS e
    ORDER BY e.tx, e.id
    LIMIT CAST(%(limit)s AS integer)
) AS r ON true
ORDER BY r.tx, r.id

-- name: event_position --
-- Where event `id` is in the log's (tx, id) order (no row when the log lacks it).
SELECT tx::text FROM pgherald.events_v1 WHERE id = %(id)s

-- name: log_horizon --
-- Where a reader of the log that starts now starts: everything before (horizon, 0) has ended.
SELECT pg_snapshot_xmin(pg_current_snapshot())::text

-- name: notify --
SELECT pg_notify(%(channel)s, %(payload)s)

-- name: notify_queue_usage --
SELECT pg_notification_queue_usage()

-- name: change_guard --
-- The gateway's watch on the change triggers' queue guard (schema.sql, notify_change_v1):
-- past this usage they skip their notification.
SELECT pg_notification_queue_usage(),
       coalesce(CAST(nullif(current_setting('pgherald.change_max_queue_usage', true), '')
                     AS float8), 0.9)

-- name: change_trigger_channels --
-- The channels pgherald's change triggers notify on (the gateway matches wildcard
-- subscriptions against them): the first trigger argument, else the table's name, as
-- notify_change_v1 defaults it. Catalogs only: works without the pgherald schema.
SELECT DISTINCT coalesce(
           nullif(CASE WHEN t.tgnargs > 0 AND position('\x00'::bytea IN t.tgargs) > 1
                       THEN convert_from(substring(t.tgargs FROM 1
                                                   FOR position('\x00'::bytea IN t.tgargs) - 1),
                                         'UTF8') END, ''),
           n.nspname || '.' || c.relname)
FROM pg_trigger AS t
JOIN pg_class AS c ON c.oid = t.tgrelid
JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE t.tgname IN ('pgherald_change_v1', 'pgherald_truncate_v1')
  AND NOT t.tgisinternal AND t.tgparentid = 0

-- name: ping --
SELECT 1

-- name: dead_letter --
-- A consumer gives up on an event: store (or, for a redelivered one, update) its dead letter
-- and move the group's position in its channel and partition past it, in one statement: both or neither.
-- The position only moves forward (a redelivered event lies behind it already).
WITH dead AS (
    INSERT INTO pgherald.dead_letters_v1 AS d
        (group_name, event_id, tx, channel, partition, error, attempts, first_failed_at,
         last_failed_at)
    VALUES (%(group)s, CAST(%(event_id)s AS bigint), CAST(%(tx)s AS xid8), %(channel)s,
            CAST(%(partition)s AS smallint), %(error)s, CAST(%(attempts)s AS integer),
            to_timestamp(CAST(%(first_failed_at)s AS float8)), now())
    ON CONFLICT (group_name, event_id) DO UPDATE
    SET attempts = d.attempts + excluded.attempts, error = excluded.error,
        last_failed_at = excluded.last_failed_at, dead_at = now(), redeliver_at = NULL
)
UPDATE pgherald.positions_v2 AS p
SET tx = CAST(%(tx)s AS xid8), event_id = CAST(%(event_id)s AS bigint), updated_at = now()
WHERE p.group_name = %(group)s AND p.channel = %(channel)s
  AND p.partition = CAST(%(partition)s AS smallint)
  AND (p.tx, p.event_id) < (CAST(%(tx)s AS xid8), CAST(%(event_id)s AS bigint))

-- name: pending_redeliveries --
-- Dead letters of a group asked to be redelivered, in the partitions this consumer holds and
-- on the channels it reads (NULL: all), in the group's (tx, id) order; read_batch's columns. An event no longer in the log is left
-- out (redeliver_dead_letters only marks events still there).
SELECT e.id, e.tx::text, e.channel, e.key, e.payload::text, e.headers::text, e.created_at,
       e.partition
FROM pgherald.dead_letters_v1 AS d
JOIN pgherald.events_v1 AS e ON e.id = d.event_id
WHERE d.group_name = %(group)s AND d.redeliver_at IS NOT NULL
  AND d.partition = ANY (CAST(%(partitions)s AS smallint[]))
  AND (CAST(%(channels)s AS text[]) IS NULL OR d.channel = ANY (CAST(%(channels)s AS text[])))
ORDER BY d.tx, d.event_id
LIMIT CAST(%(limit)s AS integer)

-- name: redelivered --
-- Redelivered events that were handled: no longer dead.
DELETE FROM pgherald.dead_letters_v1
WHERE group_name = %(group)s AND event_id = ANY (CAST(%(ids)s AS bigint[]))
  AND redeliver_at IS NOT NULL

-- name: dead_letters --
-- Dead letters (of one group, or all: group NULL; some ids, or all: ids NULL), oldest first;
-- in_log: whether the event is still in the log (retention may have removed it).
SELECT d.group_name, d.event_id, d.channel, d.partition, d.tx::text, d.error, d.attempts,
       d.first_failed_at, d.last_failed_at, d.dead_at, d.redeliver_at, d.redeliveries,
       e.key, e.created_at, e.id IS NOT NULL AS in_log
FROM pgherald.dead_letters_v1 AS d
LEFT JOIN pgherald.events_v1 AS e ON e.id = d.event_id
WHERE (CAST(%(group)s AS text) IS NULL OR d.group_name = %(group)s)
  AND (CAST(%(ids)s AS bigint[]) IS NULL OR d.event_id = ANY (CAST(%(ids)s AS bigint[])))
ORDER BY d.group_name, d.tx, d.event_id
LIMIT CAST(%(limit)s AS bigint)

-- name: dead_letter_event --
-- The stored event behind a dead letter, as text (it may be what Python cannot decode).
SELECT payload::text, headers::text FROM pgherald.events_v1 WHERE id = %(id)s

-- name: redeliver_dead_letters --
-- Ask for a redelivery: the group's consumers hand these events out again before their next
-- read. Only events still in the log; a redelivery already pending is left as it is.
UPDATE pgherald.dead_letters_v1 AS d
SET redeliver_at = now(), redeliveries = d.redeliveries + 1
WHERE d.group_name = %(group)s AND d.redeliver_at IS NULL
  AND (CAST(%(ids)s AS bigint[]) IS NULL OR d.event_id = ANY (CAST(%(ids)s AS bigint[])))
  AND EXISTS (SELECT 1 FROM pgherald.events_v1 AS e WHERE e.id = d.event_id)
RETURNING d.event_id

-- name: purge_dead_letters --
DELETE FROM pgherald.dead_letters_v1
WHERE group_name = %(group)s
  AND (CAST(%(ids)s AS bigint[]) IS NULL OR event_id = ANY (CAST(%(ids)s AS bigint[])))
RETURNING event_id

-- name: dead_letter_counts --
-- Per group: dead letters, and how many of them wait for a redelivery.
SELECT group_name, count(*), count(*) FILTER (WHERE redeliver_at IS NOT NULL)
FROM pgherald.dead_letters_v1
GROUP BY group_name
ORDER BY group_name

-- name: group_sessions --
-- The live sessions of every group, from the advisory locks its consumers hold (see
-- join_group): the shared membership lock (second key 1000) and an exclusive lock per
-- partition held (second key: the partition). Who they are comes from pg_stat_activity
-- (application_name and client address are NULL for sessions this role may not see).
WITH g AS (
    SELECT DISTINCT group_name,
           CAST(hashtext('pgherald.group:' || group_name)::bigint & 4294967295 AS oid) AS classid
    FROM pgherald.positions_v2
)
SELECT g.group_name, l.pid, CAST(l.objid AS integer), l.mode = 'ShareLock' AS member,
       a.application_name, host(a.client_addr), a.backend_start
FROM g
JOIN pg_locks AS l
  ON l.locktype = 'advisory' AND l.classid = g.classid AND l.objsubid = 2 AND l.granted
 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid
ORDER BY g.group_name, l.pid, l.objid

-- name: group_activity --
-- Each group's last acknowledgement (or creation, or reset), the highest event id passed, and
-- the time now (to age the lag by).
SELECT group_name, max(updated_at), max(event_id), now()
FROM pgherald.positions_v2
WHERE CAST(%(groups)s AS text[]) IS NULL OR group_name = ANY (CAST(%(groups)s AS text[]))
GROUP BY group_name
ORDER BY group_name

-- name: group_lag --
-- The first `scan` events after each group's position in each channel and partition it reads:
-- at most `scan` rows per (group, channel, partition) whatever the lag, each range found by
-- the read index (other channels' events are never scanned). A group of every channel also
-- lags on the log's channels it has not read yet, from its start. A range with fewer than
-- `scan` is counted exactly; one cut short is estimated by the caller from the ids its first
-- events span and the range's last id (partition_heads). Also: the oldest event's time.
WITH p AS (
    SELECT group_name, channel, partition, tx, event_id, skip FROM pgherald.positions_v2
    WHERE channel <> ''
    UNION ALL
    SELECT s.group_name, c.channel, s.partition, s.tx, s.event_id, s.skip
    FROM pgherald.positions_v2 AS s
    CROSS JOIN pgherald.log_channels_v1() AS c(channel)
    WHERE s.channel = '' AND s.every_channel
      AND NOT EXISTS (SELECT FROM pgherald.positions_v2 AS r
                      WHERE r.group_name = s.group_name AND r.channel = c.channel
                        AND r.partition = s.partition)
)
SELECT p.group_name, p.channel, p.partition, count(s.id), min(s.id), max(s.id),
       min(s.created_at)
FROM p
CROSS JOIN LATERAL (
    SELECT e.id, e.created_at FROM pgherald.events_v1 AS e
    WHERE e.channel = p.channel AND e.partition = p.partition
      AND (e.tx, e.id) > (p.tx, p.event_id)
      AND (p.skip IS NULL OR NOT pg_visible_in_snapshot(e.tx, p.skip))
    ORDER BY e.tx, e.id
    LIMIT CAST(%(scan)s AS integer)
) AS s
WHERE CAST(%(groups)s AS text[]) IS NULL OR p.group_name = ANY (CAST(%(groups)s AS text[]))
GROUP BY p.group_name, p.channel, p.partition

-- name: plan_group_lag --
-- For group_lag, in a transaction: walk the read index in order. Without this, stale or
-- missing statistics (a freshly loaded log) make the planner fetch and sort a partition's
-- whole lag (a bitmap scan: seconds at millions of events) to keep its first rows; and JIT
-- compiling costs more than the query.
SELECT set_config('enable_bitmapscan', 'off', true), set_config('enable_sort', 'off', true),
       set_config('jit', 'off', true)

-- name: partition_heads --
-- The last event id of each (channel, partition) of the log, in (tx, id) order: one backward
-- index probe each (channels by a loose scan).
SELECT c.channel, q.partition, (
    SELECT e.id FROM pgherald.events_v1 AS e
    WHERE e.channel = c.channel AND e.partition = q.partition
    ORDER BY e.tx DESC, e.id DESC LIMIT 1)
FROM pgherald.log_channels_v1() AS c(channel)
CROSS JOIN generate_series(0, pgherald.partition_count_v1() - 1) AS q(partition)

-- name: log_size --
-- How many events the log holds without counting them all: exact up to `exact` rows, and
-- beyond that the planner's estimate (rows per page, times the pages now, summed over the
-- log's partitions) capped by the id
-- span (ids are an identity: a rolled-back insert leaves a hole, never a duplicate).
SELECT pg_notification_queue_usage(),
       (SELECT count(*) FROM (SELECT FROM pgherald.events_v1
                              LIMIT CAST(%(exact)s AS integer) + 1) AS c),
       (SELECT sum(c.reltuples / c.relpages
                   * (pg_relation_size(c.oid) / current_setting('block_size')::float8))
        FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
        WHERE i.inhparent = CAST('pgherald.events_v1' AS regclass)
          AND c.reltuples > 0 AND c.relpages > 0),
       (SELECT max(id) FROM pgherald.events_v1), (SELECT min(id) FROM pgherald.events_v1)

-- name: abandoned_groups --
-- Groups with no live member (no session holds the membership lock) and no acknowledgement
-- for longer than `idle`: what prune may stop waiting for.
SELECT p.group_name, max(p.updated_at)
FROM pgherald.positions_v2 AS p
GROUP BY p.group_name
HAVING max(p.updated_at) < now() - CAST(%(idle)s AS interval)
   AND NOT EXISTS (
        SELECT FROM pg_locks AS l
        WHERE l.locktype = 'advisory' AND l.objid = 1000 AND l.objsubid = 2 AND l.granted
          AND l.mode = 'ShareLock'
          AND l.classid = CAST(hashtext('pgherald.group:' || p.group_name)::bigint
                               & 4294967295 AS oid)
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()))
ORDER BY p.group_name

-- name: lock_out_group --
-- Keep consumers out of a group until this transaction ends: its membership lock, taken
-- exclusive, conflicts with the shared one every member holds (and join_group waits on it).
-- Waits up to lock_timeout (see set_lock_timeout): a consumer that has just closed its
-- connection may hold it until the server has ended its session.
SELECT pg_advisory_xact_lock(hashtext(%(lock_name)s), 1000)

-- name: set_lock_timeout --
-- For this transaction (or savepoint); returns the setting it replaces.
SELECT current_setting('lock_timeout'), set_config('lock_timeout', %(timeout)s, true)

-- name: group_exists --
SELECT EXISTS (SELECT FROM pgherald.positions_v2 WHERE group_name = %(group)s)

-- name: delete_group --
DELETE FROM pgherald.positions_v2 WHERE group_name = %(group)s

-- name: publish_later --
-- publish(..., deliver_at | deliver_after): the event waits in scheduled_v1 until due (never in
-- the log early: a group's position would pass it). deliver_after counts from the call
-- (clock_timestamp(), not the transaction's start). The wake-up says 'scheduled': consumers
-- then ask release_scheduled when the next one is due. Not gated like publish's: a consumer
-- must learn of every new due time, and delayed events are rare next to the rest.
WITH s AS (
    INSERT INTO pgherald.scheduled_v1 (deliver_at, channel, key, payload, headers)
    VALUES (coalesce(CAST(%(deliver_at)s AS timestamptz),
                     clock_timestamp() + CAST(%(deliver_after)s AS float8) * interval '1 second'),
            %(channel)s, %(key)s, CAST(%(payload)s AS jsonb), CAST(%(headers)s AS jsonb))
    RETURNING id
)
SELECT s.id,
       CASE WHEN pg_notification_queue_usage() < coalesce(CAST(nullif(
                current_setting('pgherald.wake_max_queue_usage', true), '') AS float8), 0.5)
       THEN pg_notify('pgherald_wake_v1', 'scheduled') END
FROM s

-- name: release_scheduled --
-- Move due delayed events into the log, exactly once: the DELETE and the INSERT are one
-- statement, so one transaction. One releaser at a time (consumers, `schedule run`): the
-- try of an advisory transaction lock, taken before any row is touched, so this transaction's
-- id (assigned at its first write, after the lock) is newer than every earlier release's.
-- Two releasers at once would each take some rows (SKIP LOCKED), and the one whose id is
-- older would store later events before earlier ones in the log's (tx, id) order. A releaser
-- that finds the lock taken moves nothing and hears that the next is due at once (<= 0). SKIP
-- LOCKED stays for cancel_delayed. The events get this transaction's id, newer than every
-- group's position. Returns how many moved, the seconds until the next one is due (server
-- clock; NULL: none waiting), this transaction's id and the log's read horizon (the snapshot's
-- xmin: a consumer reads the events once the horizon is past that id), and wakes consumers
-- when some moved.
WITH lk AS MATERIALIZED (
    SELECT pg_try_advisory_xact_lock(hashtext('pgherald.release_v1')) AS ok
), due AS (
    DELETE FROM pgherald.scheduled_v1
    WHERE id IN (SELECT id FROM pgherald.scheduled_v1
                 WHERE (SELECT lk.ok FROM lk) AND deliver_at <= now()
                 ORDER BY deliver_at, id
                 LIMIT CAST(%(limit)s AS integer)
                 FOR UPDATE SKIP LOCKED)
    RETURNING deliver_at, id, channel, key, payload, headers
), e AS (
    INSERT INTO pgherald.events_v1 (channel, key, payload, headers)
    SELECT channel, key, payload, headers FROM due ORDER BY deliver_at, id
    RETURNING id
), n AS (SELECT count(*) AS released FROM e)
SELECT n.released,
       (SELECT extract(epoch FROM min(s.deliver_at) - now()) FROM pgherald.scheduled_v1 AS s
        WHERE s.deliver_at > now() OR NOT (SELECT lk.ok FROM lk)),
       pg_current_xact_id()::text, pg_snapshot_xmin(pg_current_snapshot())::text,
       CASE WHEN n.released > 0 THEN
           CASE WHEN pg_notification_queue_usage() < coalesce(CAST(nullif(
                    current_setting('pgherald.wake_max_queue_usage', true), '') AS float8), 0.5)
           THEN pg_notify('pgherald_wake_v1', '')
           WHEN nextval('pgherald.wake_skips_v1') > 0 THEN CAST(NULL AS void) END
       END
FROM n

-- name: cancel_delayed --
-- A delayed event not yet released: gone, as if never published (a released one stays).
DELETE FROM pgherald.scheduled_v1 WHERE id = %(id)s RETURNING id

-- name: scheduled_pending --
SELECT count(*), min(deliver_at) FROM pgherald.scheduled_v1

-- name: schedule_add --
-- Wakes `schedule run` processes (and consumers, which only check for due delayed events).
WITH s AS (
    INSERT INTO pgherald.schedules_v1 (name, cron, timezone, channel, key, payload, headers,
                                       next_tick)
    VALUES (%(name)s, %(cron)s, %(timezone)s, %(channel)s, %(key)s, CAST(%(payload)s AS jsonb),
            CAST(%(headers)s AS jsonb), CAST(%(next_tick)s AS timestamptz))
    ON CONFLICT (name) DO UPDATE SET
        cron = EXCLUDED.cron, timezone = EXCLUDED.timezone, channel = EXCLUDED.channel,
        key = EXCLUDED.key, payload = EXCLUDED.payload, headers = EXCLUDED.headers,
        next_tick = EXCLUDED.next_tick
    WHERE CAST(%(replace)s AS boolean)
    RETURNING name
)
SELECT count(*), pg_notify('pgherald_wake_v1', 'scheduled') FROM s

-- name: schedule_remove --
DELETE FROM pgherald.schedules_v1 WHERE name = %(name)s RETURNING name

-- name: schedules --
SELECT name, cron, timezone, channel, key, payload::text, headers::text, next_tick, last_tick,
       created_at
FROM pgherald.schedules_v1 ORDER BY name

-- name: schedules_due --
-- Also next_tick as ISO 8601 text in UTC, whatever the session's DateStyle and TimeZone: the
-- scheduler's engine reads text, and gives it back to schedule_tick as it is.
SELECT name, cron, timezone, next_tick,
       to_char(next_tick AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')
FROM pgherald.schedules_v1
WHERE next_tick <= coalesce(CAST(%(now)s AS timestamptz), now())
ORDER BY next_tick, name

-- name: schedule_tick --
-- Publish one tick of a schedule, exactly once: only the statement that moves next_tick on
-- from the tick it saw (the row lock makes any other wait, then find next_tick changed)
-- inserts the event, in the same statement. Headers: the schedule's, plus its name and tick.
WITH s AS (
    UPDATE pgherald.schedules_v1
    SET next_tick = CAST(%(following)s AS timestamptz), last_tick = next_tick
    WHERE name = %(name)s AND next_tick = CAST(%(tick)s AS timestamptz)
    RETURNING name, channel, key, payload, headers, last_tick
), e AS (
    INSERT INTO pgherald.events_v1 (channel, key, payload, headers)
    SELECT channel, key, payload, coalesce(headers, '{}') || jsonb_build_object(
               'pgherald_schedule', name, 'pgherald_tick', last_tick)
    FROM s
    RETURNING id
)
SELECT e.id,
       CASE WHEN pg_notification_queue_usage() < coalesce(CAST(nullif(
                current_setting('pgherald.wake_max_queue_usage', true), '') AS float8), 0.5)
       THEN pg_notify('pgherald_wake_v1', '')
       WHEN nextval('pgherald.wake_skips_v1') > 0 THEN CAST(NULL AS void) END
FROM e

-- name: backend_pid --
-- The server process of this session (behind a pooler, libpq's is the pooler's own key).
SELECT pg_backend_pid()

-- name: listen_wakeups --
-- The scheduler's wake-ups: delayed events published, schedules added (see publish_later).
LISTEN pgherald_wake_v1

-- name: schedules_next --
-- Seconds until the next tick of any schedule (server clock; NULL: no schedule).
SELECT extract(epoch FROM min(next_tick) - now()) FROM pgherald.schedules_v1

-- name: cdc_server_state --
-- Change data capture: what the server allows and what exists of a slot and its publication;
-- then where the server's WAL ends (flushed; replayed on a standby); last, the next
-- transaction id with its epoch (64 bits, as pg_current_xact_id() gives ids): the stream's
-- Begin messages carry 32 bits, widened from it (txid_*: also on servers before 13).
SELECT current_setting('wal_level'),
       (SELECT plugin FROM pg_replication_slots WHERE slot_name = %(slot)s),
       EXISTS (SELECT FROM pg_publication WHERE pubname = %(publication)s),
       current_setting('server_version_num')::int,
       (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
             ELSE pg_current_wal_flush_lsn() END)::text,
       txid_snapshot_xmax(txid_current_snapshot())::text

-- name: cdc_end_stale_reader --
-- Change data capture: end the server process of a stream this reader lost (a half-open
-- connection keeps its slot until wal_sender_timeout), only if it still holds the slot.
SELECT pg_terminate_backend(active_pid)
FROM pg_replication_slots
WHERE slot_name = %(slot)s AND active_pid = CAST(%(pid)s AS int)

-- name: cdc_resolve_table --
-- A table named as SQL writes it (schema.table, quoted parts) as its schema and name.
SELECT n.nspname, c.relname, c.relkind
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass(%(name)s)

-- name: cdc_status_tables --
-- The tables of a publication as `cdc add` took them: those added to it (a partitioned table
-- itself, not the partitions it is published as), then those it publishes otherwise (FOR ALL
-- TABLES, TABLES IN SCHEMA) that are not a partition of one added, each partition named by
-- the partitioned table at the top of its tree.
SELECT n.nspname::text, c.relname::text
FROM pg_publication_rel r
JOIN pg_publication p ON p.oid = r.prpubid
JOIN pg_class c ON c.oid = r.prrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE p.pubname = %(publication)s
UNION
SELECT rn.nspname::text, rc.relname::text
FROM pg_publication_tables t
CROSS JOIN LATERAL (
    SELECT (quote_ident(t.schemaname) || '.' || quote_ident(t.tablename))::regclass AS rel
) AS x
JOIN pg_class rc ON rc.oid = coalesce(pg_partition_root(x.rel), x.rel)
JOIN pg_namespace rn ON rn.oid = rc.relnamespace
WHERE t.pubname = %(publication)s
  AND NOT EXISTS (
    SELECT FROM pg_publication_rel r
    JOIN pg_publication p ON p.oid = r.prpubid
    WHERE p.pubname = t.pubname
      AND r.prrelid IN (SELECT relid FROM pg_partition_ancestors(x.rel)))
ORDER BY 1, 2

-- name: cdc_publication_tables --
-- The tables of a publication, their published columns and primary key columns (in the key's
-- order; empty: no primary key), and their oids (what the stream's Relation messages name).
SELECT p.schemaname, p.tablename, p.attnames::text[],
       ARRAY(SELECT a.attname::text FROM pg_index i
             CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = (quote_ident(p.schemaname) || '.' || quote_ident(p.tablename))::regclass
               AND i.indisprimary
             ORDER BY k.n),
       (quote_ident(p.schemaname) || '.' || quote_ident(p.tablename))::regclass::oid::bigint
FROM pg_publication_tables p
WHERE p.pubname = %(publication)s
ORDER BY 1, 2

-- name: cdc_primary_key --
-- Change data capture: one table's primary key columns, in the key's order (no row: none, or
-- the table is gone), for a table that came into the publication while a stream runs.
SELECT a.attname::text FROM pg_index i
CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = CAST(%(oid)s AS oid) AND i.indisprimary
ORDER BY k.n

-- name: cdc_publication_members --
-- The tables of a publication as `cdc add` and `cdc remove` name them: those added to it (a
-- partitioned table itself, not its partitions: explicit = true, what ALTER PUBLICATION ...
-- DROP TABLE takes) and those it publishes (its partitions, a schema's tables: explicit =
-- false), with their published columns.
SELECT n.nspname::text, c.relname::text, true, NULL::text[]
FROM pg_publication_rel r
JOIN pg_publication p ON p.oid = r.prpubid
JOIN pg_class c ON c.oid = r.prrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE p.pubname = %(publication)s
UNION ALL
SELECT schemaname::text, tablename::text, false, attnames::text[]
FROM pg_publication_tables
WHERE pubname = %(publication)s

-- name: cdc_identity_columns --
-- A table's replica identity (d: its primary key, i: an index, f: full, n: nothing) and the
-- columns its UPDATE and DELETE need published (every column for full).
SELECT c.relreplident::text,
       ARRAY(SELECT a.attname::text FROM pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
               AND (c.relreplident = 'f' OR a.attnum = ANY (
                 SELECT unnest(i.indkey::int2[]) FROM pg_index i
                 WHERE i.indrelid = c.oid
                   AND ((c.relreplident = 'd' AND i.indisprimary)
                        OR (c.relreplident = 'i' AND i.indisreplident))))
             ORDER BY a.attnum)
FROM pg_class c
WHERE c.oid = to_regclass(%(name)s)

-- name: cdc_status --
-- Every pgoutput slot of this database: how far its reader is behind (bytes of WAL written
-- since it acknowledged) and how much WAL it keeps the server from removing.
SELECT s.slot_name::text, s.active, s.active_pid,
       s.confirmed_flush_lsn::text, s.restart_lsn::text,
       pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint,
       pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint,
       s.wal_status, s.safe_wal_size
FROM pg_replication_slots s
WHERE s.plugin = 'pgoutput' AND s.database = current_database()
  AND (%(slot)s::text IS NULL OR s.slot_name = %(slot)s)
ORDER BY 1

-- name: cdc_last_lsn --
-- The commit LSN of the last transaction `cdc run --into-log` stored for a slot (see
-- docs/cdc.md): the newest such event, found by walking the log back from its newest id.
SELECT headers->>'cdc_lsn'
FROM pgherald.events_v1
WHERE headers->>'cdc_slot' = %(slot)s
ORDER BY id DESC
LIMIT 1

-- name: retention_get --
SELECT name, CAST(value AS interval) FROM pgherald.settings_v1
WHERE name IN ('retention', 'abandon_after') OR name LIKE 'retention:%'

-- name: retention_set --
INSERT INTO pgherald.settings_v1 (name, value)
VALUES (%(name)s, CAST(CAST(%(value)s AS interval) AS text))
ON CONFLICT (name) DO UPDATE SET value = excluded.value

-- name: retention_delete --
DELETE FROM pgherald.settings_v1 WHERE name = %(name)s

-- name: status_row_set --
-- A relay's row for `pgherald status` (see docs/relay.md, "Watch it"; the consumer engine's
-- StatusRow): its numbers as a JSON object, stamped with the server's clock ("at", epoch
-- seconds). Rows left by relays that were killed (no report for an hour, or three of their
-- intervals if longer) go at the same time; SKIP LOCKED: relays reporting at once never wait
-- for each other.
WITH gone AS (
    DELETE FROM pgherald.settings_v1
    WHERE name IN (
        SELECT s.name FROM pgherald.settings_v1 AS s
        WHERE starts_with(s.name, 'relay:') AND s.name <> %(name)s
          -- jsonb's text of numbers, read without a cast of the row that a stray one fails
          AND CAST(substring(s.value FROM '"at": ([0-9]+(?:\.[0-9]+)?)[,}]') AS float8)
              < CAST(extract(epoch FROM now()) AS float8) - greatest(3600, 3 * coalesce(
                  CAST(substring(s.value FROM '"interval": ([0-9]+(?:\.[0-9]+)?)[,}]')
                       AS float8), 0))
        FOR UPDATE SKIP LOCKED
    )
)
INSERT INTO pgherald.settings_v1 (name, value)
VALUES (%(name)s, CAST(jsonb_set(CAST(%(value)s AS jsonb), '{at}',
                                 to_jsonb(CAST(extract(epoch FROM now()) AS float8))) AS text))
ON CONFLICT (name) DO UPDATE SET value = excluded.value

-- name: status_row_delete --
DELETE FROM pgherald.settings_v1 WHERE name = %(name)s

-- name: relay_rows --
-- The relays' rows (status_row_set), with the server's clock to age them by.
SELECT value, CAST(extract(epoch FROM now()) AS float8)
FROM pgherald.settings_v1
WHERE starts_with(name, 'relay:')
ORDER BY name

-- name: maintain --
SELECT action, target, detail
FROM pgherald.maintain_v1(coalesce(CAST(%(now)s AS timestamptz), now()))

-- name: wait_for_wakeups --
-- A consumer about to wait: publishers send wake-ups only while some session holds these
-- shared locks, (wake_v1, 1) to (wake_v1, 17) (see publish_v1: each publisher tries one).
-- False when a publisher holds one this instant (try again shortly); then none is kept.
-- Also a transaction id taken after the locks: a publisher that looked before we held them
-- has an older one, and sent no wake-up; once every transaction before it has ended
-- (wakeups_safe), a read sees all their events.
WITH t AS MATERIALIZED (
    SELECT s, pg_try_advisory_lock_shared(hashtext('pgherald.wake_v1'), s) AS ok
    FROM generate_series(1, 17) AS s
), held AS (SELECT bool_and(ok) AS ok FROM t)
SELECT CASE WHEN held.ok THEN true
       ELSE (SELECT count(pg_advisory_unlock_shared(hashtext('pgherald.wake_v1'), t.s))
             FROM t WHERE t.ok) < 0
       END,
       CASE WHEN held.ok THEN pg_current_xact_id()::text END
FROM held

-- name: wakeups_safe --
SELECT pg_snapshot_xmin(pg_current_snapshot()) >= CAST(%(xmax)s AS xid8)

-- name: hold_wakeups --
-- The gateway's log tail: wake-ups for as long as its session lives (as a waiting consumer).
-- Also what benchmarks and tests run to stand for a waiting consumer.
SELECT count(pg_advisory_lock_shared(hashtext('pgherald.wake_v1'), s))
FROM generate_series(1, 17) AS s

-- name: busy --
-- A consumer behind on the log needs no wake-ups: publishers stop sending them.
SELECT count(pg_advisory_unlock_shared(hashtext('pgherald.wake_v1'), s))
FROM generate_series(1, 17) AS s

-- name: wake_secret --
-- What signs wake-up notes (schema.sql wake_note_v1); refused to roles not granted SELECT.
SELECT secret FROM pgherald.wake_secret_v1

-- name: blind_wake_senders --
-- Functions of the schema that send wake-ups but may skip one without counting it in
-- wake_skips_v1 (triggers generated by an earlier version): while one exists, a consumer never
-- hands out events from wake-ups alone.
SELECT count(*) FROM pg_proc
WHERE pronamespace = to_regnamespace('pgherald')
  AND strpos(prosrc, 'pgherald_wake_v1') > 0 AND strpos(prosrc, 'wake_skips_v1') = 0

-- name: wake_horizon --
-- A waiting consumer starting to prove wake-ups complete (again): it asks for notes (the
-- shared lock (wake_v1, 18), unless it holds it: publishers then send notes, not plain
-- wake-ups), then reads the skip count, then takes a transaction id (each after the one
-- before: MATERIALIZED, and the projection runs on the row). A publisher newer than that id
-- sends a note or counts a skip after this count; an older one, a read covers once it has
-- ended. False (and no id): a publisher held key 18 this instant; try again.
WITH n AS MATERIALIZED (
    SELECT CAST(%(held)s AS boolean)
           OR pg_try_advisory_lock_shared(hashtext('pgherald.wake_v1'), 18) AS notes
), k AS MATERIALIZED (
    SELECT n.notes, CASE WHEN s.is_called THEN s.last_value ELSE 0 END AS skips
    FROM n, pgherald.wake_skips_v1 AS s
)
SELECT k.notes, k.skips, CASE WHEN k.notes THEN pg_current_xact_id()::text END FROM k

-- name: no_notes --
-- A consumer that stops waiting: publishers send plain wake-ups again (if any still waits).
SELECT pg_advisory_unlock_shared(hashtext('pgherald.wake_v1'), 18)

-- name: wake_skips --
-- The wake-ups not sent so far (schema.sql wake_note_v1), as wake_horizon reads it.
SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM pgherald.wake_skips_v1

-- name: positions_of --
-- A group's stored positions in some channels and partitions.
SELECT channel, partition, tx::text, event_id
FROM pgherald.positions_v2
WHERE group_name = %(group)s AND channel = ANY(CAST(%(channels)s AS text[]))
  AND partition = ANY(CAST(%(partitions)s AS smallint[]))

-- name: partition_count --
SELECT pgherald.partition_count_v1()

-- name: repartition --
SELECT pgherald.repartition_v1(CAST(%(count)s AS integer))
