-- Who revealed what, and when: one row per `streams reveal` attempt, never the value.
CREATE TABLE pii_reveal_audit (
    id          bigserial PRIMARY KEY,
    revealed_at timestamptz NOT NULL DEFAULT now(),
    operator    text NOT NULL,
    reason      text,
    field       text,
    token       varchar(256),
    message_id  text,
    outcome     text NOT NULL
);

-- Join-key rotation state: old token -> new token per field, filled from the vault by
-- `streams keys rejoin` and emptied when the rotation finishes. Lets the user_logins
-- rewrite be batched, interrupted and rerun without the raw topic.
CREATE TABLE join_token_map (
    field      text NOT NULL,
    old_token  varchar(256) NOT NULL,
    new_token  varchar(256) NOT NULL,
    PRIMARY KEY (field, old_token)
);
CREATE INDEX pii_vault_key_id ON pii_vault (key_id);
