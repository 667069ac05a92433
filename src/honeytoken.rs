//! Honeytokens: synthetic users planted among the real ones, so that a
//! stolen revealer login that goes fishing is caught early.
//!
//! A trap only works if nothing a revealer or an analyst can read tells it
//! apart from a real user. So planting writes no login itself: it records
//! the users (in `honeytokens`, which only the owner reads) and their logins
//! to come (`honeytoken_logins`), each due at a random time over the next
//! `--over` period. Workers then write each due login in one of their
//! batches, among real events ([`inject`]): in the batch's transaction,
//! under the worker's data key, dated like its neighbour, with its
//! neighbour's device type, locale and app version and a message id shaped
//! like its neighbour's. The user ids, and how many logins each user has,
//! are shaped like a sample of the real ones. What is made up is only what
//! nobody but a revealer ever sees in the clear: the IP and the device id.
//!
//! A reveal that touches one is served as usual, and so is a search
//! (`tokenize`) for one's IP or device id; the database keeps the alarm
//! where only the owner reads it (`audit_alarms`).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rand::seq::SliceRandom;
use rand::Rng;
use zeroize::Zeroizing;

use crate::domain::message::{Ack, Message};
use crate::store::{DueHoneytoken, LoginRow, PlannedLogin, Store};

/// What `plant` recorded.
#[derive(Debug, Clone, Default)]
pub struct Planted {
    pub users: Vec<String>,
    pub logins: u64,
}

/// Real users sampled to shape the honeytokens like.
const SAMPLE: i64 = 1000;

/// Most logins one honeytoken gets, whatever the sample says.
const MAX_LOGINS: i64 = 20;

/// Plants `count` synthetic users whose logins fall due over `over`.
pub async fn plant(store: Arc<dyn Store>, count: usize, over: Duration) -> anyhow::Result<Planted> {
    anyhow::ensure!(
        (1..=10_000).contains(&count),
        "plant between 1 and 10000 honeytokens at a time"
    );
    let sample = store.sample_users(SAMPLE).await?;
    let mut rng = rand::thread_rng();
    let now = Utc::now();
    let over =
        chrono::Duration::from_std(over).map_err(|_| anyhow::anyhow!("--over is too long"))?;
    let users = new_user_ids(&*store, &sample, count, &mut rng).await?;
    let mut out = Planted::default();
    let mut logins = Vec::new();
    for user in users {
        let n = match sample.choose(&mut rng) {
            Some((_, n)) => (*n).clamp(1, MAX_LOGINS),
            None => rng.gen_range(1..=3),
        };
        // One device, one or two addresses: a user, not a random stream.
        let device_id = format!(
            "{:03}-{:02}-{:04}",
            rng.gen_range(100..1000),
            rng.gen_range(10..100),
            rng.gen_range(1000..10000)
        );
        let ips = [public_ipv4(&mut rng), public_ipv4(&mut rng)];
        for _ in 0..n {
            let ip = if rng.gen_bool(0.8) { &ips[0] } else { &ips[1] };
            let after = rng.gen_range(0..=over.num_milliseconds().max(0));
            logins.push(PlannedLogin {
                user_id: user.clone(),
                uuid_id: uuid::Uuid::new_v4().to_string(),
                line_id: format!("line-{}", hex::encode(rng.gen::<[u8; 16]>())),
                body: serde_json::json!({"user_id": user, "ip": ip, "device_id": device_id})
                    .to_string(),
                due_at: now + chrono::Duration::milliseconds(after),
            });
        }
        out.users.push(user);
    }
    out.logins = logins.len() as u64;
    store.plant_honeytokens(&out.users, &logins).await?;
    Ok(out)
}

/// `count` user ids shaped like the sample's, none of them a user already
/// (a real one, or another trap): a clash would make a real user a trap.
/// Where the sample's shape leaves too few fresh ids, UUIDs.
async fn new_user_ids(
    store: &dyn Store,
    sample: &[(String, i64)],
    count: usize,
    rng: &mut impl Rng,
) -> anyhow::Result<Vec<String>> {
    let mut ids: Vec<String> = Vec::with_capacity(count);
    for attempt in 0..20 {
        let mut fresh: Vec<String> = (ids.len()..count)
            .map(|_| match sample.choose(rng) {
                Some((like, _)) if attempt < 19 => shaped_like(like, rng),
                _ => uuid::Uuid::new_v4().to_string(),
            })
            .collect();
        fresh.sort();
        fresh.dedup();
        fresh.retain(|u| !ids.contains(u));
        let taken = store.existing_users(&fresh).await?;
        ids.extend(fresh.into_iter().filter(|u| !taken.contains(u)));
        if ids.len() >= count {
            ids.truncate(count);
            return Ok(ids);
        }
    }
    anyhow::bail!("could not find {count} fresh user ids")
}

/// How many due honeytoken logins a batch of `n` events may carry.
pub fn room(n: usize) -> i64 {
    (1 + n / 200).min(100) as i64
}

