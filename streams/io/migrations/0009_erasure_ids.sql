-- The message ids an erasure deleted from user_logins (`streams erase`, step 4), kept only
-- until its tombstones are written (step 5): captured in the delete's own transaction, so a
-- rerun after kill -9 tombstones the same ids without reading the whole masked topic. The
-- erasure's `done` step deletes them: afterwards no table keeps which message ids were the
-- user's (the append-only erasure_steps hold counts only).
CREATE TABLE erasure_ids (
    seq         bigint NOT NULL REFERENCES erasure_ledger (seq),
    message_id  text NOT NULL,
    PRIMARY KEY (seq, message_id)
);
GRANT SELECT, INSERT, DELETE ON erasure_ids TO streams_eraser;
