//! `pii-vault reveal`: the originals, after the audit row is committed.
//!
//! Two steps, each its own transaction: record the reveal (its audit row
//! commits), then fetch the rows of that record. On Postgres the revealer
//! role has no other way to the ciphertext: the database hands it out only
//! for a committed record of the same login.
//!
//! Rows are opened and printed as they come, so that revealing a token
//! shared by a great many logins holds a bounded amount of memory.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;

use anyhow::Context as _;
use futures::{FutureExt as _, StreamExt as _};
use serde::Serialize;

use crate::cli::{Cli, OutputFormat, RevealArgs};
use crate::crypto::token::Token;
use crate::crypto::{KeyPurpose, KeyWrapper};
use crate::output::TableWriter;
use crate::store::{KeyState, LoginRow, RequestStatus, Selector, Store};
use crate::vault::{VaultPlaintext, VaultReader};

#[derive(Serialize)]
struct Revealed<'a> {
    message_id: &'a str,
    user_id: &'a str,
    ip: Option<&'a str>,
    device_id: Option<&'a str>,
    device_type: &'a str,
    locale: Option<&'a str>,
    app_version: &'a str,
    create_date: Option<chrono::NaiveDate>,
    masked_ip: &'a str,
    masked_device_id: &'a str,
}

pub async fn reveal(cli: &Cli, args: &RevealArgs) -> anyhow::Result<()> {
    let selector = match (&args.user_id, &args.masked_ip, &args.masked_device_id) {
        (Some(u), _, _) => Some(Selector::UserId(u.clone())),
        (_, Some(t), _) => Some(Selector::MaskedIp(t.clone())),
        (_, _, Some(t)) => Some(Selector::MaskedDeviceId(t.clone())),
        _ => None,
    };
    // A token selector that is not a token (a raw IP or device id pasted
    // by mistake) is refused before anything is opened: the audit target,
    // which every revealer reads, must not become a copy of the PII.
    if let Some(selector) = &selector {
        check_token_shape(selector)?;
    }
    let store = super::open_store(cli).await?;
    let claimed = super::claimed_actor(args.actor.as_deref());
    if let Some(selector) = &selector {
        check_token_version(&*store, selector).await?;
    }
    // The key-encryption keys are the ones the stored data keys name (and
    // the allow-list trusts), opened and checked before anything is
    // recorded: with KMS away or the local key file missing, a reveal fails
    // here and the trail gains no row.
    let wrapper = stored_keks(cli, &*store).await?;
    // Nothing is read, let alone decrypted, before the audit row committed.
    let (record, selector) = match (args.request, selector) {
        (Some(id), _) => (
            store.reveal_claim(id, &claimed).await?,
            format!("request {id}"),
        ),
        (None, Some(selector)) => {
            let reason = args.reason.as_deref().expect("clap requires a reason");
            let request = store.reveal_request(&selector, &claimed, reason).await?;
            if request.status != RequestStatus::Granted {
                if args.format == OutputFormat::Json {
                    // A script reading stdout learns what happened and
                    // what to run next, not just an exit status.
                    println!(
                        "{}",
                        serde_json::json!({
                            "status": "pending_approval",
                            "request_id": request.id,
                            "logins": request.row_count,
                            "revealed": 0,
                            "approve": format!("pii-vault approve {} --reason TEXT", request.id),
                            "fetch": format!("pii-vault reveal --request {}", request.id),
                        })
                    );
                }
                return Err(super::Exit::new(
                    3,
                    format!(
                        "this reveal ({} login(s)) is over the reveal policy, so it needs a second person. \
                         Request {id} is recorded; another revealer approves it with\n  \
                         pii-vault approve {id} --reason TEXT\n\
                         and you then fetch it, once, within 24 hours, with\n  \
                         pii-vault reveal --request {id}\n\
                         Nothing was revealed. (`pii-vault policy show` shows the limits.)",
                        request.row_count,
                        id = request.id
                    ),
                )
                .into());
            }
            (request.id, selector.to_string())
        }
        (None, None) => unreachable!("clap requires one selector"),
    };
    // Every key the rows need is unwrapped before the fetch marks the
    // request fetched: a KMS fault fails the reveal here, with nothing
    // shown and the request still unfetched (it can be fetched within the
    // hour once KMS answers, `--request` for an approved one).
    let mut reader = VaultReader::new(store.clone(), wrapper);
    for key_id in store.reveal_keys(record).await? {
        reader.data_key(&key_id).await.with_context(|| {
            format!("nothing was revealed: the keys of {selector} cannot be unwrapped (record {record} stays unfetched)")
        })?;
    }
    let mut rows = Some(store.reveal_fetch(record).await?);
    // Read ahead a few rows before opening any: a small reveal is then
    // read to its end, so its connection can go back to the pool instead of
    // a new one being opened for the key look-ups below (each costs a TLS
    // handshake), and a table takes its column widths from these rows.
    let mut ahead = VecDeque::with_capacity(READ_AHEAD);
    while ahead.len() < READ_AHEAD {
        match rows.as_mut().expect("not ended yet").next().await {
            Some(row) => ahead.push_back(row?),
            None => {
                rows = None;
                break;
            }
        }
    }
    let stdout = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout());
    let mut sink = match args.format {
        OutputFormat::Json => Sink::Json(stdout),
        OutputFormat::Table => Sink::Table(TableWriter::new(stdout, &TABLE_HEADERS, READ_AHEAD)),
    };
    let (mut total, mut unrecoverable) = (0u64, 0u64);
    loop {
        let (login, vault) = match ahead.pop_front() {
            Some(row) => row,
            None => {
                let Some(rest) = rows.as_mut() else { break };
                // Whatever is written goes out before waiting for the
                // database: output keeps pace with the rows, in big writes.
                let next = match rest.next().now_or_never() {
                    Some(next) => next,
                    None => {
                        sink.flush()?;
                        rest.next().await
                    }
                };
                match next {
                    Some(row) => row?,
                    None => break,
                }
            }
        };
        let plain = match &vault {
            Some(v) => reader.open(v).await?,
            None => None,
        };
        total += 1;
        if plain.is_none() {
            unrecoverable += 1;
        }
        sink.write(&view(&login, plain.as_ref()))?;
    }
    sink.finish()?;
    eprintln!(
        "pii-vault: revealed {} login(s) for {selector}; recorded in the audit trail (record {record})",
        total - unrecoverable,
    );
    if total == 0 {
        eprintln!("pii-vault: no logins match {selector}");
    } else if unrecoverable > 0 {
        eprintln!("pii-vault: {unrecoverable} login(s) have no recoverable originals (erased by `forget` or key destruction)");
    }
    Ok(())
}

