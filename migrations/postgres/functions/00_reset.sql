-- The trust boundary as it stands: every function, trigger, view and grant
-- of the schema, re-applied by `pii-vault migrate` after the versioned
-- migrations, in one transaction, in file-name order. Read these files to
-- know what each role may do today; the versioned files are history.
--
-- Rules for these files:
-- * everything is re-appliable: CREATE OR REPLACE, and each grant made
--   after this file took every grant away;
-- * a function's REVOKE and GRANT stand beside it; a function granted to
--   nobody is called by other functions (SECURITY DEFINER) or triggers;
-- * every function is SECURITY DEFINER with search_path fixed to the
--   schema and pg_temp last (tests/it/roles/catalogue.rs reads pg_proc to check it);
-- * a signature change needs a versioned migration that drops the old one
--   first; versioned migrations never call these functions.
--
-- This file: a clean slate, so that a grant removed from a file is removed
-- from the database too.

SELECT set_config('search_path', format('%I, pg_temp', current_schema()), true);

DO $$
DECLARE
    s constant text := quote_ident(current_schema());
    roles constant text := 'PUBLIC, pii_vault_worker, pii_vault_analyst, pii_vault_revealer, pii_vault_rotator, '
        || 'pii_vault_auditor, pii_vault_searcher';
BEGIN
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA %s FROM %s', s, roles);
    EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA %s FROM %s', s, roles);
    EXECUTE format('REVOKE ALL ON ALL FUNCTIONS IN SCHEMA %s FROM %s', s, roles);
END
$$;
