//! Honeytokens: synthetic users planted among the real ones, so that a
//! stolen revealer login that goes fishing is caught early.
//!
//! A honeytoken's logins go through the same protect step as any event
//! (same token shapes and versions, same sealing, dates spread over the last
//! 90 days), so nothing in `user_logins` or the vault tells them apart. Which
//! users they are is recorded in `honeytokens`, which only the owner can
//! read. A reveal that touches one is served as usual; the database records
//! an alarm (`audit_alarms`, owner only) and, on Postgres, sends
//! `NOTIFY pii_vault_alarm` with the request id, when the reveal is recorded.

use std::sync::Arc;

use chrono::{Duration, Utc};
use rand::seq::SliceRandom;
use rand::Rng;
use zeroize::Zeroizing;

use crate::crypto::KeyWrapper;
use crate::domain::message::{Ack, Message};
use crate::pipeline::keys;
use crate::pipeline::protect::{protect, Protected};
use crate::store::{AdminStore, Batch};

/// What `plant` made.
#[derive(Debug, Clone, Default)]
pub struct Planted {
    pub users: Vec<String>,
    pub logins: u64,
}

/// Plants `count` synthetic users with one to three logins each.
pub async fn plant(
    store: Arc<dyn AdminStore>,
    wrapper: Arc<dyn KeyWrapper>,
    count: usize,
) -> anyhow::Result<Planted> {
    anyhow::ensure!(
        (1..=10_000).contains(&count),
        "plant between 1 and 10000 honeytokens at a time"
    );
    let (token, token_id) = keys::load_token_key(&*store, &*wrapper).await?;
    let dek = keys::new_data_key(&*store, &*wrapper).await?;
    let mut rng = rand::thread_rng();
    let mut out = Planted::default();
    let mut batch = Batch {
        token_key_id: token_id,
        ..Batch::default()
    };
    for _ in 0..count {
        let user = uuid::Uuid::new_v4().to_string();
        for _ in 0..rng.gen_range(1..=3) {
            let msg = Message {
                id: uuid::Uuid::new_v4().to_string(),
                body: Zeroizing::new(synthetic_event(&user, &mut rng).into_bytes()),
                sent_at: Utc::now() - Duration::seconds(rng.gen_range(0..90 * 24 * 3600)),
                ack: Ack::None,
                line: None,
            };
            match protect(&msg, &token, &dek.id, &dek.sealer)? {
                Protected::Login(l, v) => batch.logins.push((l, v)),
                Protected::Rejected(..) => anyhow::bail!("a synthetic event did not parse"),
            }
        }
        out.users.push(user);
    }
    out.logins = batch.logins.len() as u64;
    batch.key_usage.push((dek.id.clone(), out.logins as i64));
    store.write_batch(&batch).await?;
    store.add_honeytokens(&out.users).await?;
    store.retire_data_key(&dek.id).await?;
    Ok(out)
}

/// An event shaped like the ones real clients send.
fn synthetic_event(user: &str, rng: &mut impl Rng) -> String {
    // Public-looking IPv4: no private, loopback or documentation ranges.
    let ip = loop {
        let a: u8 = rng.gen_range(1..=223);
        if ![10, 100, 127, 169, 172, 192, 198, 203].contains(&a) {
            break format!(
                "{a}.{}.{}.{}",
                rng.gen::<u8>(),
                rng.gen::<u8>(),
                rng.gen_range(1..=254u8)
            );
        }
    };
    let device_id = format!(
        "{:03}-{:02}-{:04}",
        rng.gen_range(100..1000),
        rng.gen_range(10..100),
        rng.gen_range(1000..10000)
    );
    let device_type = ["android", "ios", "web"].choose(rng).expect("non-empty");
    let locale = ["RU", "EN", "DE", "FR", "ES", "PT"]
        .choose(rng)
        .expect("non-empty");
    let version = format!(
        "{}.{}.{}",
        rng.gen_range(1..4),
        rng.gen_range(0..10),
        rng.gen_range(0..10)
    );
    serde_json::json!({
        "user_id": user, "app_version": version, "device_type": device_type,
        "ip": ip, "locale": locale, "device_id": device_id,
    })
    .to_string()
}
