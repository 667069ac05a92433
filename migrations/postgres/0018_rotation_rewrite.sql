-- Rotations rewrite closed partitions instead of updating them in place.
--
-- Why: an in-place rotation leaves a dead tuple behind every row it
-- changes, so a rotated month is twice its size until VACUUM has read all
-- of it, and the rotation itself pays for the dead versions' index entries.
-- A closed month (one nobody writes to but a late redelivery) is instead
-- copied, re-sealed or re-tokenised, into a new table, which is indexed
-- and then swapped in for the old partition (functions/45_rewrite.sql).
--
-- One row per closed partition of a job, listed when the job starts:
-- `pending` until its new table is made, `filling` while rows go in,
-- `indexed` once its indexes and bounds are built, `swapped` once it
-- replaced the partition (`gone` when retention dropped the partition
-- first). A rerun of a killed job starts every partition not `swapped`
-- over, from a new table.
CREATE TABLE rotation_rewrites (
    job_id     bigint NOT NULL REFERENCES rotation_jobs (id),
    partition  text NOT NULL,
    parent     text NOT NULL CHECK (parent IN ('vault', 'user_logins')),
    -- The partition's bounds: lo NULL for one that starts at MINVALUE.
    lo         date,
    hi         date NOT NULL,
    state      text NOT NULL DEFAULT 'pending'
               CHECK (state IN ('pending', 'filling', 'indexed', 'swapped', 'gone')),
    rows_done  bigint NOT NULL DEFAULT 0,
    swapped_at timestamptz,
    PRIMARY KEY (job_id, partition)
);
