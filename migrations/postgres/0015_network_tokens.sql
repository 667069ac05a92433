-- Network tokens: `masked_ip_net`, the token of the IP's /24 (IPv4) or /48
-- (IPv6) network, so that analysts can group logins by network. NULL on
-- the rows stored before this migration (a token-key rotation fills them)
-- and wherever network tokens are turned off (`migrate
-- --no-network-tokens`, which adds the CHECK constraint
-- user_logins_no_network_tokens: Postgres then refuses any row that
-- carries one). Adding a column without a default rewrites nothing.
ALTER TABLE user_logins ADD COLUMN masked_ip_net text;

-- The two functions that write tokens take the network token too: their
-- old signatures go (functions/40_rotation.sql and 60_quarantine.sql hold
-- the new ones).
DROP FUNCTION IF EXISTS pii_vault_rotation_tokens(bigint, bigint, int, text, bigint[], text[], text[]);
DROP FUNCTION IF EXISTS pii_vault_quarantine_replay_store(bigint, text[], text[], text[], text[], text[], text[],
    text[], date[], bytea[], bytea[]);
