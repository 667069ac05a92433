-- What migrations/postgres/0015_network_tokens.sql brought, on the
-- embedded default: the token of the IP's /24 or /48 network. NULL on rows
-- stored before (a token-key rotation fills them) and where network tokens
-- are turned off (`migrate --no-network-tokens` adds triggers that refuse
-- any other value).
ALTER TABLE user_logins ADD COLUMN masked_ip_net TEXT;
