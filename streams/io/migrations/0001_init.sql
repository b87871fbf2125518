-- user_logins keeps the original table's columns (names and types) for analysts,
-- keyed by the SQS message id so every replay and redelivery lands on one row.
CREATE TABLE user_logins (
    message_id        text PRIMARY KEY,
    user_id           varchar(128) NOT NULL,
    device_type       varchar(32)  NOT NULL,
    masked_ip         varchar(256) NOT NULL,
    masked_device_id  varchar(256) NOT NULL,
    locale            varchar(32),
    app_version       integer,
    create_date       date NOT NULL,
    app_version_raw   text NOT NULL,
    sent_at           timestamptz NOT NULL,
    ip_is_valid       boolean NOT NULL DEFAULT true
);
CREATE INDEX user_logins_masked_ip ON user_logins (masked_ip);
CREATE INDEX user_logins_masked_device_id ON user_logins (masked_device_id);

-- Recovery ciphertexts, one row per distinct value per field. Restricted: grant it
-- only to the role that runs `streams reveal`.
CREATE TABLE pii_vault (
    field       text NOT NULL,
    token       varchar(256) NOT NULL,
    key_id      text NOT NULL,
    ciphertext  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (field, token)
);
