//! The analyst: reads `user_logins`, and nothing else.

use super::{denied, login, seed, store_denied, ANALYST};
use crate::common::app::TestApp;

use pii_vault::store::{Audit, Batch, Ingest, Keys, Reveal, Selector};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analyst_reads_user_logins_and_nothing_else() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    seed(app.owner()).await;
    let analyst = app.store_as(ANALYST).await;
    let raw = analyst.pool();

    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM user_logins")
        .fetch_one(raw)
        .await
        .unwrap();
    assert_eq!(n, 3);
    // What analysts do with it: find duplicates by token.
    let dups: Vec<(String, i64)> = sqlx::query_as(
        "SELECT masked_ip, count(*) FROM user_logins GROUP BY masked_ip ORDER BY 2 DESC",
    )
    .fetch_all(raw)
    .await
    .unwrap();
    assert_eq!(dups.len(), 3);

    for sql in [
        "SELECT * FROM vault",
        "SELECT * FROM vault_keys",
        "SELECT wrapped FROM vault_keys",
        "SELECT * FROM quarantine",
        "SELECT * FROM audit_log",
        "SELECT * FROM kms_allowlist",
        "SELECT * FROM reveal_requests",
        "SELECT pii_vault_reveal_request('user_id', 'alice', 'why', 'me')",
        "SELECT * FROM pii_vault_reveal_fetch(1)",
        "SELECT pii_vault_register_data_key('dek-00000000-0000-0000-0000-000000000001', 'local:test', '\\x00112233445566778899aabbccddeeff')",
        "INSERT INTO user_logins (message_id) VALUES ('planted')",
        "INSERT INTO vault (message_id, user_id, key_id, nonce, ciphertext) VALUES ('m', 'u', 'dek-1', '\\x00', '\\x00')",
        "INSERT INTO vault_keys (id, purpose, kek_id, created_at) VALUES ('k', 'vault', 'local:x', now())",
        "INSERT INTO quarantine (message_id, reason_code, reason, received_at) VALUES ('m', 'r', 'r', now())",
        "INSERT INTO audit_log (actor, action, target, reason, row_count) VALUES ('a', 'reveal', 'x', 'y', 0)",
        "UPDATE user_logins SET masked_ip = 'x'",
        "DELETE FROM user_logins",
        "TRUNCATE user_logins",
        "SELECT nextval(pg_get_serial_sequence('user_logins', 'id'))",
        "CREATE TABLE stash (x text)",
    ] {
        denied(raw, sql).await;
    }
    let sel = Selector::UserId("alice".into());
    store_denied(
        analyst.reveal_request(&sel, "me", "why").await,
        "reveal_request",
    );
    store_denied(analyst.current_token_key().await, "current_token_key");
    store_denied(
        analyst
            .audit_trail(&pii_vault::store::AuditFilter {
                limit: 10,
                ..Default::default()
            })
            .await,
        "audit_trail",
    );
    store_denied(
        analyst
            .write_batch(&Batch {
                logins: vec![login("eve", "dek-1")],
                ..Batch::default()
            })
            .await,
        "write_batch",
    );

    assert_eq!(app.count("user_logins").await, 3);
    assert_eq!(app.count("audit_log").await, 0);
    app.finish().await;
}
