-- Search by a raw value (`pii-vault tokenize`): an analyst with an IP or a
-- device id from a ticket gets the tokens that value has in user_logins,
-- without revealing anyone. Whoever can tokenize can test guesses, so it
-- is a role of its own, audited and limited like a reveal.
--
-- * pii_vault_searcher: reads the wrapped token keys and the allow-list
--   (it unwraps the token key itself; its KMS policy allows that and
--   nothing else) and records each search through pii_vault_search_record
--   (functions/70_search.sql). No data, no tokens, no trail.
-- * reveal_policy.max_searches_per_day: searches per login per 24 hours.
-- * searches: each recorded search, its tokens (never the value) and how
--   many honeytokens it matched; owner only, like reveal_requests, so
--   that no searcher, revealer or analyst can tell it hit a trap.
--   audit_alarms (functions/30_reveal.sql) shows the ones that did.
--
-- The role is cluster-wide, so it is made only if missing (as in 0002);
-- the functions, views and grants are in migrations/postgres/functions/.

SELECT set_config('search_path', format('%I, pg_temp', current_schema()), true);

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pii_vault_searcher') THEN
        BEGIN
            CREATE ROLE pii_vault_searcher NOLOGIN;
        EXCEPTION
            -- Another database of the cluster is migrating at the same
            -- time and created it first.
            WHEN duplicate_object OR unique_violation THEN NULL;
        END;
    END IF;
    IF pg_has_role((SELECT datdba FROM pg_database WHERE datname = current_database()), 'USAGE') THEN
        EXECUTE format('GRANT CONNECT ON DATABASE %I TO pii_vault_searcher', current_database());
    ELSE
        RAISE NOTICE 'not the owner of database %: grant CONNECT to pii_vault_searcher if PUBLIC lacks it',
            current_database();
    END IF;
    IF pg_has_role((SELECT nspowner FROM pg_namespace WHERE nspname = current_schema()), 'USAGE') THEN
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO pii_vault_searcher', current_schema());
        EXECUTE format('REVOKE CREATE ON SCHEMA %I FROM pii_vault_searcher', current_schema());
    ELSE
        RAISE NOTICE 'not the owner of schema %: grant USAGE on it to pii_vault_searcher if PUBLIC lacks it',
            current_schema();
    END IF;
END
$$;

ALTER TABLE reveal_policy
    ADD COLUMN max_searches_per_day integer NOT NULL DEFAULT 200 CHECK (max_searches_per_day >= 1);

CREATE TABLE searches (
    -- The id of its audit row (action `search`). No foreign key: `audit
    -- archive` deletes old trail rows, and a search's alarm outlives them.
    record        bigint PRIMARY KEY,
    kind          text NOT NULL CHECK (kind IN ('ip', 'ip_net', 'device_id')),
    tokens        text[] NOT NULL,
    requested_by  text NOT NULL,
    requested_at  timestamptz NOT NULL,
    honeytokens   bigint NOT NULL DEFAULT 0
);
CREATE INDEX searches_by ON searches (requested_by, requested_at);
REVOKE ALL ON searches FROM PUBLIC;
