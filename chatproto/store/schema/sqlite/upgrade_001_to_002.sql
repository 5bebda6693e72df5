-- From version 1 to 2: a record of when the schema was made or upgraded.
-- Run inside the upgrade's transaction; schema_version is set by the code.
CREATE TABLE schema_history (
    version INTEGER NOT NULL,    -- the version reached
    applied INTEGER NOT NULL,    -- Unix seconds
    previous INTEGER,            -- the version upgraded from; NULL when made at this version
    backup TEXT                  -- the copy made before the upgrade, if any
);
