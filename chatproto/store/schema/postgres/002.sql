-- chatproto schema for PostgreSQL, version 2, whole: a fresh database is made
-- from this file, an older one is brought here by the upgrade_*.sql files.
-- The tables are SQLite's (schema/sqlite/), plus the sessions several nodes
-- share. Ids are 13-digit text, timestamps Unix seconds.
CREATE TABLE schema_version (version integer NOT NULL);
INSERT INTO schema_version (version) VALUES (2);

-- When the database was made or upgraded, like SQLite's.
CREATE TABLE schema_history (
    version integer NOT NULL,    -- the version reached
    applied bigint NOT NULL,     -- Unix seconds
    previous integer,            -- the version upgraded from; NULL when made at this version
    backup text                  -- unused here: PostgreSQL is backed up by its own tools
);

CREATE TABLE users (
    id text PRIMARY KEY,
    secret_hash text,            -- NULL for an account made with 01
    created bigint NOT NULL
);

CREATE TABLE groups (
    id text PRIMARY KEY,
    ts bigint NOT NULL,          -- the TIMESTAMP of the 10 that made it
    created bigint NOT NULL,
    low_mark bigint NOT NULL,    -- every member has read up to here
    -- Since version 2, the group's subject (17), NULL until one is set:
    subject bytea,               -- the NAME, UTF-8 without its NUL padding
    subject_src text,            -- the member who set it
    subject_ts bigint            -- the TIMESTAMP of its 17
);

-- The current members: a member who leaves (20) is deleted; one added (19)
-- comes after the others.
CREATE TABLE members (
    group_id text NOT NULL,
    user_id text NOT NULL,
    position integer NOT NULL,
    read_mark bigint NOT NULL,
    PRIMARY KEY (group_id, user_id)
);

-- Ids come from the sequence: every node writes here.
CREATE TABLE messages (
    id bigserial PRIMARY KEY,
    src text NOT NULL,
    dst text NOT NULL,           -- a user or a group
    ts bigint NOT NULL,
    body bytea NOT NULL,         -- UTF-8 text without its NUL padding
    remaining integer NOT NULL   -- recipients that have not got it yet
);
-- A message is identified by (src, dst, ts, body): a resend is refused here.
CREATE UNIQUE INDEX messages_identity ON messages (src, dst, ts, body);
CREATE INDEX messages_by_dst ON messages (dst, ts);

-- Everything held for a user until it reaches them: messages (code 6) until
-- delivered or acknowledged, and 07, 09, 11, 18, 21 until their next login.
CREATE TABLE inbox (
    seq bigserial PRIMARY KEY,
    user_id text NOT NULL,
    code smallint NOT NULL,
    msg_id bigint,
    src text NOT NULL,
    dst text NOT NULL,
    ts bigint NOT NULL,
    -- Since version 2: an 11's members then (their ids joined), an 18's
    -- name; NULL otherwise (and in an 11 held before: the members now).
    body bytea
);
CREATE INDEX inbox_by_user ON inbox (user_id, seq);
CREATE INDEX inbox_by_message ON inbox (msg_id, user_id) WHERE code = 6;
-- Since version 2: a user's held 18s, by group. A newer 18 for a group
-- replaces the one still held (it says all the older one said).
CREATE INDEX inbox_subjects ON inbox (user_id, dst) WHERE code = 18;

-- The node each logged-in user's session is on: one session per user across nodes.
CREATE TABLE sessions (
    user_id text PRIMARY KEY,
    node text NOT NULL,
    since bigint NOT NULL        -- when the login arrived: Unix milliseconds
);
