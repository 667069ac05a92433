-- The names of this database's roles. Roles belong to the cluster, not to
-- a database, so two vaults on one cluster that both used `pii_vault_worker`
-- would share their workers (a login granted it for one database could load
-- the other). `pii-vault migrate --role-prefix acme_vault` gives a database
-- roles of its own (`acme_vault_worker`, …): `migrate` applies every
-- migration and function file with the role names rewritten, and records
-- the prefix here on the first run, so that later runs (without the flag)
-- keep it and a different one is refused.
--
-- No role reads this table; the owner does, at `migrate`.
CREATE TABLE vault_settings (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    role_prefix text NOT NULL CHECK (role_prefix ~ '^[a-z][a-z0-9_]*[a-z0-9]$')
);

-- What precedes `_worker` in the worker role's name as this file was
-- applied: the prefix `migrate` rewrote the role names with (a database
-- migrated before this file has the default, `pii_vault`).
INSERT INTO vault_settings (role_prefix)
VALUES (left('pii_vault_worker', -length('_worker')));

REVOKE ALL ON TABLE vault_settings FROM PUBLIC;
