-- 0.1.0: the partition count set at install (default 16, up to 256), changed by
-- `pgherald partitions N` (see docs/durable.md).

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
