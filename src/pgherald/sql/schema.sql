-- pgherald's database objects, current version: what `pgherald install` creates on an empty
-- database. Every object name ends in _v1: a _v2 can be created beside it during a rolling
-- upgrade. This file must equal the result of applying every file in migrations/ in order
-- (tests/migration checks that).

CREATE SCHEMA IF NOT EXISTS pgherald;

CREATE TABLE pgherald.migrations (
    name text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

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

-- Settings of the log, changed with `pgherald retention` (or pgherald.set_retention):
-- 'retention' (an interval: how long events are kept; none: forever) and 'abandon_after'
-- (an interval: a group with no member and no acknowledgement for that long no longer holds
-- back retention; default 7 days).
CREATE TABLE pgherald.settings_v1 (
    name text PRIMARY KEY,
    value text NOT NULL
);

-- How many partitions the log's events are spread over (settings_v1 'partitions'; default 16):
-- a consumer group has at most that many members at work. Set at install, changed by
-- repartition_v1.
CREATE FUNCTION pgherald.partition_count_v1() RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT CAST(value AS integer) FROM pgherald.settings_v1
                     WHERE name = 'partitions'), 16)
$$;

-- `pgherald partitions N` / pgherald.repartition(conn, N): spread the log over N partitions (1
-- to 256) from now on, for groups of up to N members. Safe, not free: it rewrites the log
-- (publishers wait until it commits), and needs every consumer stopped (their groups are
-- locked out meanwhile: lock_not_available when one runs). Each group's position in a channel
-- becomes the earliest of its old partitions' in all the new ones: events passed in some old
-- partition but not in another may come again, none is skipped.
CREATE FUNCTION pgherald.repartition_v1(p_count integer) RETURNS integer
LANGUAGE plpgsql SET lock_timeout = '1s' AS $$
DECLARE
    v_old integer := pgherald.partition_count_v1();
    r record;
BEGIN
    IF p_count IS NULL OR p_count < 1 OR p_count > 256 THEN
        RAISE EXCEPTION 'the partition count must be between 1 and 256, not %', p_count
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_count = v_old THEN
        RETURN v_old;
    END IF;
    FOR r IN SELECT DISTINCT group_name FROM pgherald.positions_v2 LOOP
        PERFORM pg_advisory_xact_lock(hashtext('pgherald.group:' || r.group_name), 1000);
    END LOOP;
    LOCK TABLE pgherald.events_v1 IN ACCESS EXCLUSIVE MODE;
    CREATE TEMPORARY TABLE pgherald_earliest ON COMMIT DROP AS
        SELECT DISTINCT ON (group_name, channel) group_name, channel, tx, event_id, skip,
               updated_at, every_channel
        FROM pgherald.positions_v2
        ORDER BY group_name, channel, tx, event_id;
    DELETE FROM pgherald.positions_v2;
    INSERT INTO pgherald.positions_v2 (group_name, channel, partition, tx, event_id, skip,
                                       updated_at, every_channel)
    SELECT e.group_name, e.channel, p, e.tx, e.event_id, e.skip, e.updated_at, e.every_channel
    FROM pgherald_earliest AS e CROSS JOIN generate_series(0, p_count - 1) AS p;
    ALTER TABLE pgherald.events_v1 DROP COLUMN partition;  -- and events_v1_read with it
    IF p_count = 16 THEN  -- as installed
        ALTER TABLE pgherald.events_v1 ADD COLUMN partition smallint
            GENERATED ALWAYS AS (hashtext(coalesce(key, id::text)) & 15) STORED;
    ELSE
        EXECUTE format('ALTER TABLE pgherald.events_v1 ADD COLUMN partition smallint '
                       'GENERATED ALWAYS AS ((hashtext(coalesce(key, id::text)) & 2147483647) '
                       '%% %s) STORED', p_count);
    END IF;
    CREATE INDEX events_v1_read ON pgherald.events_v1 (channel, partition, tx, id);
    UPDATE pgherald.dead_letters_v1 AS d SET partition = e.partition
    FROM pgherald.events_v1 AS e WHERE e.id = d.event_id;
    INSERT INTO pgherald.settings_v1 (name, value) VALUES ('partitions', p_count)
    ON CONFLICT (name) DO UPDATE SET value = excluded.value;
    RETURN v_old;
