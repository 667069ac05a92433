//! Network tokens (`masked_ip_net`): logins group by the token exactly as
//! their original addresses group by /24 (IPv4) and /48 (IPv6), however the
//! address was spelled, before and after `rotate token-key`, and after the
//! rotation filled the logins stored without one. The networks expected
//! are computed here, from the generated originals, with the standard
//! library only (not with the product's code).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::common::app::{TestApp, ROTATOR, SEARCHER, WORKER};
use crate::common::{self, app::Bin};

/// Logins with unique user ids (so that a stored row names its original),
/// their IPs drawn from a few /24s and /48s and spelled in several ways.
fn events(n: usize, seed: u64) -> (String, BTreeMap<String, IpAddr>) {
    let base = common::gen_events(&["-n", &n.to_string(), "--seed", &seed.to_string()]);
    let v4 = ["198.51.100", "198.51.101", "203.0.113", "192.0.2"];
    let v6 = ["2001:db8:1", "2001:db8:2", "2001:DB8:0001"];
    let mut text = String::new();
    let mut originals = BTreeMap::new();
    for (i, line) in base.lines().enumerate() {
        let mut ev: serde_json::Value = serde_json::from_str(line).unwrap();
        let user = format!("net-user-{seed}-{i}");
        let host = (i * 37 % 250) + 1;
        let spelled = match i % 5 {
            0 | 1 => format!("{}.{host}", v4[i % v4.len()]),
            2 => format!("::ffff:{}.{host}", v4[i % v4.len()]),
            3 => format!("{}:{:x}::{host:x}", v6[i % v6.len()], i % 7),
            _ => format!("{}:{:04X}:0:0:0:{host:04x}", v6[i % v6.len()], i % 7),
        };
        originals.insert(user.clone(), spelled.parse::<IpAddr>().unwrap());
        ev["user_id"] = user.into();
        ev["ip"] = spelled.into();
        text.push_str(&ev.to_string());
        text.push('\n');
    }
    (text, originals)
}

/// The /24 or /48 of `ip`, IPv4-mapped addresses as IPv4.
fn network(ip: &IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(a) => {
            let o = a.octets();
            format!("{}.{}.{}", o[0], o[1], o[2])
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            format!("{:x}:{:x}:{:x}", s[0], s[1], s[2])
        }
    }
}

/// The partition of `members` by `key`: sets of members with equal keys.
fn partition<'a>(
    members: impl Iterator<Item = (&'a String, String)>,
) -> BTreeSet<BTreeSet<String>> {
    let mut groups: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (member, key) in members {
        groups.entry(key).or_default().insert(member.clone());
    }
    groups.into_values().collect()
}

/// Asserts that `stored` (user id → masked_ip_net) groups the users as
/// their originals' networks do, every token of `version`.
fn assert_groups_as_networks(
    stored: &BTreeMap<String, Option<String>>,
    originals: &BTreeMap<String, IpAddr>,
    version: u32,
) {
    assert_eq!(stored.len(), originals.len(), "every login stored");
    let prefix = format!("t{version}_");
    for (user, net) in stored {
        let net = net
            .as_deref()
            .unwrap_or_else(|| panic!("{user} has no network token"));
        assert!(
            net.starts_with(&prefix),
            "{user}: {net} is not of v{version}"
        );
    }
    let by_token = partition(stored.iter().map(|(u, n)| (u, n.clone().unwrap())));
    let by_network = partition(originals.iter().map(|(u, ip)| (u, network(ip))));
    assert_eq!(by_token, by_network);
    assert_eq!(by_network.len(), 6, "the generated networks");
}

/// `masked_ip_net` and `masked_ip` must be unrelated columns: a network
/// token is never an address token.
fn assert_unlike_address_tokens(stored: &[(String, String, Option<String>)]) {
    let addresses: BTreeSet<&str> = stored.iter().map(|r| r.1.as_str()).collect();
    for (_, _, net) in stored {
        assert!(!addresses.contains(net.as_deref().unwrap_or("")));
    }
}

