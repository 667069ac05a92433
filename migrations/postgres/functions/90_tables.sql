-- What each role may read and write directly. Everything else goes
-- through the functions of the other files.
--
-- The owner (the role that runs `pii-vault migrate`) keeps every right on
-- its tables; the triggers refuse even the owner what nobody may do.

SELECT set_config('search_path', format('%I, pg_temp', current_schema()), true);

-- ------------------------------------------------------------------ worker
-- Appends only. SELECT on message_id and create_date alone: INSERT … ON
-- CONFLICT (message_id, create_date) … RETURNING message_id needs them (the
-- conflict target's columns), and the tokens stay
-- unreadable (a worker holds the token key, which with the tokens would
-- invert them by enumerating IPs). No id: the sequence numbers logins.
GRANT INSERT (message_id, user_id, device_type, masked_ip, masked_device_id, masked_ip_net, locale, app_version,
              create_date),
      SELECT (message_id, create_date)
    ON user_logins TO pii_vault_worker;
DO $$
BEGIN
    -- The sequence's name differs where 0001 converted a legacy table.
    EXECUTE format('GRANT USAGE ON SEQUENCE %s TO pii_vault_worker', pg_get_serial_sequence('user_logins', 'id'));
END
$$;
-- INSERT without SELECT: the vault insert has no ON CONFLICT, and the
-- quarantine insert's ON CONFLICT DO NOTHING names no conflict target (a
-- target needs SELECT on its columns). Keys only through
-- pii_vault_register_data_key / pii_vault_retire_data_key.
GRANT INSERT ON vault, quarantine TO pii_vault_worker;
-- The first-load days of file lines: line_ranges (0019) only through
-- pii_vault_line_days; line_dates (0017), read-only since 0019, by nobody.
REVOKE ALL ON line_dates, line_ranges FROM pii_vault_worker;
GRANT SELECT ON vault_keys, kms_allowlist TO pii_vault_worker;

-- ----------------------------------------------------------------- analyst
GRANT SELECT ON user_logins TO pii_vault_analyst;

-- ---------------------------------------------------------------- revealer
-- Reads the trail and the keys (which KEK wraps what); ciphertext only
-- through a recorded reveal; writes the trail only through the functions.
GRANT SELECT ON user_logins, vault_keys, kms_allowlist, audit_log, reveal_policy TO pii_vault_revealer;

-- ----------------------------------------------------------------- rotator
-- Key ids and owners of sealed rows, never their ciphertext (only through
-- a recorded job); no write of its own anywhere.
GRANT SELECT ON user_logins, vault_keys, kms_allowlist TO pii_vault_rotator;
GRANT SELECT (message_id, user_id, key_id) ON vault TO pii_vault_rotator;
GRANT SELECT (message_id, reason_code, reason, user_id, key_id, received_at) ON quarantine TO pii_vault_rotator;

-- ----------------------------------------------------------------- auditor
-- The trail, both chains' heads, the checkpoints, the requests (alarms and
-- the users each returned) and the erasures' users: everything `audit
-- verify`, `export` and `checkpoint` read. No data, no tokens beyond the
-- selectors named in the trail itself, no keys. Writes only through
-- pii_vault_checkpoint_store and pii_vault_subject_ledger.
GRANT SELECT ON audit_log, audit_chain, audit_checkpoints, reveal_requests, erasure_subjects, audit_alarms,
      reveal_policy
    TO pii_vault_auditor;

-- ---------------------------------------------------------------- searcher
-- The wrapped token keys and the allow-list, to unwrap the token key
-- (`tokenize`); its KMS policy lets it unwrap that key and no other.
-- Searches are recorded only through pii_vault_search_record. No logins,
-- no vault, no quarantine, no trail.
GRANT SELECT ON vault_keys, kms_allowlist TO pii_vault_searcher;
