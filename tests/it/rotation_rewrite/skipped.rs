//! A sealed row that a rewrite cannot open (tampered) goes into the new
//! table as it was, as in place: the rotation reports it by message id and
//! exits with status 1, its data key is kept (retired, not destroyed), and
//! its login keeps its tokens, with the old token version kept for it.

use super::{check_oids, loaded, oids, rotator};
use crate::common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_a_rewrite_cannot_open_is_kept_as_it_was_with_its_key() {
    let Some(l) = loaded().await else {
        return;
    };
    let app = &l.app;
    let first = format!("vault_{}", l.closed[0]);
    let victim = app
        .strings(&format!(
            "SELECT message_id FROM {first} ORDER BY message_id LIMIT 1"
        ))
        .await
        .remove(0);
    let key_of = format!("SELECT key_id FROM vault WHERE message_id = '{victim}'");
    let key = app.strings(&key_of).await.remove(0);
    // Tampered by hand, the fence off (its key is retired).
    let mut tx = app.pool().begin().await.unwrap();
    for sql in [
        "SET LOCAL session_replication_role = replica".to_string(),
        format!(
            "UPDATE vault SET ciphertext = set_byte(ciphertext, 0, get_byte(ciphertext, 0) # 1) \
             WHERE message_id = '{victim}'"
        ),
    ] {
        sqlx::query(&sql).execute(&mut *tx).await.unwrap();
    }
    tx.commit().await.unwrap();
    let (vault, logins) = (oids(app, "vault").await, oids(app, "user_logins").await);
    let total = app.count("vault").await;
    let (bin, _) = rotator(app).await;
    let raw = common::raw_pii(&l.input);

    let out = bin.run(&["rotate", "data-keys", "--reason", "tampered"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("re-encrypted {} row(s)", total - 1))
            && stderr.contains("1 sealed row(s) could not be opened")
            && stderr.contains(&victim),
        "{stderr}"
    );
    assert!(common::leaked(&out.stderr, &raw).is_empty());
    check_oids(app, "vault", &vault, &l.closed).await;
    assert_eq!(app.count("vault").await, total);
    assert_eq!(app.strings(&key_of).await, [key.as_str()], "as it was");
    let state = app
        .strings(&format!("SELECT state FROM vault_keys WHERE id = '{key}'"))
        .await;
    assert_eq!(state, ["retired"], "the key it needs is kept");

    let out = bin.run(&["rotate", "token-key", "--reason", "tampered"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&victim), "{stderr}");
    assert!(common::leaked(&out.stderr, &raw).is_empty());
    check_oids(app, "user_logins", &logins, &l.closed).await;
    let stale = app
        .strings("SELECT message_id FROM user_logins WHERE masked_ip NOT LIKE 't2\\_%'")
        .await;
    assert_eq!(
        stale,
        [victim],
        "only the login whose original is unreadable"
    );
    let v1 = app
        .strings("SELECT state FROM vault_keys WHERE purpose = 'token' AND version = 1")
        .await;
    assert_eq!(v1, ["retired"], "v1 kept for it");
    l.app.finish().await;
}
