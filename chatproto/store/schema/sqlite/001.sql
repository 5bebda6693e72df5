-- chatproto schema, version 1, as the first release made it: the tests build
-- a first-release database from it to check the upgrades (upgrade_*.sql) end
-- where a fresh one (the newest NNN.sql) starts. Ids are 13-digit text,
-- timestamps Unix seconds.
CREATE TABLE schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version (version) VALUES (1);

CREATE TABLE users (
    id TEXT PRIMARY KEY,
    secret_hash TEXT,            -- NULL for an account made with 01
    created INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE groups (
    id TEXT PRIMARY KEY,
    ts INTEGER NOT NULL,         -- the TIMESTAMP of the 10 that made it
    created INTEGER NOT NULL,
    low_mark INTEGER NOT NULL    -- every member has read up to here
) WITHOUT ROWID;

CREATE TABLE members (
    group_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    read_mark INTEGER NOT NULL,
    PRIMARY KEY (group_id, user_id)
) WITHOUT ROWID;

CREATE TABLE messages (
    id INTEGER PRIMARY KEY,
    src TEXT NOT NULL,
    dst TEXT NOT NULL,           -- a user or a group
    ts INTEGER NOT NULL,
    body BLOB NOT NULL,          -- UTF-8 text without its NUL padding
    remaining INTEGER NOT NULL   -- recipients that have not got it yet
);
-- A message is identified by (src, dst, ts, body): a resend is refused here.
CREATE UNIQUE INDEX messages_identity ON messages (src, dst, ts, body);
CREATE INDEX messages_by_dst ON messages (dst, ts);

-- Everything held for a user until it reaches them: messages (code 6) until
-- delivered or acknowledged, and 07, 09, 11 until their next login.
CREATE TABLE inbox (
    seq INTEGER PRIMARY KEY,
    user_id TEXT NOT NULL,
    code INTEGER NOT NULL,
    msg_id INTEGER,
    src TEXT NOT NULL,
    dst TEXT NOT NULL,
    ts INTEGER NOT NULL
);
CREATE INDEX inbox_by_user ON inbox (user_id, seq);
CREATE INDEX inbox_by_message ON inbox (msg_id);
