-- dchat relay store, schema version 1.
-- Messages held for offline recipients. Rows of acknowledged messages are kept (with
-- the envelope cleared) until expiry so that storing the same copy again stays a
-- duplicate (which sends are duplicates is decided by `sent_ids` below).
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

-- Every send a relay accepted, by (sender, id), until the message's expiry: the one
-- authority on duplicates for all relays sharing this database, also for messages that
-- were pushed live and never stored. A relay pushes, stores and answers a send only after
-- its row was inserted; a send that finds the row is a duplicate. `attempt` tells the
-- relay that inserted it apart from everyone else, so that it can repeat its insert when
-- it did not learn the outcome (a lost connection) and still find out that it won.
CREATE TABLE sent_ids (
    sender        BYTEA  NOT NULL CHECK (octet_length(sender) = 32),
    msg_id        TEXT   NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    attempt       BIGINT NOT NULL,
    PRIMARY KEY (sender, msg_id)
);
-- What expire() deletes, without a full scan.
CREATE INDEX sent_ids_expiry ON sent_ids (expires_at_ms);

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
