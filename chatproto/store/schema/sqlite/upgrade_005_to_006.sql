-- From version 5 to 6: groups people manage (17-21). A group has a subject,
-- and a held 11 or 18 carries its text (an 11's members then, an 18's name).
-- Rows held before keep a NULL body: such an 11 lists the members as they
-- are when it is sent, as before. Run inside the upgrade's transaction;
-- schema_version is set by the code.
ALTER TABLE groups ADD COLUMN subject BLOB;
ALTER TABLE groups ADD COLUMN subject_src TEXT;
ALTER TABLE groups ADD COLUMN subject_ts INTEGER;
ALTER TABLE inbox ADD COLUMN body BLOB;
-- A user's held 18s, by group: a newer one replaces the one still held.
CREATE INDEX inbox_subjects ON inbox (user_id, dst) WHERE code = 18;
