-- From version 2 to 3: a message's text is kept only until every recipient
-- has it. Its identity becomes the text's SHA-256 (computed for every stored
-- message here), the texts already delivered (no recipient left) are
-- removed, users get last_seen from now (nobody's held messages are old by
-- --expire-held's measure until that long after the upgrade). Run inside the
-- upgrade's transaction; schema_version is set by the code.
ALTER TABLE users ADD COLUMN last_seen bigint NOT NULL DEFAULT 0;
UPDATE users SET last_seen = extract(epoch FROM now())::bigint;
ALTER TABLE messages ALTER COLUMN body DROP NOT NULL;
ALTER TABLE messages ADD COLUMN digest bytea;
UPDATE messages SET digest = sha256(body), body = CASE WHEN remaining = 0 THEN NULL ELSE body END;
ALTER TABLE messages ALTER COLUMN digest SET NOT NULL;
DROP INDEX messages_identity;
CREATE UNIQUE INDEX messages_identity ON messages (src, dst, ts, digest);
CREATE TABLE retention_marks (
    at bigint PRIMARY KEY,
    last_id bigint NOT NULL
);
