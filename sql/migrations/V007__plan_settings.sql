-- Planner settings of the hot-path functions, measured with 100,000 queued commands and two
-- worker processes:
--
-- * finish / extend / release: no nested loops. Their generic plans (plpgsql switches to one
--   after five calls) take unnest(array) for 10 rows and, with statistics from before the
--   claims began, `status = 'IN_PROGRESS'` for 1 row; the plan then put the command rows
--   outside a nested loop and re-read the whole input array once per row: 1,000,000 row
--   comparisons and ~800 ms for a flush of 1,000 instead of a few ms. With nested loops off
--   the join is a hash join whatever the estimates say (only the LATERAL audit VALUES still
--   nest, the one way to run them). The claim keeps nested loops: pgmq.read's own UPDATE
--   joins its locked rows back to the queue table by index, which is a nested loop.
-- * all four: no JIT. PostgreSQL 15 prices a disabled plan node at 1e10, far above
--   jit_above_cost, and JIT-compiled each flush (~400 ms per call); these statements touch
--   at most a few thousand rows and never gain from JIT.
ALTER FUNCTION commandbus.finish_commands_v1(
    TEXT, UUID[], BIGINT[], INT[], TEXT[], JSONB[], TEXT[], TEXT[], TEXT[], JSONB[], INT[], INT
) SET enable_nestloop = off SET jit = off;
ALTER FUNCTION commandbus.extend_leases_v1(TEXT, UUID[], BIGINT[], INT[], INT)
    SET enable_nestloop = off SET jit = off;
ALTER FUNCTION commandbus.release_commands_v1(TEXT, UUID[], BIGINT[], INT[])
    SET enable_nestloop = off SET jit = off;
ALTER FUNCTION commandbus.claim_commands_v1(TEXT, INT, INT, INT) SET jit = off;

-- Recorded by the migration itself, so get_schema_sql() output run by any tool is tracked too.
INSERT INTO commandbus.schema_migrations (version, name) VALUES (7, 'plan_settings') ON CONFLICT (version) DO NOTHING;
