-- What the `rcmd` command line reads beyond the library's own queries (python/commandbus/cli/).

-- name: cli_check
-- What `rcmd check` reports about the server: its version (number and text), the pgmq
-- extension's version (NULL when PGMQ is absent or installed from SQL only), whether PGMQ's
-- tables exist, and whether the commandbus schema exists.
-- No parameters.
SELECT current_setting('server_version_num')::int AS version_num,
       current_setting('server_version') AS version,
       (SELECT extversion FROM pg_extension WHERE extname = 'pgmq') AS pgmq_version,
       to_regclass('pgmq.meta') IS NOT NULL AS pgmq_installed,
       to_regnamespace('commandbus') IS NOT NULL AS schema_present

-- name: cli_tsq_payload
-- The archived queue message of one command (what the TSQ listing shows as `payload`), for
-- `rcmd tsq show`; no row when the domain has no such command.
-- $1 domain TEXT, $2 command_id UUID
SELECT commandbus.tsq_archived_message_v1(c.domain, c.msg_id) AS payload
FROM commandbus.command c
WHERE c.domain = $1::text AND c.command_id = $2::uuid
