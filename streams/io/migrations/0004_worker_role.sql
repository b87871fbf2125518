-- The worker runs as a least-privilege role: DML on its two tables, nothing else.
-- `streams migrate` (the schema owner, a separate step) changes the schema; the worker
-- only checks that the database is at its version (it reads schema_migrations).
--
-- Roles are cluster-wide, so streams_worker is created only if missing (another database
-- of the cluster may have made it). It cannot log in: grant it to the worker's login role,
--   CREATE ROLE streams_app LOGIN PASSWORD '...' IN ROLE streams_worker;
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'streams_worker') THEN
        CREATE ROLE streams_worker NOLOGIN;
    END IF;
EXCEPTION
    WHEN duplicate_object OR unique_violation THEN NULL;  -- made meanwhile by a migration of another database
END
$$;

-- CONNECT (clusters often revoke it from PUBLIC) and TEMP: the sink may stage a batch in
-- a temporary table (COPY into it, then one upsert from it).
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO streams_worker', current_database());
END
$$;
GRANT USAGE ON SCHEMA public TO streams_worker;
-- The sink upserts logins (INSERT ... ON CONFLICT DO UPDATE reads and updates) and deletes
-- the rows of tombstones. It only adds vault ciphertexts (ON CONFLICT (field, token) DO
-- NOTHING, which reads the conflict columns): the ciphertexts stay readable by
-- streams_reveal alone (docs/privacy.md), not by a leaked worker login.
GRANT SELECT, INSERT, UPDATE, DELETE ON user_logins TO streams_worker;
GRANT INSERT, SELECT (field, token) ON pii_vault TO streams_worker;
-- The start-up check: is the schema at the version this worker needs?
GRANT SELECT ON schema_migrations TO streams_worker;