END
$$;

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
-- rows are copied from these when a consumer first reads it).
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

-- Wake-ups that carry their event (0.1.0_17). A consumer waiting for a wake-up (and holding
-- the shared lock (wake_v1, 18) besides the 17 of wait_for_wakeups: it takes notes) hands an event
-- to its handler straight from the notification, without reading the log, when it can prove
-- that nothing before the event in the log's order is still to come:
-- * "older": the transactions older than the event's that still ran when it was stored (at
--   most 8, else '*'): when they are none (or the consumer's own, which publish nothing),
--   every older publisher had committed, so its wake-up came first;
-- * "skips": the value of pgherald.wake_skips_v1, which every publisher that sees a consumer
--   waiting and still sends no wake-up (another transaction is sending one, or the NOTIFY
--   queue is half full) bumps first: a consumer that sees it unchanged since it began to wait
--   knows that every commit since then woke it.
-- Anyone can NOTIFY any channel, so the note is signed with a secret that only the schema's
-- owner (and the roles it grants SELECT on wake_secret_v1 to: consumers) can read; this
-- function (any role may call it) signs only events of the caller's own transaction, read
-- back from the log, so a signature never vouches for anything that was not published.
-- The note: 'n1|' hmac '|' id '|' tx '|' partition '|' created_at (epoch microseconds) '|'
-- older (transaction ids, comma-separated) '|' skips '|' the lengths (characters) of channel, key and headers (-1: NULL)
-- '|' then channel, key, headers and payload (jsonb text) run together. hmac is the hex
-- sha256 of the secret and the hex sha256 of the secret and all that follows 'n1|' hmac '|'.
-- '' (a plain wake-up) when the note would not fit in a notification.
CREATE SEQUENCE pgherald.wake_skips_v1;
GRANT USAGE, SELECT ON SEQUENCE pgherald.wake_skips_v1 TO PUBLIC;

CREATE TABLE pgherald.wake_secret_v1 (secret text NOT NULL);
REVOKE ALL ON TABLE pgherald.wake_secret_v1 FROM PUBLIC;
INSERT INTO pgherald.wake_secret_v1 (secret)
SELECT CAST(gen_random_uuid() AS text) || CAST(gen_random_uuid() AS text);

CREATE FUNCTION pgherald.wake_note_v1(p_id bigint, p_created_at timestamptz) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
-- The log is partitioned by created_at: a custom plan for each call would cost more than the
-- rest of the function (a generic one prunes partitions when it runs). The generic plans'
-- estimates (set-returning functions of 1,000 rows) are past jit_above_cost: no JIT, which
-- would compile for 9 ms at each call.
SET plan_cache_mode = force_generic_plan
SET jit = off
AS $$
DECLARE
    v_tx xid8 := pg_current_xact_id_if_assigned();
    v_snap pg_snapshot;
    v_older text := '';
    v_body text;
    v_secret text;
BEGIN
    IF v_tx IS NULL THEN
        RETURN '';  -- no event of this transaction
    END IF;
    -- Running and older than this transaction: the snapshot's xip below it, and every id from
    -- its xmax (one past the latest transaction that ended) up to it: those run too, but a
    -- snapshot does not list them. Usually none (xmin and xmax not below it).
    v_snap := pg_current_snapshot();
    IF pg_snapshot_xmin(v_snap) < v_tx OR pg_snapshot_xmax(v_snap) < v_tx THEN
        SELECT CASE WHEN count(*) > 8 THEN '*' ELSE coalesce(string_agg(CAST(x AS text), ','), '') END
        INTO v_older
        FROM (SELECT CAST(CAST(x AS text) AS bigint) FROM pg_snapshot_xip(v_snap) AS x
              WHERE x < v_tx
              UNION ALL
              SELECT generate_series(CAST(CAST(pg_snapshot_xmax(v_snap) AS text) AS bigint),
                                     least(CAST(CAST(v_tx AS text) AS bigint) - 1,
                                           CAST(CAST(pg_snapshot_xmax(v_snap) AS text) AS bigint) + 8))
             ) AS u(x);
    END IF;
    SELECT concat_ws('|', e.id, e.tx, e.partition,
                     CAST(extract(epoch FROM e.created_at) * 1000000 AS bigint),
                     v_older,
                     (SELECT CASE WHEN s.is_called THEN s.last_value ELSE 0 END
                      FROM pgherald.wake_skips_v1 AS s),
                     char_length(e.channel), coalesce(char_length(e.key), -1),
                     coalesce(char_length(CAST(e.headers AS text)), -1),
                     e.channel || coalesce(e.key, '') || coalesce(CAST(e.headers AS text), '')
                     || CAST(e.payload AS text)),
           w.secret
    INTO v_body, v_secret
    FROM pgherald.events_v1 AS e, pgherald.wake_secret_v1 AS w
    WHERE e.id = p_id AND e.created_at = p_created_at AND e.tx = v_tx;
    IF v_body IS NULL OR octet_length(v_body) > 7800 THEN
        RETURN '';
    END IF;
    RETURN 'n1|' || encode(sha256(convert_to(v_secret || encode(sha256(convert_to(
        v_secret || v_body, 'UTF8')), 'hex'), 'UTF8')), 'hex') || '|' || v_body;
END
$$;
-- Publishers call it (through wake_v1, as themselves) when a consumer that takes notes waits:
-- granted to PUBLIC whatever the database's default privileges say. Safe: it signs the
-- caller's own events only.
GRANT EXECUTE ON FUNCTION pgherald.wake_note_v1(bigint, timestamptz) TO PUBLIC;

-- A consumer waits (the caller's try of its key found it): wake it, or count the wake-up not
-- sent. At most one publishing transaction at a time notifies (whoever holds the advisory
-- lock (wake_v1, 0)); none when the cluster's NOTIFY queue is over
-- pgherald.wake_max_queue_usage (default: half full). The wake-up is a note that carries
-- event p_id (wake_note_v1: an event of the caller's transaction) when a consumer that takes
-- notes waits (it holds (wake_v1, 18) too), 16 at most per transaction; else, or with p_id
-- NULL, a plain one (''), which NOTIFY folds into one per transaction. Publish's statement
-- calls it only when a consumer waits: PostgreSQL sets up every expression of a statement at
-- each execution, run or not, and these cost the statement nothing while they are in here.
CREATE FUNCTION pgherald.wake_v1(p_id bigint, p_created_at timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF pg_try_advisory_xact_lock(hashtext('pgherald.wake_v1'), 0)
       AND pg_notification_queue_usage()
           < coalesce(nullif(current_setting('pgherald.wake_max_queue_usage', true), '')::float8, 0.5)
    THEN
        IF p_id IS NULL THEN
            PERFORM pg_notify('pgherald_wake_v1', '');
        ELSIF pg_try_advisory_lock(hashtext('pgherald.wake_v1'), 18) THEN
            -- no consumer that takes notes waits (the gateway's log tail, say): a plain one
            PERFORM pg_advisory_unlock(hashtext('pgherald.wake_v1'), 18);
            PERFORM pg_notify('pgherald_wake_v1', '');
        ELSIF set_config('pgherald.wake_notes', (coalesce(nullif(
                  current_setting('pgherald.wake_notes', true), '')::integer, 0) + 1)::text,
                  true)::integer > 16 THEN
            -- a transaction of many events: plain wake-ups (NOTIFY folds them into one)
            PERFORM pg_notify('pgherald_wake_v1', '');
        ELSE
            PERFORM pg_notify('pgherald_wake_v1', pgherald.wake_note_v1(p_id, p_created_at));
        END IF;
    ELSIF nextval('pgherald.wake_skips_v1') > 0 THEN
        NULL;  -- a consumer waits and this commit does not wake it: see wake_note_v1
    END IF;
END
$$;
-- Publish's statement names it (so the privilege is checked even when no consumer waits):
-- granted to PUBLIC whatever the database's default privileges say, like wake_note_v1.
GRANT EXECUTE ON FUNCTION pgherald.wake_v1(bigint, timestamptz) TO PUBLIC;

-- publish: store the event in the caller's transaction and wake consumers, cheaply.
-- A NOTIFY in every writer's transaction would serialise all their commits on PostgreSQL's
-- global notify lock; instead only when a consumer waits for a wake-up (waiting consumers hold
-- the shared session locks (wake_v1, 1) to (wake_v1, 17), so our exclusive try of one of them
-- fails; a busy one needs none), and then at most one publishing transaction at a time
-- notifies (whoever holds the advisory lock (wake_v1, 0)), and consumers that wake keep reading
-- briefly to catch the others. Each publishing session tries its own one of 16 keys (2 to 17,
-- by backend pid), so that concurrent publishers' tries do not meet on one lock (and do not
-- take each other's try for a waiting consumer); (wake_v1, 1) is for earlier versions'
-- triggers, which try that one.
-- No NOTIFY at all when the cluster's NOTIFY queue is half full (a stuck listener elsewhere):
-- a full queue would make this commit fail. Consumers also poll, so nothing waits forever.
CREATE FUNCTION pgherald.publish_v1(
    p_channel text, p_payload jsonb, p_key text DEFAULT NULL, p_headers jsonb DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
    v_created_at timestamptz;
BEGIN
    INSERT INTO pgherald.events_v1 (channel, key, payload, headers)
    VALUES (p_channel, p_key, p_payload, p_headers)
    RETURNING id, created_at INTO v_id, v_created_at;
    IF pg_try_advisory_lock(hashtext('pgherald.wake_v1'), 2 + mod(pg_backend_pid(), 16)) THEN
        IF pg_advisory_unlock(hashtext('pgherald.wake_v1'), 2 + mod(pg_backend_pid(), 16)) THEN
            NULL;  -- no consumer waits: none needs a wake-up
        END IF;
    ELSIF pgherald.wake_v1(v_id, v_created_at) IS NULL THEN
        NULL;  -- a consumer waits: wake_v1 wakes it (no PERFORM: no executor for it)
    END IF;
    RETURN v_id;
END
$$;


-- Row changes as JSON events, for triggers added by `pgherald trigger add`.
-- Arguments (TG_ARGV): channel ('' = schema.table), columns (JSON array; '[]' = all), durable
-- ('t' = store the full event in pgherald.events_v1; the NOTIFY then only wakes consumers),
-- then the key columns, one argument each (`trigger add` puts the primary key's there; none:
-- no key, as for triggers added before 0.1.0_09). The key is read from the whole row, NEW (OLD
-- for a DELETE): one column's value as text (->>), several columns' values as a JSON array
-- (text). A durable event is stored under it, so one row's events share a partition of the
-- log and stay in order within a consumer group.
-- A row too wide for NOTIFY (8000 bytes) never fails the write: without durable, the event is
-- reduced to the key columns (or, for a trigger without any, the primary key's) with
-- "truncated": true, for the reader to fetch the row. If that is still too wide, it loses
-- "changed" (the key finds the row); if the key alone is too wide, the key instead, keeping
-- "changed"; both only when neither fits.
-- Nor does a full NOTIFY queue (one listener idle in a transaction anywhere in the cluster
-- fills it, and then every COMMIT that notifies fails): without durable, past
-- pgherald.change_max_queue_usage (default 0.9) the event is not sent; listeners miss it.
-- This runs for every changed row, and mostly in one-row transactions, where PL/pgSQL sets up
-- again, in each transaction, every expression it meets and every query it runs: so the usual
-- paths run as few statements as they can, and a single query, the UPDATE diff ("IF
-- pg_notify(...) IS NULL", not PERFORM, which would be another). A one-column key is one
-- expression; only a composite key runs a query.
CREATE FUNCTION pgherald.notify_change_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_channel text := nullif(TG_ARGV[0], '');
    v_columns text[];
    v_new jsonb;
    v_old jsonb;
    v_row jsonb;
    v_key text;
    v_changed jsonb;
    v_event jsonb;
    v_text text;
    v_pk text[];
    v_id bigint;
BEGIN
    IF v_channel IS NULL THEN
        -- Only triggers from `sql trigger add` (written without a connection) name no channel;
        -- the default names the table the trigger was added to, for a partition its root.
        v_channel := (
            SELECT n.nspname || '.' || c.relname FROM pg_class AS c
            JOIN pg_namespace AS n ON n.oid = c.relnamespace
            WHERE c.oid = coalesce(pg_partition_root(TG_RELID), TG_RELID));
    END IF;
    v_new := to_jsonb(NEW);  -- NULL where there is no NEW (DELETE, TRUNCATE), as for OLD
    v_old := to_jsonb(OLD);
    IF TG_ARGV[1] <> '[]' THEN
        v_columns := ARRAY(SELECT jsonb_array_elements_text(TG_ARGV[1]::jsonb));
        IF cardinality(v_columns) > 0 THEN
            v_row := coalesce(v_new, v_old);  -- whole, for the key
            v_new := (SELECT jsonb_object_agg(k, v) FROM jsonb_each(v_new) AS e(k, v)
                      WHERE k = ANY (v_columns));
            v_old := (SELECT jsonb_object_agg(k, v) FROM jsonb_each(v_old) AS e(k, v)
                      WHERE k = ANY (v_columns));
        END IF;
    END IF;
    IF TG_OP = 'UPDATE' AND TG_LEVEL = 'ROW' THEN
        -- The changed columns, in the order of the keys of "new" and "old" (jsonb's order, as
        -- jsonb_object_keys returns them: nothing in this plan sorts). One query costs less
        -- than a loop over the keys (a jsonpath keyvalue() to list them, then a PL/pgSQL
        -- statement per key); in a select list, the set-returning function needs no tuplestore.
        v_changed := nullif(to_jsonb(ARRAY(
            SELECT k FROM (SELECT jsonb_object_keys(v_new)) AS s(k)
            WHERE v_new -> k IS DISTINCT FROM v_old -> k)), '[]');
        IF v_changed IS NULL THEN
            RETURN NULL;  -- nothing (that we watch) changed: no event
        END IF;
    END IF;
    IF TG_ARGV[2] = 't' THEN
        IF TG_NARGS = 4 THEN  -- one key column, the usual primary key
            v_key := coalesce(v_row, v_new, v_old) ->> TG_ARGV[3];
        ELSIF TG_NARGS > 4 AND TG_LEVEL = 'ROW' THEN  -- in the order of the arguments
            v_key := to_jsonb(ARRAY(
                SELECT coalesce(v_row, v_new, v_old) -> c FROM unnest(TG_ARGV[3:]) AS c))::text;
        END IF;
        -- publish_v1 inlined (one PL/pgSQL call less per row): keep the row and the probe in
        -- step with it; the wake-up itself is wake_v1's (created_at is now()).
        INSERT INTO pgherald.events_v1 (channel, key, payload) VALUES (v_channel, v_key,
            jsonb_build_object(
                'op', TG_OP, 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
                'new', v_new, 'old', v_old, 'changed', v_changed,
                'tx', pg_current_xact_id()::text, 'ts', clock_timestamp()))
        RETURNING id INTO v_id;
        IF pg_try_advisory_lock(hashtext('pgherald.wake_v1'), 2 + mod(pg_backend_pid(), 16)) THEN
            IF pg_advisory_unlock(hashtext('pgherald.wake_v1'), 2 + mod(pg_backend_pid(), 16)) THEN
                NULL;  -- no consumer waits (as in publish_v1)
            END IF;
        ELSIF pgherald.wake_v1(v_id, now()) IS NULL THEN
            NULL;  -- a consumer waits (as below: no PERFORM, which would go through the executor)
        END IF;
        RETURN NULL;
    END IF;
    IF pg_notification_queue_usage()
       >= coalesce(nullif(current_setting('pgherald.change_max_queue_usage', true), '')::float8, 0.9)
    THEN
        RETURN NULL;  -- the queue is nearly full: the write goes on, without its event
    END IF;
    -- Byte for byte the text of jsonb_build_object(...)::text (keys in jsonb's order), without
    -- copying new and old into a second jsonb first. format(), not concat(), which looks up
    -- an output function for each of its pieces; no ::text casts, each one more to set up.
    v_text := format(
        '{"op": "%s", "ts": %s, "tx": "%s", "new": %s, "old": %s, "table": %s, "schema": %s, '
        '"changed": %s}',
        TG_OP, to_json(clock_timestamp()), pg_current_xact_id(), coalesce(v_new, 'null'),
        coalesce(v_old, 'null'), to_json(TG_TABLE_NAME), to_json(TG_TABLE_SCHEMA),
        coalesce(v_changed, 'null'));
    IF octet_length(v_text) >= 8000 THEN
        IF TG_NARGS > 3 THEN
            v_pk := TG_ARGV[3:];
        ELSE
            v_pk := ARRAY(
                SELECT a.attname FROM pg_index AS i
                JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                WHERE i.indrelid = TG_RELID AND i.indisprimary);
        END IF;
        v_event := jsonb_build_object(
            'op', TG_OP, 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME, 'changed', v_changed,
            'tx', pg_current_xact_id()::text, 'ts', clock_timestamp(), 'truncated', true,
            'key', (SELECT jsonb_object_agg(k, v)
                    FROM jsonb_each(coalesce(to_jsonb(NEW), to_jsonb(OLD))) AS e(k, v)
                    WHERE k = ANY (v_pk)));
        v_text := v_event::text;
        IF octet_length(v_text) >= 8000 THEN  -- a huge key, or changed-column list
            v_text := (v_event - 'changed')::text;  -- the key first: it finds the row
            IF octet_length(v_text) >= 8000 THEN  -- the key alone is too wide
                v_text := (v_event - 'key')::text;
                IF octet_length(v_text) >= 8000 THEN  -- and so is changed
                    v_text := (v_event - 'key' - 'changed')::text;
                END IF;
            END IF;
        END IF;
    END IF;
    IF pg_notify(v_channel, v_text) IS NULL THEN
        NULL;  -- pg_notify returns void, never NULL
    END IF;
    RETURN NULL;
END
$$;

-- DDL events, for `pgherald ddl enable` (event triggers need a superuser).
CREATE FUNCTION pgherald.notify_ddl_v1() RETURNS event_trigger
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    IF TG_EVENT = 'sql_drop' THEN
        FOR r IN SELECT * FROM pg_event_trigger_dropped_objects() LOOP
            PERFORM pg_notify('pgherald_ddl', jsonb_build_object(
                'event', TG_EVENT, 'command_tag', TG_TAG, 'object_type', r.object_type,
                'schema', r.schema_name, 'object_identity', r.object_identity)::text);
        END LOOP;
    ELSE
        FOR r IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
            PERFORM pg_notify('pgherald_ddl', jsonb_build_object(
                'event', TG_EVENT, 'command_tag', r.command_tag, 'object_type', r.object_type,
                'schema', r.schema_name, 'object_identity', r.object_identity)::text);
        END LOOP;
    END IF;
END
$$;

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

-- Today's partition of the log and the next three days'.
SELECT pgherald.add_log_partitions_v1(now(), 3);
