//! The binary under each role's own login, as an operator runs it.

use super::{who, REVEALER, ROTATOR, WORKER};
use crate::common;
use crate::common::app::{TestApp, ACTOR};

use pii_vault::store::postgres::PgStore;
use pii_vault::store::{JobKind, Jobs};

/// The binary under each role's own login, as an operator runs it: `run`
/// as the worker; `reveal` refused to the worker and served to the
/// revealer, whose login the trail names; `audit` as the revealer;
/// `rotate` and `forget` as the rotator; a second rotation of a kind
/// refused while one runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_does_each_job_under_that_roles_login() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    let worker = app.as_login(&app.login_as(WORKER).await);
    let revealer_login = app.login_as(REVEALER).await;
    let revealer = app.as_login(&revealer_login);
    let rotator_login = app.login_as(ROTATOR).await;
    let rotator = app.as_login(&rotator_login);
    // The owner's migrate allow-lists the local KEK and creates the keys.
    app.ok(&["migrate"]);

    let events = common::gen_events(&["-n", "20", "--seed", "3"]);
    app.write("events.jsonl", &events);
    let raw = common::raw_pii(&events);
    assert!(!raw.is_empty());
    let first: serde_json::Value = serde_json::from_str(events.lines().next().unwrap()).unwrap();
    let user_id = first["user_id"].as_str().unwrap().to_string();

    // A worker configured with a KEK the owner never allowed (here another
    // local key file) stops at start-up, saying why, and stores nothing.
    let stray = worker.run(&[
        "run",
        "--from-file",
        "events.jsonl",
        "--no-progress",
        "--key-dir",
        "other-keys",
    ]);
    let stderr = String::from_utf8_lossy(&stray.stderr);
    assert!(!stray.status.success(), "{stderr}");
    assert!(
        stderr.contains("is not on the database's KMS allow-list"),
        "{stderr}"
    );
    assert_eq!(app.count("user_logins").await, 0);

    let stderr = worker.ok(&["run", "--from-file", "events.jsonl", "--no-progress"]);
    assert_eq!(common::summary(stderr.as_bytes()), (20, 0, 0), "{stderr}");
    assert_eq!(app.count("user_logins").await, 20);
    assert_eq!(app.count("vault").await, 20);
    let workers_key: (String, i64) =
        sqlx::query_as("SELECT created_by, usage_count FROM vault_keys WHERE purpose = 'vault'")
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert!(workers_key.0.ends_with("_worker"), "{workers_key:?}");
    assert_eq!(workers_key.1, 20);

    let reveal = [
        "reveal",
        "--user-id",
        &user_id,
        "--reason",
        "INC-4711",
        "--format",
        "json",
    ];
    let refused = worker.run(&reveal);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "reveal as the worker succeeded:\n{stderr}"
    );
    assert!(
        stderr.contains("permission denied for function pii_vault_reveal_request")
            && stderr.contains("42501"),
        "no clear permission error:\n{stderr}"
    );
    assert!(refused.stdout.is_empty());
    assert_eq!(common::leaked(&refused.stderr, &raw), Vec::<&str>::new());
    assert_eq!(
        app.count("audit_log").await,
        2,
        "only the owner's key set-up"
    );

    let revealed = revealer.ok_output(&reveal);
    let stdout = String::from_utf8_lossy(&revealed.stdout);
    assert!(stdout.contains(first["ip"].as_str().unwrap()), "{stdout}");
    let trail = revealer.ok_output(&["audit", "--format", "json"]);
    let newest: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&trail.stdout)
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(newest["action"], "reveal");
    assert_eq!(newest["actor"], revealer_login.name.as_str());
    assert_eq!(newest["claimed_actor"], ACTOR);

    // The rotator rotates both kinds of key and forgets a user.
    let stderr = rotator.ok(&["rotate", "data-keys"]);
    assert!(stderr.contains("re-encrypted 20 row(s)"), "{stderr}");
    let stderr = rotator.ok(&["rotate", "token-key"]);
    assert!(
        stderr.contains("token key v2 is current; re-tokenised 20 login(s)"),
        "{stderr}"
    );
    let stderr = rotator.ok(&[
        "forget",
        "--user-id",
        &user_id,
        "--reason",
        "erasure request",
    ]);
    assert!(stderr.contains("erased"), "{stderr}");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM vault WHERE user_id = $1")
        .bind(&user_id)
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(left, 0);

    // A rotation of a kind that is already running is refused, clearly.
    let holder = PgStore::connect(&rotator_login.url).await.unwrap();
    let job = holder
        .begin_job(JobKind::TokenKey, "user_logins", &who(), 0)
        .await
        .unwrap();
    let busy = rotator.run(&["rotate", "token-key"]);
    let stderr = String::from_utf8_lossy(&busy.stderr);
    assert!(!busy.status.success(), "{stderr}");
    assert!(
        stderr.contains("another rotate-token-key is running"),
        "{stderr}"
    );
    job.finish().await;
    holder.pool().close().await;

    let actions: Vec<(String, String)> =
        sqlx::query_as("SELECT action, actor FROM audit_log ORDER BY id")
            .fetch_all(app.pool())
            .await
            .unwrap();
    let names: Vec<&str> = actions.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(
        names,
        [
            "allow-kek",
            "keys-init",
            "reveal",
            "rotate-data-keys",
            "rotation-done",
            "rotate-token-key",
            "rotation-done",
            "forget",
            "rotate-token-key"
        ]
    );
    assert!(
        actions[3..].iter().all(|(_, a)| a.ends_with("_rotator")),
        "{actions:?}"
    );
    app.finish().await;
}
