//! `pii-vault reveal`: the originals, after the audit row is committed.
//!
//! Two steps, each its own transaction: record the reveal (its audit row
//! commits), then fetch the rows of that record. On Postgres the revealer
//! role has no other way to the ciphertext: the database hands it out only
//! for a committed record of the same login.

use serde::Serialize;

use crate::cli::{Cli, OutputFormat, RevealArgs};
use crate::pipeline::protect::VaultPlaintext;
use crate::store::{LoginRow, RequestStatus, Selector};
use crate::vault::VaultReader;

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
    let store = super::open_store(cli).await?;
    let claimed = super::claimed_actor(args.actor.as_deref());
    // Nothing is read, let alone decrypted, before the audit row committed.
    let (record, selector) = match args.request {
        Some(id) => (
            store.reveal_claim(id, &claimed).await?,
            format!("request {id}"),
        ),
        None => {
            let selector = match (&args.user_id, &args.masked_ip, &args.masked_device_id) {
                (Some(u), _, _) => Selector::UserId(u.clone()),
                (_, Some(t), _) => Selector::MaskedIp(t.clone()),
                (_, _, Some(t)) => Selector::MaskedDeviceId(t.clone()),
                _ => unreachable!("clap requires one selector"),
            };
            let reason = args.reason.as_deref().expect("clap requires a reason");
            let request = store.reveal_request(&selector, &claimed, reason).await?;
            if request.status != RequestStatus::Granted {
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
    };
    let wrapper = super::open_wrapper(cli).await?;
    let rows = store.reveal_fetch(record).await?;
    let mut reader = VaultReader::new(store.clone(), wrapper);
    let mut opened = Vec::with_capacity(rows.len());
    let mut unrecoverable = 0;
    for (login, vault) in &rows {
        let plain = match vault {
            Some(v) => reader.open(v).await?,
            None => None,
        };
        if plain.is_none() {
            unrecoverable += 1;
        }
        opened.push((login, plain));
    }
    fn view<'a>((l, p): &'a (&'a LoginRow, Option<VaultPlaintext>)) -> Revealed<'a> {
        Revealed {
            message_id: &l.message_id,
            user_id: &l.user_id,
            ip: p.as_ref().map(|p| p.ip.as_str()),
            device_id: p.as_ref().map(|p| p.device_id.as_str()),
            device_type: &l.device_type,
            locale: l.locale.as_deref(),
            app_version: &l.app_version,
            create_date: l.create_date,
            masked_ip: &l.masked_ip,
            masked_device_id: &l.masked_device_id,
        }
    }
    match args.format {
        OutputFormat::Json => {
            for o in &opened {
                println!("{}", serde_json::to_string(&view(o))?);
            }
        }
        OutputFormat::Table => {
            let rows: Vec<Vec<String>> = opened
                .iter()
                .map(|o| {
                    let r = view(o);
                    vec![
                        r.user_id.into(),
                        r.create_date.map(|d| d.to_string()).unwrap_or_default(),
                        r.ip.unwrap_or("(erased)").into(),
                        r.device_id.unwrap_or("(erased)").into(),
                        r.device_type.into(),
                        r.locale.unwrap_or("").into(),
                        r.app_version.into(),
                    ]
                })
                .collect();
            print!(
                "{}",
                crate::output::table(
                    &[
                        "user_id",
                        "date",
                        "ip",
                        "device_id",
                        "device_type",
                        "locale",
                        "app_version"
                    ],
                    &rows
                )
            );
        }
    }
    eprintln!(
        "pii-vault: revealed {} login(s) for {selector}; recorded in the audit trail (record {record})",
        opened.len() - unrecoverable,
    );
    if rows.is_empty() {
        eprintln!("pii-vault: no logins match {selector}");
    } else if unrecoverable > 0 {
        eprintln!("pii-vault: {unrecoverable} login(s) have no recoverable originals (erased by `forget` or key destruction)");
    }
    Ok(())
}
