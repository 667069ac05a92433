-- Whose body each `quarantine show` showed, kept with the show: the
-- quarantined row's user id (salvaged from the body, when it had one) is
-- cleared when the message is replayed or its user forgotten, and a data
-- subject's ledger (`audit subject`) must still list the showing. Shows
-- recorded before this migration get it from rows still quarantined.
ALTER TABLE quarantine_reveals ADD COLUMN user_id text;
UPDATE quarantine_reveals s SET user_id = q.user_id
FROM quarantine q WHERE q.message_id = s.message_id AND q.user_id IS NOT NULL;
