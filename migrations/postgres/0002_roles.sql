-- Least privilege: one NOLOGIN group role per kind of user of pii-vault.
-- Deployments give a login user the rights of one of them with
-- `GRANT pii_vault_worker TO their_login_user;` (and so on).
--
--   pii_vault_worker    `pii-vault run`: appends logins, vault rows,
--                       quarantined rows and keys; cannot read the vault,
--                       quarantine, audit trail or analysts' tokens.
--   pii_vault_analyst   reads user_logins, nothing else.
--   pii_vault_revealer  `pii-vault reveal`, `audit`, `keys list`: reads
--                       logins, vault and keys, appends audit rows; changes
--                       and deletes nothing.
--   pii_vault_rotator   `pii-vault rotate …`, `forget`: re-encrypts the
--                       vault, re-tokenises logins, re-wraps and retires
--                       keys, erases a user's vault rows, appends audit rows.
--
-- Only the owner (the role that runs `pii-vault migrate`) may change or
-- delete audit rows, and the triggers of 0001 refuse even the owner.
--
-- Roles are cluster-wide, so each is created only if missing. The role that
-- runs this migration therefore needs CREATEROLE (or superuser) unless a DBA
-- has created the four roles beforehand; granting a role to a login user
-- needs CREATEROLE on PostgreSQL 15 and older, ADMIN OPTION on the role from
-- 16 on (the creator of a role gets it automatically). A pre-existing role of
-- one of these names is used as it is: make sure it is NOLOGIN and holds no
-- attributes (SUPERUSER, BYPASSRLS, …) beyond what the deployment intends.
--
-- Privileges are per database: everything below applies to this database
-- only, and first revokes whatever the four roles (and PUBLIC) held on these
-- tables, so the grants here are exactly what each role has.
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['pii_vault_worker', 'pii_vault_analyst', 'pii_vault_revealer', 'pii_vault_rotator']
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION
                -- Another database of the cluster is migrating at the same
                -- time and created it first.
                WHEN duplicate_object OR unique_violation THEN NULL;
            END;
        END IF;
    END LOOP;
END
$$;

-- A clean slate on our objects: no PUBLIC rights (there are none by
-- default, but a database restored from elsewhere may carry some) and none
-- left over for the roles. Revoking table privileges revokes column
-- privileges too.
REVOKE ALL ON TABLE user_logins, vault, vault_keys, quarantine, audit_log
    FROM PUBLIC, pii_vault_worker, pii_vault_analyst, pii_vault_revealer, pii_vault_rotator;

DO $$
DECLARE
    roles CONSTANT text := 'pii_vault_worker, pii_vault_analyst, pii_vault_revealer, pii_vault_rotator';
    logins_seq CONSTANT text := pg_get_serial_sequence('user_logins', 'id');
    audit_seq CONSTANT text := pg_get_serial_sequence('audit_log', 'id');
BEGIN
    -- Sequence names differ when 0001 converted a legacy table.
    EXECUTE format('REVOKE ALL ON SEQUENCE %s, %s FROM PUBLIC, %s', logins_seq, audit_seq, roles);
    -- The worker takes ids for new logins; revealer and rotator for audit rows.
    EXECUTE format('GRANT USAGE ON SEQUENCE %s TO pii_vault_worker', logins_seq);
    EXECUTE format('GRANT USAGE ON SEQUENCE %s TO pii_vault_revealer, pii_vault_rotator', audit_seq);

    -- CONNECT and USAGE are PUBLIC's by default; granted explicitly so the
    -- roles keep working where a DBA revokes them from PUBLIC. Only the owner
    -- of the database (the schema) may grant them; other migrating roles
    -- leave that to the DBA.
    IF pg_has_role((SELECT datdba FROM pg_database WHERE datname = current_database()), 'USAGE') THEN
        EXECUTE format('GRANT CONNECT ON DATABASE %I TO %s', current_database(), roles);
    ELSE
        RAISE NOTICE 'not the owner of database %: grant CONNECT to the pii_vault_* roles if PUBLIC lacks it',
            current_database();
    END IF;
    IF pg_has_role((SELECT nspowner FROM pg_namespace WHERE nspname = current_schema()), 'USAGE') THEN
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO %s', current_schema(), roles);
        EXECUTE format('REVOKE CREATE ON SCHEMA %I FROM %s', current_schema(), roles);
        -- PostgreSQL 14 and older let PUBLIC create objects in schema
        -- public, where an object could shadow ours for whoever has that
        -- schema in its search_path (CVE-2018-1058); 15 no longer does.
        EXECUTE format('REVOKE CREATE ON SCHEMA %I FROM PUBLIC', current_schema());
    ELSE
        RAISE NOTICE 'not the owner of schema %: grant USAGE on it to the pii_vault_* roles if PUBLIC lacks it, and revoke CREATE on it from PUBLIC',
            current_schema();
    END IF;
END
$$;

-- ------------------------------------------------------------------ worker
-- Appends only. SELECT on message_id alone: INSERT … ON CONFLICT
-- (message_id) … RETURNING message_id needs it, and the tokens stay
-- unreadable (a worker holds the token key, which with the tokens would
-- invert them by enumerating IPs). No id: the sequence numbers logins.
GRANT INSERT (message_id, user_id, device_type, masked_ip, masked_device_id, locale, app_version, create_date),
      SELECT (message_id)
    ON user_logins TO pii_vault_worker;
-- INSERT without SELECT: the vault insert has no ON CONFLICT, and the
-- quarantine insert's ON CONFLICT DO NOTHING names no conflict target (a
-- target needs SELECT on its columns).
GRANT INSERT ON vault, quarantine TO pii_vault_worker;
-- Keys: reads the wrapped token and line-id keys (its KMS policy lets it
-- unwrap those and no vault key), stores the keys it creates and counts
-- uses. No UPDATE of `state`: a compromised worker could otherwise put a
-- retired key back to work and defeat the rotation fence. UPDATE on a
-- column also allows the batch fence's SELECT … FOR SHARE on the token key.
GRANT SELECT, INSERT, UPDATE (usage_count) ON vault_keys TO pii_vault_worker;

-- ----------------------------------------------------------------- analyst
GRANT SELECT ON user_logins TO pii_vault_analyst;

-- ---------------------------------------------------------------- revealer
-- Reads what a reveal decrypts, writes its audit row in the same
-- transaction. No id column: the sequence numbers audit rows, so the trail
-- has no gaps or clashes planted in advance.
GRANT SELECT ON user_logins, vault, vault_keys TO pii_vault_revealer;
GRANT SELECT, INSERT (at, actor, action, target, reason, row_count) ON audit_log TO pii_vault_revealer;

-- ----------------------------------------------------------------- rotator
-- rotate data-keys: re-seals vault rows and quarantined bodies in place.
-- rotate token-key: rewrites the two token columns, nothing else of a login.
-- rotate kek: re-wraps keys. forget: deletes vault and quarantine rows.
GRANT SELECT, UPDATE (masked_ip, masked_device_id) ON user_logins TO pii_vault_rotator;
GRANT SELECT, DELETE, UPDATE (key_id, nonce, ciphertext) ON vault, quarantine TO pii_vault_rotator;
GRANT SELECT, INSERT, UPDATE (state, wrapped, kek_id) ON vault_keys TO pii_vault_rotator;
GRANT INSERT (at, actor, action, target, reason, row_count) ON audit_log TO pii_vault_rotator;
