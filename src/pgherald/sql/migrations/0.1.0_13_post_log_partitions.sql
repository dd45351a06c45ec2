-- 0.1.0: the log partitioned by day, for retention by dropping whole days (`pgherald
-- maintain`; see docs/durable.md). The log as it was becomes the first partition, up to the
-- end of today (UTC): no event is copied, ids go on from where they were. Grants given on
-- pgherald.events_v1 must be given again (the table is new).

ALTER TABLE pgherald.events_v1 RENAME TO events_v1_upgraded;
ALTER SEQUENCE pgherald.events_v1_id_seq RENAME TO events_v1_upgraded_id_seq;
ALTER INDEX pgherald.events_v1_read RENAME TO events_v1_upgraded_read;
-- Days are partitions now: time needs no index of its own (one less to write per event).
DROP INDEX pgherald.events_v1_created_at;
-- Out of the way of the new table's constraint names (back below: ATTACH matches by name).
ALTER TABLE pgherald.events_v1_upgraded
    RENAME CONSTRAINT events_v1_channel_check TO events_v1_upgraded_channel_check;
ALTER TABLE pgherald.events_v1_upgraded DROP CONSTRAINT events_v1_pkey;

-- The event log. Readers order by (tx, id), the writing transaction's id first, and only read
-- rows whose transaction is older than every transaction still running (the snapshot's xmin):
-- so an event whose transaction commits late can never be skipped (see docs/durable.md).
-- Partitioned by day of created_at (UTC), so that retention drops whole days (maintain_v1);
-- events of a day with no partition yet go to the default partition, never fail.
CREATE TABLE pgherald.events_v1 (
    id bigint GENERATED ALWAYS AS IDENTITY,
    tx xid8 NOT NULL DEFAULT pg_current_xact_id(),
    channel text NOT NULL CHECK (channel <> '' AND octet_length(channel) <= 63),
    key text,
    -- 16 fixed partitions: events with the same key share one, so they stay in order within a
    -- consumer group; events without a key are spread by id.
    partition smallint GENERATED ALWAYS AS (hashtext(coalesce(key, id::text)) & 15) STORED,
    payload jsonb NOT NULL,
    headers jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);

-- The read index leads with the channel: a group reads its own channels' events only.
CREATE INDEX events_v1_read ON pgherald.events_v1 (channel, partition, tx, id);

CREATE TABLE pgherald.events_v1_default PARTITION OF pgherald.events_v1 DEFAULT;

SELECT setval('pgherald.events_v1_id_seq', s.last_value, s.is_called)
FROM pgherald.events_v1_upgraded_id_seq AS s;

ALTER TABLE pgherald.events_v1_upgraded ALTER COLUMN id DROP IDENTITY;
ALTER TABLE pgherald.events_v1_upgraded
    RENAME CONSTRAINT events_v1_upgraded_channel_check TO events_v1_channel_check;

DO $$
DECLARE
    v_end timestamptz := ((now() AT TIME ZONE 'UTC')::date + 1)::timestamp AT TIME ZONE 'UTC';
BEGIN
    EXECUTE format('ALTER TABLE pgherald.events_v1 ATTACH PARTITION pgherald.events_v1_upgraded '
                   'FOR VALUES FROM (MINVALUE) TO (%L)', v_end);
    EXECUTE format('ALTER TABLE pgherald.events_v1_upgraded RENAME TO %I',
                   'events_v1_until_' || to_char(v_end AT TIME ZONE 'UTC', 'YYYYMMDD'));
END
$$;

-- Settings of the log, changed with `pgherald retention` (or pgherald.set_retention):
-- 'retention' (an interval: how long events are kept; none: forever) and 'abandon_after'
-- (an interval: a group with no member and no acknowledgement for that long no longer holds
-- back retention; default 7 days).
CREATE TABLE pgherald.settings_v1 (
    name text PRIMARY KEY,
    value text NOT NULL
);

-- The log's daily partitions from p_from's day (UTC) on, p_days more: each one not there yet
-- is created, and returned. Events of that day already stored in the default partition (no
-- partition was ready for them) are moved into the new one, so none is ever lost or doubled.
CREATE FUNCTION pgherald.add_log_partitions_v1(p_from timestamptz, p_days integer)
RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    v_day date;
    v_start timestamptz;
    v_end timestamptz;
    v_name text;
BEGIN
    FOR i IN 0 .. p_days LOOP
        v_day := (p_from AT TIME ZONE 'UTC')::date + i;
        v_start := v_day::timestamp AT TIME ZONE 'UTC';
        v_end := (v_day + 1)::timestamp AT TIME ZONE 'UTC';
        v_name := 'events_v1_p' || to_char(v_day, 'YYYYMMDD');
        CONTINUE WHEN to_regclass(format('pgherald.%I', v_name)) IS NOT NULL;
        -- Another partition may cover the day (the one an upgrade made of the old log).
        CONTINUE WHEN EXISTS (
            SELECT FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
            WHERE i.inhparent = 'pgherald.events_v1'::regclass
              AND c.relname <> 'events_v1_default'
              AND v_start < substring(pg_get_expr(c.relpartbound, c.oid)
                                      FROM 'TO \(''([^'']+)''\)')::timestamptz
              AND coalesce(substring(pg_get_expr(c.relpartbound, c.oid)
                                     FROM 'FROM \(''([^'']+)''\)')::timestamptz, '-infinity')
                  < v_end);
        IF EXISTS (SELECT FROM pgherald.events_v1_default
                   WHERE created_at >= v_start AND created_at < v_end) THEN
            EXECUTE format('CREATE TABLE pgherald.%I (LIKE pgherald.events_v1 '
                           'INCLUDING DEFAULTS INCLUDING GENERATED INCLUDING CONSTRAINTS)', v_name);
            EXECUTE format(
                'WITH m AS (DELETE FROM pgherald.events_v1_default '
                '           WHERE created_at >= $1 AND created_at < $2 '
                '           RETURNING id, tx, channel, key, payload, headers, created_at) '
                'INSERT INTO pgherald.%I (id, tx, channel, key, payload, headers, created_at) '
                'SELECT * FROM m', v_name) USING v_start, v_end;
            EXECUTE format('ALTER TABLE pgherald.events_v1 ATTACH PARTITION pgherald.%I '
                           'FOR VALUES FROM (%L) TO (%L)', v_name, v_start, v_end);
        ELSE
            EXECUTE format('CREATE TABLE pgherald.%I PARTITION OF pgherald.events_v1 '
                           'FOR VALUES FROM (%L) TO (%L)', v_name, v_start, v_end);
        END IF;
        RETURN NEXT v_name;
    END LOOP;
END
$$;

-- `pgherald maintain`, and consumers once an hour: partitions for the next days, and past the
-- retention setting, whole days of the log dropped (no row DELETE: no bloat, no vacuum). A day
-- is kept while a group has not consumed it ("pinned"), unless the group is abandoned: no
-- member and no acknowledgement for abandon_after (then said so, and it no longer counts).
-- Groups idle for half of that are warned of. A channel may have a retention of its own
-- ('retention:CHANNEL'): longer, it keeps the days that hold its younger events ("kept");
-- shorter, its older events go by row, under the same rule. Events in the default partition
-- (stored when no partition was ready) past retention go by row too. One run at a time; each
-- drop waits for its lock at most lock_timeout (dropping a partition locks the whole log
-- briefly): one that cannot is left for the next run.
CREATE FUNCTION pgherald.maintain_v1(p_now timestamptz DEFAULT now())
RETURNS TABLE (action text, target text, detail text)
LANGUAGE plpgsql SET lock_timeout = '500ms' AS $$
DECLARE
    v_retention interval;
    v_abandon interval;
    v_cutoff timestamptz;
    v_ignored text[];
    v_pins text[];
    v_keeps text[];
    v_found boolean;
    v_rows bigint;
    v_busy boolean := false;
    r record;
    ch record;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('pgherald.maintain_v1'), 0) THEN
        RETURN QUERY SELECT 'skipped', 'pgherald.events_v1', 'another maintain is running';
        RETURN;
    END IF;
    FOR r IN SELECT * FROM pgherald.add_log_partitions_v1(p_now, 3) AS n LOOP
        RETURN QUERY SELECT 'created', 'pgherald.' || r.n, 'a day of the log';
    END LOOP;
    v_retention := (SELECT s.value::interval FROM pgherald.settings_v1 AS s
                    WHERE s.name = 'retention');
    v_abandon := coalesce((SELECT s.value::interval FROM pgherald.settings_v1 AS s
                           WHERE s.name = 'abandon_after'), interval '7 days');
    FOR r IN
        SELECT p.group_name, max(p.updated_at) AS last_at,
               EXISTS (
                   SELECT FROM pg_locks AS l
                   WHERE l.locktype = 'advisory' AND l.objid = 1000 AND l.objsubid = 2
                     AND l.granted AND l.mode = 'ShareLock'
                     AND l.classid = CAST(hashtext('pgherald.group:' || p.group_name)::bigint
                                          & 4294967295 AS oid)
                     AND l.database = (SELECT oid FROM pg_database
                                       WHERE datname = current_database())) AS live
        FROM pgherald.positions_v2 AS p
        GROUP BY p.group_name
    LOOP
        CONTINUE WHEN r.live OR r.last_at >= p_now - v_abandon / 2;
        IF r.last_at < p_now - v_abandon THEN
            v_ignored := v_ignored || r.group_name;
            RETURN QUERY SELECT 'abandoned', r.group_name,
                format('no member since %s (abandon_after %s): no longer holds back retention',
                       r.last_at, v_abandon);
        ELSE
            RETURN QUERY SELECT 'idle', r.group_name,
                format('no member since %s: abandoned, and no longer holding back retention, '
                       'after %s', r.last_at, r.last_at + v_abandon);
        END IF;
    END LOOP;
    v_ignored := coalesce(v_ignored, '{}');
    -- Channels that keep their events for less than the log does: their older events, by row.
    FOR ch IN
        SELECT substr(s.name, 11) AS channel, s.value::interval AS keep
        FROM pgherald.settings_v1 AS s
        WHERE s.name LIKE 'retention:%'
          AND (v_retention IS NULL OR s.value::interval < v_retention)
    LOOP
        DELETE FROM pgherald.events_v1 AS e
        WHERE e.channel = ch.channel AND e.created_at < p_now - ch.keep
          AND NOT EXISTS (
                SELECT FROM pgherald.positions_v2 AS p
                WHERE p.channel = e.channel AND p.partition = e.partition
                  AND (e.tx, e.id) > (p.tx, p.event_id) AND p.group_name <> ALL (v_ignored)
                  AND (p.skip IS NULL OR NOT pg_visible_in_snapshot(e.tx, p.skip)));
        GET DIAGNOSTICS v_rows = ROW_COUNT;
        IF v_rows > 0 THEN
            RETURN QUERY SELECT 'deleted', ch.channel,
                format('%s events older than its retention, %s', v_rows, ch.keep);
        END IF;
    END LOOP;
    IF v_retention IS NULL THEN
        RETURN;
    END IF;
    v_cutoff := p_now - v_retention;
    FOR r IN
        SELECT c.relname,
               substring(pg_get_expr(c.relpartbound, c.oid) FROM 'TO \(''([^'']+)''\)')
                   ::timestamptz AS upper_bound,
               greatest(c.reltuples, 0)::bigint AS rows
        FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'pgherald.events_v1'::regclass
        ORDER BY 2 NULLS LAST
    LOOP
        CONTINUE WHEN r.upper_bound IS NOT NULL AND r.upper_bound > v_cutoff;
        EXECUTE format(
            'SELECT array_agg(DISTINCT p.group_name ORDER BY p.group_name) '
            'FROM pgherald.positions_v2 AS p '
            'WHERE p.channel <> '''' AND p.group_name <> ALL ($1) AND EXISTS ('
            '  SELECT FROM pgherald.%I AS e '
            '  WHERE e.channel = p.channel AND e.partition = p.partition '
            '    AND (e.tx, e.id) > (p.tx, p.event_id) AND ($2 OR e.created_at < $3)'
            '    AND (p.skip IS NULL OR NOT pg_visible_in_snapshot(e.tx, p.skip)) '
            -- OFFSET 0: a probe of the read index per position, not a hash join over the day
            '  OFFSET 0)',
            r.relname)
            USING v_ignored, r.upper_bound IS NOT NULL, v_cutoff INTO v_pins;
        IF r.upper_bound IS NULL THEN  -- the default partition: by row, what is old enough
            EXECUTE format(
                'DELETE FROM pgherald.events_v1_default AS e WHERE e.created_at < $1 '
                'AND NOT EXISTS (SELECT FROM pgherald.positions_v2 AS p '
                '  WHERE p.channel = e.channel AND p.partition = e.partition '
                '    AND (e.tx, e.id) > (p.tx, p.event_id) AND p.group_name <> ALL ($2) '
                '    AND (p.skip IS NULL OR NOT pg_visible_in_snapshot(e.tx, p.skip))) '
                'AND NOT EXISTS (SELECT FROM pgherald.settings_v1 AS s '
                '  WHERE s.name = ''retention:'' || e.channel '
                '    AND e.created_at >= $3 - s.value::interval)')
                USING v_cutoff, v_ignored, p_now;
            GET DIAGNOSTICS v_rows = ROW_COUNT;
            IF v_rows > 0 THEN
                RETURN QUERY SELECT 'deleted', 'pgherald.events_v1_default',
                    format('%s events older than %s', v_rows, v_cutoff);
            END IF;
            CONTINUE;
        END IF;
        IF v_pins IS NOT NULL THEN
            RETURN QUERY SELECT 'pinned', 'pgherald.' || r.relname,
                format('kept past retention: not consumed yet by %s',
                       array_to_string(v_pins, ', '));
            CONTINUE;
        END IF;
        -- Channels that keep their events longer than the log: a day with one of theirs that
        -- is not old enough for it stays.
        v_keeps := NULL;
        FOR ch IN
            SELECT substr(s.name, 11) AS channel, s.value::interval AS keep
            FROM pgherald.settings_v1 AS s
            WHERE s.name LIKE 'retention:%' AND s.value::interval > v_retention
              AND r.upper_bound > p_now - s.value::interval
        LOOP
            EXECUTE format('SELECT EXISTS (SELECT FROM pgherald.%I WHERE channel = $1)',
                           r.relname) USING ch.channel INTO v_found;
            IF v_found THEN
                v_keeps := v_keeps || ch.channel;
            END IF;
        END LOOP;
        IF v_keeps IS NOT NULL THEN
            RETURN QUERY SELECT 'kept', 'pgherald.' || r.relname,
                format('past the log''s retention, but %s keep their events longer',
                       array_to_string(v_keeps, ', '));
        ELSIF v_busy THEN
            -- One wait per run: a day dropped before holds the log's lock until the end, so
            -- each further wait would hold publishers too.
            RETURN QUERY SELECT 'busy', 'pgherald.' || r.relname,
                'the log was busy (lock_timeout): left for the next run';
        ELSE
            BEGIN
                EXECUTE format('DROP TABLE pgherald.%I', r.relname);
                RETURN QUERY SELECT 'dropped', 'pgherald.' || r.relname,
                    format('events up to %s (about %s)', r.upper_bound, r.rows);
            EXCEPTION WHEN lock_not_available THEN
                v_busy := true;
                RETURN QUERY SELECT 'busy', 'pgherald.' || r.relname,
                    'the log was busy (lock_timeout): left for the next run';
            END;
        END IF;
    END LOOP;
END
$$;

-- The next three days' partitions (today's is the upgraded log).
SELECT pgherald.add_log_partitions_v1(now(), 3);
