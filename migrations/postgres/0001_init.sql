-- The analyst table: masked tokens only, never an IP or a device id.
--
-- Written to run on an empty database and on one that already holds the
-- legacy analyst table (no id, no message_id, app_version integer): that
-- table is converted in place and keeps every row, because analysts' history
-- lives in it. user_id stays nullable for the same reason (legacy rows may
-- lack one); the writer always sets it.
CREATE TABLE IF NOT EXISTS user_logins (
    id               bigserial PRIMARY KEY,
    message_id       text NOT NULL,
    user_id          varchar(128),
    device_type      varchar(32),
    masked_ip        varchar(256),
    masked_device_id varchar(256),
    locale           varchar(32),
    app_version      text,
    create_date      date,
    CONSTRAINT user_logins_message_id_key UNIQUE (message_id)
);

-- Legacy conversion. Each step checks the catalog rather than using
-- `ADD COLUMN IF NOT EXISTS ... bigserial`, which would still create an
-- orphan sequence on some server versions when the column exists.
DO $$
BEGIN
    -- "2.3.0" is not an integer: keep versions losslessly as text.
    IF EXISTS (
        SELECT 1 FROM information_schema.columns
        WHERE table_schema = current_schema() AND table_name = 'user_logins'
          AND column_name = 'app_version' AND data_type <> 'text'
    ) THEN
        ALTER TABLE user_logins ALTER COLUMN app_version TYPE text USING app_version::text;
    END IF;

    -- Adding a bigserial column numbers the existing rows.
    IF NOT EXISTS (
        SELECT 1 FROM information_schema.columns
        WHERE table_schema = current_schema() AND table_name = 'user_logins'
          AND column_name = 'id'
    ) THEN
        ALTER TABLE user_logins ADD COLUMN id bigserial PRIMARY KEY;
    END IF;

    -- Legacy rows never came through SQS: give them a placeholder that no
    -- SQS message id (a UUID) can collide with, so the column can be unique.
    IF NOT EXISTS (
        SELECT 1 FROM information_schema.columns
        WHERE table_schema = current_schema() AND table_name = 'user_logins'
          AND column_name = 'message_id'
    ) THEN
        ALTER TABLE user_logins ADD COLUMN message_id text;
    END IF;
    UPDATE user_logins SET message_id = 'legacy-' || id WHERE message_id IS NULL;
    ALTER TABLE user_logins ALTER COLUMN message_id SET NOT NULL;

    -- The writer's idempotency rests on this (ON CONFLICT (message_id)).
    IF NOT EXISTS (
        SELECT 1 FROM pg_constraint
        WHERE conrelid = 'user_logins'::regclass AND conname = 'user_logins_message_id_key'
    ) THEN
        ALTER TABLE user_logins ADD CONSTRAINT user_logins_message_id_key UNIQUE (message_id);
    END IF;
END
$$;

CREATE INDEX IF NOT EXISTS user_logins_user_id ON user_logins (user_id);
CREATE INDEX IF NOT EXISTS user_logins_masked_ip ON user_logins (masked_ip);
CREATE INDEX IF NOT EXISTS user_logins_masked_device_id ON user_logins (masked_device_id);

-- Wrapped keys only: data keys (purpose 'vault'), token keys ('token') and
-- the key behind file-line message ids ('line-ids').
CREATE TABLE vault_keys (
    id           text PRIMARY KEY,
    purpose      text NOT NULL CHECK (purpose IN ('vault', 'token', 'line-ids')),
    version      bigint NOT NULL DEFAULT 0,
    kek_id       text NOT NULL,
    wrapped      bytea,
    state        text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'retired', 'destroyed')),
    created_at   timestamptz NOT NULL,
    usage_count  bigint NOT NULL DEFAULT 0
);
-- Two workers that both find no token key race to create version 1: this
-- index lets exactly one of them win.
CREATE UNIQUE INDEX vault_keys_token_version ON vault_keys (version) WHERE purpose = 'token';

-- AES-256-GCM ciphertexts of the originals, bound to message_id, user_id and key_id.
CREATE TABLE vault (
    message_id  text PRIMARY KEY,
    user_id     varchar(128) NOT NULL,
    key_id      text NOT NULL REFERENCES vault_keys (id),
    nonce       bytea NOT NULL,
    ciphertext  bytea NOT NULL
);
CREATE INDEX vault_user_id ON vault (user_id);
CREATE INDEX vault_key_id ON vault (key_id);

-- Rejected messages: value-free reason, body sealed like vault data.
CREATE TABLE quarantine (
    message_id   text PRIMARY KEY,
    reason_code  text NOT NULL,
    reason       text NOT NULL,
    user_id      varchar(128),
    key_id       text REFERENCES vault_keys (id),
    nonce        bytea,
    ciphertext   bytea,
    received_at  timestamptz NOT NULL
);
CREATE INDEX quarantine_user_id ON quarantine (user_id);

-- Who revealed or erased what, when and why.
CREATE TABLE audit_log (
    id         bigserial PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),
    actor      text NOT NULL,
    action     text NOT NULL,
    target     text NOT NULL,
    reason     text NOT NULL,
    row_count  bigint NOT NULL
);

-- An audit trail that its subjects could edit would prove nothing: refuse
-- UPDATE, DELETE and TRUNCATE for every role short of disabling the trigger.
CREATE FUNCTION audit_log_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END
$$;
CREATE TRIGGER audit_log_no_update_delete BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
