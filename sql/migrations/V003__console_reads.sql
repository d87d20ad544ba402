-- The operator console's command detail: a command's queue message (its payload), wherever it
-- is now. The payload lives in the PGMQ message only: in the queue table while the command
-- waits or runs, in the archive once it finished.

CREATE OR REPLACE FUNCTION commandbus.command_message_v1(p_domain TEXT, p_msg_id BIGINT)
RETURNS JSONB
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_queue TEXT := 'q_' || p_domain || '__commands';
    v_msg JSONB;
BEGIN
    IF p_msg_id IS NULL THEN
        RETURN NULL;
    END IF;
    IF to_regclass(format('pgmq.%I', v_queue)) IS NOT NULL THEN
        EXECUTE format('SELECT message FROM pgmq.%I WHERE msg_id = $1', v_queue)
            INTO v_msg USING p_msg_id;
    END IF;
    RETURN coalesce(v_msg, commandbus.tsq_archived_message_v1(p_domain, p_msg_id));
END $$;

INSERT INTO commandbus.schema_migrations (version, name) VALUES (3, 'console_reads') ON CONFLICT (version) DO NOTHING;
