-- What migrations/postgres/0010_trust_boundaries_round_two.sql brought that
-- the embedded default shares (numbered as there, so that the two
-- histories line up from here on):
-- * a reveal's logins are fixed when it is recorded (reveal_request_rows);
-- * honeytoken logins wait for a worker to write them among real events
--   (honeytoken_logins).
-- One SQLite file has one principal, so the rest (leases, quotas, the
-- transaction-age check) has nothing to hold here.

CREATE TABLE reveal_request_rows (
    request_id  INTEGER NOT NULL REFERENCES reveal_requests (id),
    message_id  TEXT NOT NULL,
    PRIMARY KEY (request_id, message_id)
);
INSERT INTO reveal_request_rows (request_id, message_id)
SELECT r.id, l.message_id FROM reveal_requests r JOIN user_logins l
  ON (r.selector = 'user_id' AND l.user_id = r.value)
  OR (r.selector = 'masked_ip' AND l.masked_ip = r.value)
  OR (r.selector = 'masked_device_id' AND l.masked_device_id = r.value)
WHERE r.fetched_at IS NULL;

CREATE TABLE honeytoken_logins (
    id        INTEGER PRIMARY KEY,
    user_id   TEXT NOT NULL REFERENCES honeytokens (user_id),
    uuid_id   TEXT NOT NULL UNIQUE,
    line_id   TEXT NOT NULL UNIQUE,
    body      TEXT NOT NULL,
    due_at    TEXT NOT NULL
);
CREATE INDEX honeytoken_logins_due ON honeytoken_logins (due_at);

-- One live line-id key at most (as on Postgres).
CREATE UNIQUE INDEX vault_keys_one_line_id_key ON vault_keys (purpose)
    WHERE purpose = 'line-ids' AND state <> 'destroyed';
