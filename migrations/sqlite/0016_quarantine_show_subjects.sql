-- What migrations/postgres/0016_quarantine_show_subjects.sql brought, on
-- the embedded default: whose body each `quarantine show` showed, for the
-- data subject's ledger.
ALTER TABLE quarantine_reveals ADD COLUMN user_id TEXT;
UPDATE quarantine_reveals SET user_id = (
    SELECT q.user_id FROM quarantine q WHERE q.message_id = quarantine_reveals.message_id
);
