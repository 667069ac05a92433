-- The embedded default's share of the trust boundaries of the Postgres
-- store (migrations/postgres/0003_trust_boundaries.sql). One SQLite file
-- has no logins: whoever can write the file is its owner, so these rules
-- guard against mistakes and stale state, not against another role.

-- The key-encryption keys stored keys may be wrapped under.
CREATE TABLE kms_allowlist (
    kek_id    TEXT PRIMARY KEY,
    added_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    added_by  TEXT NOT NULL DEFAULT ''
);
INSERT INTO kms_allowlist (kek_id, added_by)
SELECT DISTINCT kek_id, 'migration 0002' FROM vault_keys WHERE state <> 'destroyed';

CREATE TRIGGER vault_keys_allowed_kek BEFORE INSERT ON vault_keys
WHEN NOT EXISTS (SELECT 1 FROM kms_allowlist WHERE kek_id = NEW.kek_id)
BEGIN SELECT RAISE(ABORT, 'PV002 the key-encryption key is not on the KMS allow-list (kms_allowlist)'); END;
CREATE TRIGGER vault_keys_allowed_kek_update BEFORE UPDATE OF kek_id ON vault_keys
WHEN NOT EXISTS (SELECT 1 FROM kms_allowlist WHERE kek_id = NEW.kek_id)
BEGIN SELECT RAISE(ABORT, 'PV002 the key-encryption key is not on the KMS allow-list (kms_allowlist)'); END;
CREATE TRIGGER vault_keys_no_revival BEFORE UPDATE OF state ON vault_keys
WHEN (OLD.state = 'destroyed' AND NEW.state <> 'destroyed') OR (OLD.state = 'retired' AND NEW.state = 'active')
BEGIN SELECT RAISE(ABORT, 'PV009 a retired or destroyed key cannot be brought back'); END;

ALTER TABLE vault_keys ADD COLUMN created_by TEXT;
ALTER TABLE audit_log ADD COLUMN claimed_actor TEXT;

-- Reveals in two steps, as on Postgres: the audit row, then the fetch.
CREATE TABLE reveal_requests (
    id            INTEGER PRIMARY KEY REFERENCES audit_log (id),
    selector      TEXT NOT NULL CHECK (selector IN ('user_id', 'masked_ip', 'masked_device_id')),
    value         TEXT NOT NULL,
    requested_by  TEXT NOT NULL,
    fetched_at    TEXT
);