/// Refuses a `--masked-ip` / `--masked-device-id` that does not have the
/// shape of a token (`t<version>_<43 base64url characters>`, see
/// [`Token::version_of`]), without repeating it: what was given may be the
/// very IP or device id the vault protects.
fn check_token_shape(selector: &Selector) -> anyhow::Result<()> {
    let (flag, value) = match selector {
        Selector::UserId(_) => return Ok(()),
        Selector::MaskedIp(v) => ("--masked-ip", v),
        Selector::MaskedDeviceId(v) => ("--masked-device-id", v),
    };
    if Token::version_of(value).is_none() {
        anyhow::bail!(
            "{flag} takes a token as stored in user_logins (t<version>_ and 43 more characters), \
             and what was given is not one (it is not repeated here: it may be an original value). \
             Take the token from user_logins, or reveal by --user-id. Nothing was recorded."
        );
    }
    Ok(())
}

/// Refuses a token of a token-key version that no stored login carries any
/// more (a completed token-key rotation destroys the old version and
/// re-tokenises every login), saying which versions there are: a token
/// copied before the rotation would otherwise match nothing, on the record.
async fn check_token_version(store: &dyn Store, selector: &Selector) -> anyhow::Result<()> {
    let value = match selector {
        Selector::UserId(_) => return Ok(()),
        Selector::MaskedIp(v) | Selector::MaskedDeviceId(v) => v,
    };
    let Some(version) = Token::version_of(value) else {
        return Ok(());
    };
    let keys = store.list_keys().await?;
    let mut live: Vec<i64> = keys
        .iter()
        .filter(|k| k.purpose == KeyPurpose::Token && k.state != KeyState::Destroyed)
        .map(|k| k.version)
        .collect();
    live.sort_unstable();
    live.dedup();
    if live.is_empty() || live.contains(&i64::from(version)) {
        return Ok(());
    }
    let versions = live
        .iter()
        .map(|v| format!("v{v}"))
        .collect::<Vec<_>>()
        .join(", ");
    anyhow::bail!(
        "this token is of token-key version {version}, which no stored login carries any more: \
         the token key was rotated, and the logins are now tokenised under {versions}. \
         Take the current token from user_logins (or reveal by --user-id). Nothing was recorded."
    )
}

