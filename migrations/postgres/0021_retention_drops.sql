-- Retention's dropped months, dropped after its transaction on several
-- connections at once.
--
-- Why: retention (functions/50_erasure.sql) erases whole months by
-- detaching and dropping their vault partitions, and the time that takes
-- is the kernel's freeing of the dropped files at COMMIT (per byte, not
-- per row: about 1 s of the 1.03 s that erasing eleven months of 10 M
-- rows took with the vault in memory). One backend does that for every
-- file of a transaction in turn; several, each dropping its own months in
-- its own transaction, overlap it (measured on 6 GB of tables in the page
-- cache, on two cores: 2.6-2.7 s in one transaction, 1.8-1.9 s in two at
-- once, 1.0-1.5 s in four).
--
-- So retention's own transaction detaches the months, renames each out of
-- the way of a partition made again for a late row of its month, destroys
-- the keys that sealed only them and writes its audit row, all as before;
-- the detached tables wait here, each with its record, for
-- pii_vault_retention_drop_next(), which drops one a call. No role reads
-- a detached month (partitions carry no grants, 0017) and its data keys
-- are destroyed in the same transaction as the detach when nothing else
-- needs them.

SELECT set_config('search_path', format('%I, pg_temp', current_schema()), true);

CREATE TABLE retention_drops (
    -- The detached partition's name as renamed (`<month's name>_erased_<record>`).
    name    text PRIMARY KEY,
    -- The retention record (audit_log.id) that erased it. No foreign key:
    -- the audit archive may take that record before a drop left over from
    -- a killed run is finished.
    record  bigint NOT NULL
);
