-- From version 4 to 5: a direct message (to a user, whose id starts with 0)
-- no longer counts its recipient down; it is delivered when no inbox row
-- holds it, so its remaining is 0 whether it was delivered or not. Group
-- messages keep their count. Run inside the upgrade's transaction;
-- schema_version is set by the code.
UPDATE messages SET remaining = 0 WHERE dst < '1' AND remaining != 0;