async fn pg_rows(app: &TestApp) -> Vec<(String, String, Option<String>)> {
    sqlx::query_as("SELECT user_id, masked_ip, masked_ip_net FROM user_logins")
        .fetch_all(app.pool())
        .await
        .unwrap()
}

fn by_user(rows: &[(String, String, Option<String>)]) -> BTreeMap<String, Option<String>> {
    rows.iter().map(|r| (r.0.clone(), r.2.clone())).collect()
}

fn load(bin: &Bin, file: &str) {
    let stderr = bin.ok(&["run", "--from-file", file, "--no-progress"]);
    assert!(common::try_summary(&stderr).is_some(), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_network_tokens_group_as_networks_through_rotation_and_backfill() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    app.ok(&["migrate"]);
    let worker = app.as_login(&app.login_as(WORKER).await);
    let rotator = app.as_login(&app.login_as(ROTATOR).await);
    let (first, mut originals) = events(300, 41);
    let (second, more) = events(300, 42);
    app.write("first.jsonl", &first);
    app.write("second.jsonl", &second);

    // A database whose logins were stored without network tokens (as by a
    // release before them, or with them turned off): NULL, and the
    // database refuses one, whoever writes it.
    let out = app.ok(&["migrate", "--no-network-tokens"]);
    assert!(out.contains("network tokens are off"), "{out}");
    load(&worker, "first.jsonl");
    let rows = pg_rows(&app).await;
    assert_eq!(rows.len(), 300);
    assert!(rows.iter().all(|r| r.2.is_none()));
    let login = app.login_as(WORKER).await;
    let pool = sqlx::PgPool::connect(&login.url).await.unwrap();
    crate::roles::refused(
        &pool,
        "INSERT INTO user_logins (message_id, user_id, device_type, masked_ip, masked_device_id, \
         masked_ip_net, app_version) VALUES ('m-net', 'u', 'web', 't1_x', 't1_y', 't1_z', '1')",
        "23514",
    )
    .await;
    pool.close().await;

    // On again: new logins carry them at once; the rotation fills the rest.
    let out = app.ok(&["migrate", "--network-tokens"]);
    assert!(out.contains("rotate token-key"), "{out}");
    load(&worker, "second.jsonl");
    let rows = pg_rows(&app).await;
    let filled: Vec<_> = rows.iter().filter(|r| r.2.is_some()).collect();
    assert_eq!(
        filled.len(),
        300,
        "the second file's logins carry network tokens"
    );
    let second_only: BTreeMap<_, _> = filled.iter().map(|r| (r.0.clone(), r.2.clone())).collect();
    assert_groups_as_networks(&second_only, &more, 1);

    rotator.ok(&["rotate", "token-key"]);
    originals.extend(more);
    let rows = pg_rows(&app).await;
    assert_groups_as_networks(&by_user(&rows), &originals, 2);
    assert_unlike_address_tokens(&rows);
    let before: BTreeSet<_> = second_only.values().cloned().collect();
    assert!(
        rows.iter().all(|r| !before.contains(&r.2)),
        "the rotation replaced every network token"
    );

    // What an analyst runs: the same number of groups as networks.
    let analyst_view = app
        .scalar("SELECT count(DISTINCT masked_ip_net) FROM user_logins")
        .await;
    assert_eq!(analyst_view, 6);

    // A searcher finds a network's logins by the network, however spelled,
    // and the trail keeps its token, never the network.
    let searcher = app.as_login(&app.login_as(SEARCHER).await);
    for (net, spellings) in [
        ("198.51.100", ["198.51.100.0/24", "198.51.100.77/24"]),
        ("2001:db8:1", ["2001:db8:1::/48", "2001:DB8:0001:ff::1/48"]),
    ] {
        let expected: BTreeSet<&String> = originals
            .iter()
            .filter(|(_, ip)| network(ip) == net)
            .map(|(u, _)| u)
            .collect();
        assert!(!expected.is_empty());
        for spelled in spellings {
            let out = searcher.ok_output(&[
                "tokenize", "--ip-net", spelled, "--reason", "FRAUD-9", "--format", "json",
            ]);
            let found: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(found["column"], "masked_ip_net");
            let token = found["tokens"][0]["token"].as_str().unwrap().to_string();
            let users: Vec<String> = sqlx::query_scalar(
                "SELECT DISTINCT user_id FROM user_logins WHERE masked_ip_net = $1",
            )
            .bind(&token)
            .fetch_all(app.pool())
            .await
            .unwrap();
            assert_eq!(users.iter().collect::<BTreeSet<_>>(), expected, "{spelled}");
        }
    }
    let trail = app
        .strings("SELECT target FROM audit_log WHERE action = 'search'")
        .await;
    assert_eq!(trail.len(), 4);
    for t in &trail {
        assert!(t.starts_with("masked_ip_net=t2_"), "{t}");
        assert!(
            !t.contains("198.51") && !t.to_lowercase().contains("db8"),
            "{t}"
        );
    }
    let refused = searcher.run(&["tokenize", "--ip-net", "198.51.0.0/16", "--reason", "x"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(!String::from_utf8_lossy(&refused.stderr).contains("198.51"));

    // Off again: emptied, and the next rotation writes none; a search for
    // a network is refused before anything is recorded.
    app.ok(&["migrate", "--no-network-tokens"]);
    let off = searcher.run(&["tokenize", "--ip-net", "198.51.100.0/24", "--reason", "x"]);
    assert_eq!(off.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&off.stderr).contains("network tokens are turned off"));
    assert_eq!(
        app.scalar("SELECT count(*) FROM audit_log WHERE action = 'search'")
            .await,
        4
    );
    assert_eq!(
        app.scalar("SELECT count(masked_ip_net) FROM user_logins")
            .await,
        0
    );
    rotator.ok(&["rotate", "token-key"]);
    assert_eq!(
        app.scalar("SELECT count(masked_ip_net) FROM user_logins")
            .await,
        0
    );
    assert_eq!(
        app.scalar("SELECT count(*) FROM user_logins WHERE masked_ip LIKE 't3\\_%'")
            .await,
        600
    );
    app.finish().await;
}

#[tokio::test]
async fn embedded_network_tokens_group_as_networks_before_and_after_rotation() {
    let app = TestApp::embedded();
    let (text, originals) = events(400, 43);
    app.write("events.jsonl", &text);
    load(&app.bin(), "events.jsonl");
    let db = app.sqlite().await;
    let rows: Vec<(String, String, Option<String>)> =
        sqlx::query_as("SELECT user_id, masked_ip, masked_ip_net FROM user_logins")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_groups_as_networks(&by_user(&rows), &originals, 1);
    assert_unlike_address_tokens(&rows);
    db.close().await;

    app.ok(&["rotate", "token-key"]);
    let db = app.sqlite().await;
    let rows: Vec<(String, String, Option<String>)> =
        sqlx::query_as("SELECT user_id, masked_ip, masked_ip_net FROM user_logins")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_groups_as_networks(&by_user(&rows), &originals, 2);
    db.close().await;

    // Turned off, the file refuses one too.
    app.ok(&["migrate", "--no-network-tokens"]);
    let db = app.sqlite().await;
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(masked_ip_net) FROM user_logins")
            .fetch_one(&db)
            .await
            .unwrap(),
        0
    );
    let refused = sqlx::query("UPDATE user_logins SET masked_ip_net = 't2_x' WHERE id = 1")
        .execute(&db)
        .await
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("network tokens are turned off"),
        "{refused}"
    );
    db.close().await;
}
