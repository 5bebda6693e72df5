-- From version 6 to 7: a message's text is kept only until every recipient
-- has it, in a table of its own (texts); messages keeps the identities. The
-- texts still to deliver move there (a direct message an inbox row holds, a
-- group message a member still waits for); the ones already delivered are
-- left behind when messages is rebuilt without its body column, so they are
-- gone when the upgrade commits (their pages are free for reuse; the copy
-- taken before the upgrade still has them). Users get last_seen, from now:
-- nobody's held messages are old by --expire-held's measure until that long
-- after the upgrade. Run inside the upgrade's transaction; schema_version is
-- set by the code.
CREATE TABLE texts (
    msg_id INTEGER PRIMARY KEY,
    body BLOB NOT NULL
);
INSERT INTO texts (msg_id, body)
SELECT id, body FROM messages
WHERE (dst >= '1' AND remaining > 0)
   OR (dst < '1' AND EXISTS (SELECT 1 FROM inbox WHERE msg_id = messages.id AND code = 6));
CREATE TABLE messages_v6 (
    id INTEGER PRIMARY KEY,
    src TEXT NOT NULL,
    dst TEXT NOT NULL,
    ts INTEGER NOT NULL,
    remaining INTEGER NOT NULL,
    body_hash INTEGER
);
INSERT INTO messages_v6 (id, src, dst, ts, remaining, body_hash)
SELECT id, src, dst, ts, remaining, body_hash FROM messages;
DROP TABLE messages;
ALTER TABLE messages_v6 RENAME TO messages;
CREATE UNIQUE INDEX messages_identity ON messages (src, dst, ts, body_hash);
CREATE INDEX messages_by_dst ON messages (dst, ts) WHERE dst >= '1';
ALTER TABLE users ADD COLUMN last_seen INTEGER NOT NULL DEFAULT 0;
UPDATE users SET last_seen = CAST(strftime('%s', 'now') AS INTEGER);
CREATE TABLE retention_marks (
    at INTEGER PRIMARY KEY,
    last_id INTEGER NOT NULL
);
