-- 0.1.0: a reduced event (of a row too wide for NOTIFY) that is still too wide loses only what
-- does not fit: "changed" first (the key finds the row), else the key (keeping "changed"), and
-- both only when neither fits; it lost both whenever either was too wide.

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