/// The homes of the key-encryption keys that wrap the stored data keys
/// (those on the allow-list; a key under any other is refused when read),
/// opened now: see [`crate::kms::for_stored`].
async fn stored_keks(cli: &Cli, store: &dyn Store) -> anyhow::Result<Arc<dyn KeyWrapper>> {
    let allowed = store.allowed_keks().await?;
    let mut keks: Vec<String> = Vec::new();
    for key in store.list_keys().await? {
        if key.purpose == KeyPurpose::Vault
            && key.state != KeyState::Destroyed
            && allowed.contains(&key.wrapped.kek_id)
            && !keks.contains(&key.wrapped.kek_id)
        {
            keks.push(key.wrapped.kek_id);
        }
    }
    crate::kms::for_stored(&keks, &cli.key_dir).await
}

/// Rows read before the first is opened, and the rows a table takes its
/// widths from: a bounded few hundred KiB at most.
const READ_AHEAD: usize = 256;

const TABLE_HEADERS: [&str; 7] = [
    "user_id",
    "date",
    "ip",
    "device_id",
    "device_type",
    "locale",
    "app_version",
];

fn view<'a>(l: &'a LoginRow, p: Option<&'a VaultPlaintext>) -> Revealed<'a> {
    Revealed {
        message_id: &l.message_id,
        user_id: &l.user_id,
        ip: p.map(|p| p.ip.as_str()),
        device_id: p.map(|p| p.device_id.as_str()),
        device_type: &l.device_type,
        locale: l.locale.as_deref(),
        app_version: &l.app_version,
        create_date: l.create_date,
        masked_ip: &l.masked_ip,
        masked_device_id: &l.masked_device_id,
    }
}

/// Where revealed rows go, one at a time.
enum Sink<W: Write> {
    /// One JSON object a line, written as each row is opened.
    Json(W),
    Table(TableWriter<W>),
}

impl<W: Write> Sink<W> {
    fn write(&mut self, r: &Revealed<'_>) -> anyhow::Result<()> {
        match self {
            Sink::Json(out) => {
                serde_json::to_writer(&mut *out, r)?;
                out.write_all(b"\n")?;
            }
            Sink::Table(t) => {
                let date = r.create_date.map(|d| d.to_string()).unwrap_or_default();
                t.row(&[
                    r.user_id,
                    &date,
                    r.ip.unwrap_or("(erased)"),
                    r.device_id.unwrap_or("(erased)"),
                    r.device_type,
                    r.locale.unwrap_or(""),
                    r.app_version,
                ])?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Json(out) => out.flush(),
            Sink::Table(t) => t.flush(),
        }
    }

    fn finish(self) -> std::io::Result<()> {
        match self {
            Sink::Json(mut out) => out.flush(),
            Sink::Table(t) => t.finish().map(drop),
        }
    }
}
