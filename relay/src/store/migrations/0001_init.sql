-- dchat relay store, schema version 1.
-- Messages held for offline recipients. Rows of acknowledged messages are kept (with
-- the envelope cleared) until expiry so that a retry of the same id stays a duplicate.
CREATE TABLE messages (
    seq           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    recipient     BYTEA   NOT NULL CHECK (octet_length(recipient) = 32),
    sender        BYTEA   NOT NULL CHECK (octet_length(sender) = 32),
    msg_id        TEXT    NOT NULL,
    channel       TEXT,
    timestamp_ms  BIGINT  NOT NULL,
    expires_at_ms BIGINT  NOT NULL,
    kind          TEXT    NOT NULL,
    envelope      BYTEA   NOT NULL,
    acked         BOOLEAN NOT NULL DEFAULT FALSE,
    CONSTRAINT messages_dedup UNIQUE (recipient, sender, msg_id)
);
-- Pending per recipient in seq order; acknowledged rows are not in the index.
CREATE INDEX messages_pending ON messages (recipient, seq) WHERE NOT acked;
-- What expire() deletes, without a full scan.
CREATE INDEX messages_expiry ON messages (expires_at_ms);

CREATE TABLE profiles (
    key        BYTEA  PRIMARY KEY CHECK (octet_length(key) = 32),
    profile    BYTEA  NOT NULL,
    updated_ms BIGINT NOT NULL
);

CREATE TABLE channel_members (
    channel TEXT  NOT NULL,
    member  BYTEA NOT NULL CHECK (octet_length(member) = 32),
    PRIMARY KEY (channel, member)
);
