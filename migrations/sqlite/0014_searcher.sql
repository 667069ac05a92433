-- What migrations/postgres/0014_searcher.sql brought, on the embedded
-- default: the daily limit of searches (`pii-vault tokenize`) and the
-- record of each search, whose honeytoken matches join the alarms. One
-- SQLite file has one principal, so there is no role to make.

ALTER TABLE reveal_policy ADD COLUMN max_searches_per_day INTEGER NOT NULL DEFAULT 200
    CHECK (max_searches_per_day >= 1);

CREATE TABLE searches (
    record        INTEGER PRIMARY KEY,
    kind          TEXT NOT NULL CHECK (kind IN ('ip', 'ip_net', 'device_id')),
    -- A JSON array of the tokens, newest version first.
    tokens        TEXT NOT NULL,
    requested_by  TEXT NOT NULL,
    requested_at  TEXT NOT NULL,
    honeytokens   INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX searches_by ON searches (requested_by, requested_at);
CREATE TRIGGER searches_no_update BEFORE UPDATE ON searches
BEGIN SELECT RAISE(ABORT, 'PV009 searches is append-only'); END;
CREATE TRIGGER searches_no_delete BEFORE DELETE ON searches
BEGIN SELECT RAISE(ABORT, 'PV009 searches is append-only'); END;

DROP VIEW audit_alarms;
CREATE VIEW audit_alarms AS
    SELECT r.id, r.requested_at AS at, r.requested_by AS actor, r.id AS request_id,
           r.selector || '=' || r.value AS target, r.honeytokens
    FROM reveal_requests r
    WHERE r.honeytokens > 0
    UNION ALL
    SELECT s.record, s.requested_at, s.requested_by, s.record,
           CASE s.kind WHEN 'ip' THEN 'masked_ip' WHEN 'ip_net' THEN 'masked_ip_net' ELSE 'masked_device_id' END || '='
               || (SELECT group_concat(value, ',') FROM json_each(s.tokens)),
           s.honeytokens
    FROM searches s
    WHERE s.honeytokens > 0;
