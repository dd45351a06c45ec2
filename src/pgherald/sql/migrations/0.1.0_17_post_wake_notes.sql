-- 0.1.0: wake-ups that carry their event, for consumers to hand it out without reading the
-- log when they can prove its order (see wake_note_v1 in schema.sql); publishers that see a
-- consumer waiting and send no wake-up count it in wake_skips_v1.

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

CREATE OR REPLACE FUNCTION pgherald.publish_v1(
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

CREATE OR REPLACE FUNCTION pgherald.notify_change_v1() RETURNS trigger
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
            v_text := (v_event - 'key' - 'changed')::text;
        END IF;
    END IF;
    IF pg_notify(v_channel, v_text) IS NULL THEN
        NULL;  -- pg_notify returns void, never NULL
    END IF;
    RETURN NULL;
END
$$;
