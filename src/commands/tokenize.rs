//! `pii-vault tokenize`: the tokens a raw IP or device id has in
//! `user_logins`, so that an analyst can find its logins without a reveal.
//!
//! The value is tokenised here, exactly as the worker tokenised it (the
//! same parsing and canonical form, the same HMAC under the same key
//! versions), and never leaves this process: not to the database, not to a
//! log, not to an error. What leaves is its tokens, and only after the
//! database has recorded and committed the search (the tokens and the
//! reason), under the daily limit: nothing is printed before that.

use std::sync::Arc;

use serde::Serialize;

use crate::cli::{Cli, OutputFormat, TokenizeArgs};
use crate::crypto::{KeyPurpose, KeyWrapper, TokenField};
use crate::domain::LoginEvent;
use crate::keyring;
use crate::store::{KeyState, SearchKind, Store, StoreError};

#[derive(Serialize)]
struct Found {
    kind: &'static str,
    column: &'static str,
    tokens: Vec<VersionedToken>,
    sql: String,
    record: i64,
}

#[derive(Serialize)]
struct VersionedToken {
    token: String,
    version: u32,
    /// The current version's token; the others are older versions that
    /// some logins still carry while a token-key rotation is under way.
    current: bool,
}

pub async fn tokenize(cli: &Cli, args: &TokenizeArgs) -> anyhow::Result<()> {
    // Parsed before anything is opened: a value that is not one is refused
    // with nothing recorded, and without being repeated.
    let (kind, field, value) = match (&args.ip, &args.ip_net, &args.device_id) {
        (None, Some(net), _) => {
            let net = crate::domain::CanonicalIp::parse_network(net).ok_or_else(|| {
                anyhow::anyhow!(
                    "--ip-net: not a /24 of IPv4 or a /48 of IPv6 in CIDR form (A.B.C.0/24 or \
                     X:Y:Z::/48; the value is not repeated here); nothing was recorded"
                )
            })?;
            (SearchKind::IpNet, TokenField::IpNet, net.expose().clone())
        }
        (Some(ip), _, _) => {
            let ip = LoginEvent::parse_ip(ip).map_err(|why| {
                anyhow::anyhow!(
                    "--ip: {why} (the value is not repeated here); nothing was recorded"
                )
            })?;
            (SearchKind::Ip, TokenField::Ip, ip.expose().to_string())
        }
        (None, None, Some(id)) => {
            let id = LoginEvent::parse_device_id(id).map_err(|why| {
                anyhow::anyhow!(
                    "--device-id: {why} (the value is not repeated here); nothing was recorded"
                )
            })?;
            (
                SearchKind::DeviceId,
                TokenField::DeviceId,
                id.expose().clone(),
            )
        }
        (None, None, None) => unreachable!("clap requires --ip, --ip-net or --device-id"),
    };
    let value = zeroize::Zeroizing::new(value);
    let store = super::open_store(cli).await?;
    if kind == SearchKind::IpNet && !store.network_tokens().await? {
        anyhow::bail!(
            "network tokens are turned off in this database (`migrate --no-network-tokens`): \
             masked_ip_net is empty, so there is nothing to search; nothing was recorded"
        );
    }
    let wrapper = token_keks(cli, &*store).await?;
    let keys = keyring::live_token_keys(&*store, &*wrapper).await?;
    let tokens: Vec<VersionedToken> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| VersionedToken {
            // The worker's call, on the worker's canonical form.
            token: key.token(field, &value).to_string(),
            version: key.version(),
            current: i == 0,
        })
        .collect();
    drop(value);
    let listed: Vec<String> = tokens.iter().map(|t| t.token.clone()).collect();
    let claimed = super::claimed_actor(args.actor.as_deref());
    let record = match store
        .search_record(kind, &listed, &claimed, &args.reason)
        .await
    {
        Ok(record) => record,
        Err(StoreError::OverLimit(why)) => {
            return Err(super::Exit::new(
                3,
                format!(
                    "refused: {why}. `pii-vault policy show` shows the limit; the schema owner \
                     changes it with `pii-vault policy set --max-searches-per-day N`."
                ),
            )
            .into())
        }
        Err(e) => {
            return Err(anyhow::Error::new(e)
                .context("the search could not be recorded, so nothing was printed"))
        }
    };
    let found = Found {
        kind: kind.name(),
        column: kind.column(),
        sql: select(kind.column(), &listed),
        tokens,
        record,
    };
    match args.format {
        OutputFormat::Json => println!("{}", serde_json::to_string(&found)?),
        OutputFormat::Table => {
            for t in &found.tokens {
                let note = if t.current {
                    "current".to_string()
                } else {
                    "previous: a token-key rotation is under way".to_string()
                };
                println!(
                    "{}  {}  (token key v{}, {note})",
                    found.column, t.token, t.version
                );
            }
            println!("{}", found.sql);
        }
    }
    eprintln!(
        "pii-vault: search recorded in the audit trail (record {record}); {} token(s)",
        found.tokens.len()
    );
    Ok(())
}

/// The query an analyst runs next: every login with one of the tokens.
fn select(column: &str, tokens: &[String]) -> String {
    // Tokens are `t<digits>_` and base64url: nothing in them needs quoting.
    match tokens {
        [one] => format!("SELECT * FROM user_logins WHERE {column} = '{one}';"),
        many => format!(
            "SELECT * FROM user_logins WHERE {column} IN ({});",
            many.iter()
                .map(|t| format!("'{t}'"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The homes of the key-encryption keys that wrap the live token keys
/// (those on the allow-list), opened now, without creating a key file:
/// see [`crate::kms::for_stored`].
async fn token_keks(cli: &Cli, store: &dyn Store) -> anyhow::Result<Arc<dyn KeyWrapper>> {
    let allowed = store.allowed_keks().await?;
    let mut keks: Vec<String> = Vec::new();
    for key in store.list_keys().await? {
        if key.purpose == KeyPurpose::Token
            && key.state != KeyState::Destroyed
            && allowed.contains(&key.wrapped.kek_id)
            && !keks.contains(&key.wrapped.kek_id)
        {
            keks.push(key.wrapped.kek_id);
        }
    }
    crate::kms::for_stored(&keks, &cli.key_dir).await
}

#[cfg(test)]
mod tests {
    use super::select;

    #[test]
    fn the_select_matches_every_live_token() {
        assert_eq!(
            select("masked_ip", &["t1_a".into()]),
            "SELECT * FROM user_logins WHERE masked_ip = 't1_a';"
        );
        assert_eq!(
            select("masked_device_id", &["t2_b".into(), "t1_a".into()]),
            "SELECT * FROM user_logins WHERE masked_device_id IN ('t2_b', 't1_a');"
        );
    }
}