/// The message of a due honeytoken login, written beside `neighbour` (a
/// real message of the batch, stored as `like`): its date, the shape of its
/// message id, and its device type, locale and app version.
pub fn inject(due: &DueHoneytoken, neighbour: &Message, like: &LoginRow) -> Option<Message> {
    let mut body: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&due.body).ok()?;
    body.insert("device_type".into(), like.device_type.clone().into());
    body.insert("locale".into(), like.locale.clone().into());
    body.insert("app_version".into(), like.app_version.clone().into());
    let id = if neighbour.id.starts_with("line-") {
        &due.line_id
    } else {
        &due.uuid_id
    };
    Some(Message {
        id: id.clone(),
        body: Zeroizing::new(serde_json::Value::Object(body).to_string().into_bytes()),
        sent_at: neighbour.sent_at,
        ack: Ack::None,
        line: None,
        source: None,
    })
}

/// A user id shaped like `like`: a fresh UUID for a UUID, fresh hex digits
/// for a hex string; otherwise the same letters and punctuation (a prefix
/// every real id shares stays) with each run of digits replaced by a
/// random one of the same length and leading zeros.
fn shaped_like(like: &str, rng: &mut impl Rng) -> String {
    if let Ok(u) = uuid::Uuid::parse_str(like) {
        let fresh = uuid::Builder::from_random_bytes(rng.gen())
            .with_version(u.get_version().unwrap_or(uuid::Version::Random))
            .into_uuid()
            .hyphenated()
            .to_string();
        return if like.chars().any(|c| c.is_ascii_uppercase()) {
            fresh.to_uppercase()
        } else {
            fresh
        };
    }
    const HEX: &[u8] = b"0123456789abcdef";
    if like.len() >= 8 && like.bytes().all(|b| HEX.contains(&b)) {
        return (0..like.len())
            .map(|_| HEX[rng.gen_range(0..16)] as char)
            .collect();
    }
    let mut out = String::with_capacity(like.len());
    // Whether the current run of digits has had a non-zero digit yet.
    let mut significant = false;
    for c in like.chars() {
        if !c.is_ascii_digit() {
            significant = false;
            out.push(c);
        } else if significant {
            out.push(rng.gen_range(b'0'..=b'9') as char);
        } else if c == '0' {
            out.push('0');
        } else {
            significant = true;
            out.push(rng.gen_range(b'1'..=b'9') as char);
        }
    }
    out
}

/// A public-looking IPv4 address: no private, loopback, shared or
/// documentation ranges.
fn public_ipv4(rng: &mut impl Rng) -> String {
    loop {
        let a: u8 = rng.gen_range(1..=223);
        if ![10, 100, 127, 169, 172, 192, 198, 203].contains(&a) {
            return format!(
                "{a}.{}.{}.{}",
                rng.gen::<u8>(),
                rng.gen::<u8>(),
                rng.gen_range(1..=254u8)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_keep_the_shape_of_the_sample() {
        let mut rng = rand::thread_rng();
        let u = shaped_like("424cdd21-063a-43a7-b91b-7ca1a833afae", &mut rng);
        let parsed = uuid::Uuid::parse_str(&u).unwrap();
        assert_eq!(parsed.get_version_num(), 4);
        assert_ne!(u, "424cdd21-063a-43a7-b91b-7ca1a833afae");
        let n = shaped_like("user-00123", &mut rng);
        assert_eq!(n.len(), 10);
        assert!(
            n.starts_with("user-00") && !n.starts_with("user-000"),
            "{n}"
        );
        assert!(n[5..].chars().all(|c| c.is_ascii_digit()), "{n}");
        let d = shaped_like("98231", &mut rng);
        assert!(d.len() == 5 && !d.starts_with('0') && d.chars().all(|c| c.is_ascii_digit()));
        let h = shaped_like("deadbeef", &mut rng);
        assert!(h.len() == 8 && h.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn an_injected_login_takes_its_neighbours_date_attributes_and_id_shape() {
        let due = DueHoneytoken {
            uuid_id: "6f1c8f2e-4f0e-4f55-9a57-2f1d3a0e9c11".into(),
            line_id: format!("line-{}", "ab".repeat(16)),
            body: r#"{"user_id":"u-1","ip":"8.8.4.4","device_id":"123-45-6789"}"#.into(),
        };
        let sent = Utc::now() - chrono::Duration::days(3);
        let neighbour = Message {
            id: format!("line-{}", "01".repeat(16)),
            body: Zeroizing::new(vec![]),
            sent_at: sent,
            ack: Ack::None,
            line: Some(4),
            source: None,
        };
        let like = LoginRow {
            message_id: neighbour.id.clone(),
            user_id: "x".into(),
            device_type: "tablet".into(),
            masked_ip: String::new(),
            masked_device_id: String::new(),
            masked_ip_net: None,
            locale: None,
            app_version: "9.9.9".into(),
            create_date: None,
            line: None,
        };
        let m = inject(&due, &neighbour, &like).unwrap();
        assert_eq!(m.id, due.line_id);
        assert_eq!(m.sent_at, sent);
        let v: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
        assert_eq!(v["device_type"], "tablet");
        assert_eq!(v["locale"], serde_json::Value::Null);
        assert_eq!(v["app_version"], "9.9.9");
        assert_eq!(v["user_id"], "u-1");
    }
}
