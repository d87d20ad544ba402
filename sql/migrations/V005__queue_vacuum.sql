-- Queue tables vacuumed early: autovacuum settings of their own for every PGMQ queue table.
--
-- Each command's queue message is inserted, leased (an UPDATE of vt, which PGMQ indexes: a new
-- index entry each time) and deleted or archived. Until a vacuum removes them, the dead entries
-- stay in the vt index, at its low end: exactly where every lease (lease_messages_v1: vt <= now
-- ORDER BY vt) starts its scan. Measured on a queue table with no vacuum, the lease of 256
-- messages read 172 index and heap pages after 200,000 commands and 1,767 after 800,000 (1.4 ms
-- -> 5.6 ms per lease), and the worker's rate fell with it until a VACUUM brought it back.
--
-- PostgreSQL's defaults vacuum a table once its dead rows pass 50 + 20% of its live rows. A queue
-- table holds few live rows, but autovacuum also waits out autovacuum_vacuum_cost_delay between
-- pages, and shares its workers with the big command and audit tables. So each queue table
-- gets, as storage parameters (they change nothing but autovacuum's choices, and take no lock
-- that blocks reads or writes):
--   * autovacuum_vacuum_threshold 10000, scale factor 0: vacuum after 10,000 dead rows, whatever
--     the table's size;
--   * autovacuum_vacuum_cost_delay 0: vacuum a queue table in one go (its live part is small, and
--     a vacuum of it takes well under a second);
--   * autovacuum_analyze_threshold 10000, scale factor 0: the same for statistics;
--   * vacuum_index_cleanup on: every vacuum also cleans the indexes. By default (auto) a vacuum
--     skips its index pass when under 2% of the table's pages hold dead rows, and a queue table
--     that once held a big backlog is large while each early vacuum finds few dead rows: the
--     index pass was skipped every time, and the lease's scan over the vt index kept growing.
-- How often autovacuum looks at all is the server's autovacuum_naptime (1 min by default; the
-- embedded server uses 10 s): see "Vacuum" in the README.
--
-- tune_queue_table_v1 (V001) applies them to one queue's table, and ensure_queue_v1 (V001) to
-- each queue it creates; this migration applies them to every queue table that existed before
-- (a database upgraded from reliable-cmd 0.2.2) and that this role owns (a queue table another
-- role owns is left to it: `SELECT commandbus.tune_queue_table_v1('<queue>')`).

DO $$
DECLARE
    v_queue TEXT;
BEGIN
    FOR v_queue IN
        SELECT m.queue_name FROM pgmq.meta m
        JOIN pg_class c ON c.oid = to_regclass(format('pgmq.%I', 'q_' || m.queue_name))
        WHERE c.relowner = (SELECT r.oid FROM pg_roles r WHERE r.rolname = current_user)
    LOOP
        PERFORM commandbus.tune_queue_table_v1(v_queue);
    END LOOP;
END $$;

INSERT INTO commandbus.schema_migrations (version, name) VALUES (5, 'queue_vacuum') ON CONFLICT (version) DO NOTHING;
