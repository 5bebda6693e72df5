-- From version 2 to 3: only group messages are looked up by destination, so
-- a direct message no longer adds an entry to messages_by_dst. Run inside the
-- upgrade's transaction; schema_version is set by the code.
DROP INDEX messages_by_dst;
CREATE INDEX messages_by_dst ON messages (dst, ts) WHERE dst >= '1';
