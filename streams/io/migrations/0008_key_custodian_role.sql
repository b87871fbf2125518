-- The key custodian (`streams keys seal`, scheduled: the CronJob in deploy/k8s, the
-- `key-seal` service in compose) re-wraps each lifetime-wrapped user data key by KMS under
-- its user's context. This role grants exactly that: read the lifetime-wrapped rows and
-- their lifetime keys, replace a row's wrapped form by its sealed form, append its audit
-- row, check the schema version. No logins, no sealed values, no vault. Grant it to the
-- custodian's login role:
--   CREATE ROLE streams_seal LOGIN PASSWORD '...' IN ROLE streams_key_custodian;
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'streams_key_custodian') THEN
        CREATE ROLE streams_key_custodian NOLOGIN;
    END IF;
EXCEPTION
    WHEN duplicate_object OR unique_violation THEN NULL;  -- made meanwhile by a migration of another database
END
$$;
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO streams_key_custodian', current_database());
END
$$;
GRANT USAGE ON SCHEMA public TO streams_key_custodian;
GRANT SELECT ON key_lifetimes, schema_migrations TO streams_key_custodian;
GRANT SELECT (user_id, key_id, wrapped_key, sealed_key), UPDATE (wrapped_key, sealed_key) ON user_data_keys
    TO streams_key_custodian;
GRANT INSERT ON pii_reveal_audit TO streams_key_custodian;
GRANT USAGE ON SEQUENCE pii_reveal_audit_id_seq TO streams_key_custodian;
