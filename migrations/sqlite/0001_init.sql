-- The analyst table: masked tokens only, never an IP or a device id.
CREATE TABLE IF NOT EXISTS user_logins (
    id               INTEGER PRIMARY KEY,
    message_id       TEXT NOT NULL UNIQUE,
    user_id          VARCHAR(128) NOT NULL,
    device_type      VARCHAR(32),
    masked_ip        VARCHAR(256),
    masked_device_id VARCHAR(256),
    locale           VARCHAR(32),
    app_version      TEXT,
    create_date      DATE
);
CREATE INDEX IF NOT EXISTS user_logins_user_id ON user_logins (user_id);
CREATE INDEX IF NOT EXISTS user_logins_masked_ip ON user_logins (masked_ip);
CREATE INDEX IF NOT EXISTS user_logins_masked_device_id ON user_logins (masked_device_id);

-- Wrapped keys only: data keys (purpose 'vault') and token keys ('token').
CREATE TABLE vault_keys (
    id           TEXT PRIMARY KEY,
    purpose      TEXT NOT NULL CHECK (purpose IN ('vault', 'token', 'line-ids')),
    version      INTEGER NOT NULL DEFAULT 0,
    kek_id       TEXT NOT NULL,
    wrapped      BLOB,
    state        TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'retired', 'destroyed')),
    created_at   TEXT NOT NULL,
    usage_count  INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX vault_keys_token_version ON vault_keys (version) WHERE purpose = 'token';

-- AES-256-GCM ciphertexts of the originals, bound to message_id, user_id and key_id.
CREATE TABLE vault (
    message_id  TEXT PRIMARY KEY,
    user_id     VARCHAR(128) NOT NULL,
    key_id      TEXT NOT NULL REFERENCES vault_keys (id),
    nonce       BLOB NOT NULL,
    ciphertext  BLOB NOT NULL
);
CREATE INDEX vault_user_id ON vault (user_id);
CREATE INDEX vault_key_id ON vault (key_id);

-- Rejected messages: value-free reason, body sealed like vault data.
CREATE TABLE quarantine (
    message_id   TEXT PRIMARY KEY,
    reason_code  TEXT NOT NULL,
    reason       TEXT NOT NULL,
    user_id      VARCHAR(128),
    key_id       TEXT REFERENCES vault_keys (id),
    nonce        BLOB,
    ciphertext   BLOB,
    received_at  TEXT NOT NULL
);
CREATE INDEX quarantine_user_id ON quarantine (user_id);

-- Who revealed or erased what, when and why.
CREATE TABLE audit_log (
    id         INTEGER PRIMARY KEY,
    at         TEXT NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    target     TEXT NOT NULL,
    reason     TEXT NOT NULL,
    row_count  INTEGER NOT NULL
);
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
