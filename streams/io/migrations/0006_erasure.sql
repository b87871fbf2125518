-- Erasure by user (issue 19 item 4, `streams erase`): the ledger, the stages' confirmations,
-- the vault keyed by user, and a least-privilege role for the erasing operator.

-- The erasure ledger: one row per erasure request. Its seq is the ledger version the
-- stages confirm. No free text: a reason code and an optional ticket reference; the
-- database stamps the time and its own session user, so the writer cannot choose them.
CREATE TABLE erasure_ledger (
    seq        bigserial PRIMARY KEY,
    user_id    varchar(128) NOT NULL,
    erased_at  timestamptz NOT NULL DEFAULT now(),
    reason     text NOT NULL CHECK (reason ~ '^[a-z][a-z0-9_]{0,39}$'),
    ticket     text CHECK (ticket ~ '^[A-Za-z0-9][A-Za-z0-9._:#/-]{0,63}$'),
    db_user    text,
    os_user    text CHECK (os_user ~ '^[A-Za-z0-9._:@-]{1,64}$')
);
CREATE INDEX erasure_ledger_user ON erasure_ledger (user_id);

-- Which steps of an erasure are done (counts only), so a rerun reports what it resumed.
CREATE TABLE erasure_steps (
    seq      bigint NOT NULL REFERENCES erasure_ledger (seq),
    step     text NOT NULL,
    detail   jsonb NOT NULL DEFAULT '{}',
    done_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (seq, step)
);

CREATE FUNCTION erasure_ledger_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.db_user := session_user;
    NEW.erased_at := now();
    RETURN NEW;
END
$$;
CREATE TRIGGER erasure_ledger_stamp BEFORE INSERT ON erasure_ledger
    FOR EACH ROW EXECUTE FUNCTION erasure_ledger_stamp();

-- Append-only for everyone, the owner included (as pii_reveal_audit, migration 0003).
CREATE FUNCTION erasure_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER erasure_ledger_no_change BEFORE UPDATE OR DELETE ON erasure_ledger
    FOR EACH ROW EXECUTE FUNCTION erasure_append_only();
CREATE TRIGGER erasure_ledger_no_truncate BEFORE TRUNCATE ON erasure_ledger
    FOR EACH STATEMENT EXECUTE FUNCTION erasure_append_only();
CREATE TRIGGER erasure_steps_no_change BEFORE UPDATE OR DELETE ON erasure_steps
    FOR EACH ROW EXECUTE FUNCTION erasure_append_only();
CREATE TRIGGER erasure_steps_no_truncate BEFORE TRUNCATE ON erasure_steps
    FOR EACH STATEMENT EXECUTE FUNCTION erasure_append_only();

-- Each running stage's heartbeat: the ledger version it applied at a transaction
-- boundary. `streams erase` waits until every live stage shows its entry's version.
CREATE TABLE erasure_stage_versions (
    instance  text PRIMARY KEY,
    stage     text NOT NULL,
    version   bigint NOT NULL,
    seen_at   timestamptz NOT NULL DEFAULT now()
);

-- The vault keyed by (user_id, field, token), so erasure deletes one user's entries and
-- keeps another user's copy of a shared value. Existing entries are kept: one copy per
-- user whose logins carry the token; an entry no login carries keeps user_id '' (owner
-- unknown). Key columns in (field, token, user_id) order: the sink looks tokens up.
ALTER TABLE pii_vault ADD COLUMN user_id varchar(128);
ALTER TABLE pii_vault DROP CONSTRAINT pii_vault_pkey;
INSERT INTO pii_vault (user_id, field, token, key_id, ciphertext, created_at)
SELECT DISTINCT l.user_id, v.field, v.token, v.key_id, v.ciphertext, v.created_at
FROM pii_vault v
JOIN user_logins l ON (v.field = 'ip' AND l.masked_ip = v.token)
                   OR (v.field = 'device_id' AND l.masked_device_id = v.token)
WHERE v.user_id IS NULL;
DELETE FROM pii_vault v WHERE v.user_id IS NULL
    AND EXISTS (SELECT 1 FROM pii_vault o WHERE o.user_id IS NOT NULL AND o.field = v.field AND o.token = v.token);
UPDATE pii_vault SET user_id = '' WHERE user_id IS NULL;
ALTER TABLE pii_vault ALTER COLUMN user_id SET NOT NULL, ALTER COLUMN user_id SET DEFAULT '';
ALTER TABLE pii_vault ADD PRIMARY KEY (field, token, user_id);
CREATE INDEX pii_vault_user ON pii_vault (user_id);
CREATE INDEX user_logins_user ON user_logins (user_id);

-- Reveal audit: whose data was opened (or refused as erased) is its user_id column (0005).

-- The worker: reads the ledger, reports its confirmations, writes vault rows by user.
GRANT SELECT ON erasure_ledger TO streams_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON erasure_stage_versions TO streams_worker;
GRANT SELECT (user_id) ON pii_vault TO streams_worker;
-- Reveal refuses erased users.
GRANT SELECT ON erasure_ledger TO streams_reveal;

-- A mask-only worker needs the database for the ledger alone: this role reads the ledger
-- and writes the stage's confirmations, nothing else (no user_logins, no vault). Grant it
-- to the mask Deployment's login role: CREATE ROLE streams_mask LOGIN PASSWORD '...' IN ROLE streams_erasure_watch;
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'streams_erasure_watch') THEN
        CREATE ROLE streams_erasure_watch NOLOGIN;
    END IF;
EXCEPTION
    WHEN duplicate_object OR unique_violation THEN NULL;  -- made meanwhile by a migration of another database
END
$$;
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO streams_erasure_watch', current_database());
END
$$;
GRANT USAGE ON SCHEMA public TO streams_erasure_watch;
GRANT SELECT ON erasure_ledger TO streams_erasure_watch;
GRANT SELECT, INSERT, UPDATE, DELETE ON erasure_stage_versions TO streams_erasure_watch;

-- The erasing operator: appends to the ledger and its steps (never changes them), sees
-- the stages' confirmations, deletes a user's rows and vault entries, and (once the key
-- store exists) a user's data keys. Nothing else: no read of ciphertexts' plaintext,
-- no DDL. Grant it to a login role: CREATE ROLE bob LOGIN PASSWORD '...' IN ROLE streams_eraser;
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'streams_eraser') THEN
        CREATE ROLE streams_eraser NOLOGIN;
    END IF;
EXCEPTION
    WHEN duplicate_object OR unique_violation THEN NULL;  -- made meanwhile by a migration of another database
END
$$;
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO streams_eraser', current_database());
    IF to_regclass('user_data_keys') IS NOT NULL THEN
        EXECUTE 'GRANT SELECT, DELETE ON user_data_keys TO streams_eraser';
    END IF;
    IF to_regclass('sealed_values') IS NOT NULL THEN
        EXECUTE 'GRANT SELECT (message_id, user_id), DELETE ON sealed_values TO streams_eraser';
    END IF;
END
$$;
GRANT USAGE ON SCHEMA public TO streams_eraser;
GRANT SELECT, INSERT ON erasure_ledger, erasure_steps TO streams_eraser;
GRANT USAGE ON SEQUENCE erasure_ledger_seq_seq TO streams_eraser;
GRANT SELECT ON erasure_stage_versions, schema_migrations TO streams_eraser;
GRANT SELECT, DELETE ON user_logins TO streams_eraser;
GRANT SELECT (user_id, field, token, key_id, created_at), DELETE ON pii_vault TO streams_eraser;
