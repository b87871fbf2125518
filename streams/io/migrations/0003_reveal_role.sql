-- `streams reveal` runs as a least-privilege role, and its audit trail cannot be edited.

-- The reveal role: exactly what reveal needs (look a login up, read the vault, append an
-- audit row). Roles are cluster-wide, so it is created only if missing (another database
-- of the cluster may have made it); grant it to the login role of each person who may reveal:
--   CREATE ROLE alice LOGIN PASSWORD '...' IN ROLE streams_reveal;
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'streams_reveal') THEN
        CREATE ROLE streams_reveal NOLOGIN;
    END IF;
EXCEPTION
    WHEN duplicate_object OR unique_violation THEN NULL;  -- made meanwhile by a migration of another database
END
$$;
GRANT SELECT ON pii_vault, user_logins TO streams_reveal;
GRANT INSERT ON pii_reveal_audit TO streams_reveal;
GRANT USAGE ON SEQUENCE pii_reveal_audit_id_seq TO streams_reveal;

-- Who really asked: `operator` is what the person typed; `db_user` is the database
-- session user (set by the trigger below, so an INSERT cannot choose it) and `os_user`
-- the operating-system user of the reveal process. Rows older than this migration keep NULLs.
ALTER TABLE pii_reveal_audit ADD COLUMN db_user text, ADD COLUMN os_user text;

CREATE FUNCTION pii_reveal_audit_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.db_user := session_user;
    NEW.revealed_at := now();
    RETURN NEW;
END
$$;
CREATE TRIGGER pii_reveal_audit_stamp BEFORE INSERT ON pii_reveal_audit
    FOR EACH ROW EXECUTE FUNCTION pii_reveal_audit_stamp();

-- Append-only for everyone, the owner included: no UPDATE, DELETE or TRUNCATE.
-- (Dropping these triggers takes the table's owner and leaves a trace in the DDL log.)
CREATE FUNCTION pii_reveal_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'pii_reveal_audit is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER pii_reveal_audit_no_change BEFORE UPDATE OR DELETE ON pii_reveal_audit
    FOR EACH ROW EXECUTE FUNCTION pii_reveal_audit_append_only();
CREATE TRIGGER pii_reveal_audit_no_truncate BEFORE TRUNCATE ON pii_reveal_audit
    FOR EACH STATEMENT EXECUTE FUNCTION pii_reveal_audit_append_only();
