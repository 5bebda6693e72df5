-- chatproto schema, version 6, whole: a fresh database is made from this file,
-- an older one is brought here by the upgrade_*.sql files (tests/test_schema.py
-- checks that both end the same). Ids are 13-digit text, timestamps Unix seconds.
CREATE TABLE schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version (version) VALUES (6);

CREATE TABLE users (
    id TEXT PRIMARY KEY,
    secret_hash TEXT,            -- NULL for an account made with 01
    created INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE groups (
    id TEXT PRIMARY KEY,
    ts INTEGER NOT NULL,         -- the TIMESTAMP of the 10 that made it
    created INTEGER NOT NULL,
    low_mark INTEGER NOT NULL,   -- every member has read up to here
    -- Since version 6, the group's subject (17), NULL until one is set:
    subject BLOB,                -- the NAME, UTF-8 without its NUL padding
    subject_src TEXT,            -- the member who set it
    subject_ts INTEGER           -- the TIMESTAMP of its 17
) WITHOUT ROWID;

-- The current members: a member who leaves (20) is deleted; one added (19)
-- comes after the others.
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
    remaining INTEGER NOT NULL,  -- a group message's members that have not got it yet; 0 for a direct one
    body_hash INTEGER            -- CRC-32 of body; NULL after a collision
);
-- A message is identified by (src, dst, ts, body): a resend is refused here,
-- by a short key. Since version 4 the index holds the body's CRC-32, not
-- the body: a resend whose hash matches has its body compared in the
-- code, and a different body with the same hash is stored with a NULL one.
CREATE UNIQUE INDEX messages_identity ON messages (src, dst, ts, body_hash);
-- Since version 5 a direct message's delivery is its hold's end alone: it
-- is delivered when no inbox row holds it, and its remaining stays 0 (one
-- row operation a delivery, not two).
-- Only group messages are looked up by destination (a group id starts with
-- 1, a user id with 0); since version 3 a direct message adds no entry here.
CREATE INDEX messages_by_dst ON messages (dst, ts) WHERE dst >= '1';

-- Everything held for a user until it reaches them: messages (code 6) until
-- delivered or acknowledged, and 07, 09, 11, 18, 21 until their next login.
CREATE TABLE inbox (
    seq INTEGER PRIMARY KEY,
    user_id TEXT NOT NULL,
    code INTEGER NOT NULL,
    msg_id INTEGER,
    src TEXT NOT NULL,
    dst TEXT NOT NULL,
    ts INTEGER NOT NULL,
    -- Since version 6: an 11's members then (their ids joined), an 18's
    -- name; NULL otherwise (and in an 11 held before: the members now).
    body BLOB
);
CREATE INDEX inbox_by_user ON inbox (user_id, seq);
CREATE INDEX inbox_by_message ON inbox (msg_id);
-- Since version 6: a user's held 18s, by group. A newer 18 for a group
-- replaces the one still held (it says all the older one said).
CREATE INDEX inbox_subjects ON inbox (user_id, dst) WHERE code = 18;

-- Since version 2: when the database was made or upgraded, and the copy
-- taken before each upgrade, so an operator can find it (chatproto-admin check).
CREATE TABLE schema_history (
    version INTEGER NOT NULL,    -- the version reached
    applied INTEGER NOT NULL,    -- Unix seconds
    previous INTEGER,            -- the version upgraded from; NULL when made at this version
    backup TEXT                  -- the copy made before the upgrade, if any
);
