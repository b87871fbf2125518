-- Per-user data keys (issue 19 items 2-3, docs/privacy.md): workers seal values under a
-- data key per user and worker lifetime; only audited paths open them, through KMS.

-- One row per worker lifetime: its key-encryption key, wrapped by KMS (context names the
-- deployment, purpose user-kek and this key id). The worker writes it, never reads it.
CREATE TABLE key_lifetimes (
    key_id      text PRIMARY KEY,
    kek_blob    bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The key store: one data key per (user, lifetime). `wrapped_key` is wrapped under the
-- lifetime key (what the worker writes); `sealed_key` is wrapped by KMS under a context
-- naming the user (what `streams keys seal` or the first audited open makes, dropping
-- `wrapped_key`). Erasure deletes a user's rows (streams.privacy.user_keys.erase_user_keys).
-- Data dumps leave this table out (pg_dump --exclude-table-data=user_data_keys).
CREATE TABLE user_data_keys (
    user_id      text NOT NULL,
    key_id       text NOT NULL,
    wrapped_key  bytea,
    sealed_key   bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key_id),
    CHECK (wrapped_key IS NOT NULL OR sealed_key IS NOT NULL)
);

-- Sealed values per login, written by the sink from the masked record, never rewritten:
-- the worker may INSERT (ON CONFLICT DO NOTHING) but not UPDATE or DELETE, so reveal by
-- message id reads a row the worker role cannot repoint (user_logins it may update).
CREATE TABLE sealed_values (
    message_id        text PRIMARY KEY,
    user_id           varchar(128) NOT NULL,
    masked_ip         varchar(256) NOT NULL,
    masked_device_id  varchar(256) NOT NULL,
    ip_sealed         bytea NOT NULL,
    device_id_sealed  bytea NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sealed_values_user_id ON sealed_values (user_id);
CREATE INDEX sealed_values_masked_ip ON sealed_values (masked_ip);
CREATE INDEX sealed_values_masked_device_id ON sealed_values (masked_device_id);

-- The mask worker stores new lifetimes and keys; it reads nothing back.
GRANT INSERT ON key_lifetimes, user_data_keys TO streams_worker;
-- The sink adds sealed values (the conflict check reads message_id only).
GRANT INSERT, SELECT (message_id) ON sealed_values TO streams_worker;
-- The decrypting paths: read sealed values and key rows, seal a key row on first open.
GRANT SELECT ON sealed_values, user_data_keys, key_lifetimes TO streams_reveal;
GRANT UPDATE (sealed_key, wrapped_key) ON user_data_keys TO streams_reveal;

-- The audit says which path opened whose data: who (operator, db_user, os_user), what
-- (action, user_id, field, token, message_id), why (reason).
ALTER TABLE pii_reveal_audit ADD COLUMN action text NOT NULL DEFAULT 'reveal', ADD COLUMN user_id text;
