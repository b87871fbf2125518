-- A mask-only worker in per-user key mode (the default of `make run`, compose and the k8s
-- example; docs/privacy.md) stores each new lifetime key and per-user data key before the
-- Kafka transaction that uses them, and checks the schema version at start. This role
-- grants exactly that: insert into the key store, read nothing back. Grant it beside
-- streams_erasure_watch to the mask Deployment's login role:
--   CREATE ROLE streams_mask LOGIN PASSWORD '...' IN ROLE streams_erasure_watch, streams_key_writer;
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'streams_key_writer') THEN
        CREATE ROLE streams_key_writer NOLOGIN;
    END IF;
EXCEPTION
    WHEN duplicate_object OR unique_violation THEN NULL;  -- made meanwhile by a migration of another database
END
$$;
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO streams_key_writer', current_database());
END
$$;
GRANT USAGE ON SCHEMA public TO streams_key_writer;
GRANT INSERT ON key_lifetimes, user_data_keys TO streams_key_writer;
GRANT SELECT ON schema_migrations TO streams_key_writer;
