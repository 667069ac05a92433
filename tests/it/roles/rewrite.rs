//! The rewrite of closed partitions (functions/45_rewrite.sql) is the
//! rotator's only under its committed, leased job, and is the fence of the
//! new table, which the parent's triggers never see: rows go in only under
//! the job's own new data keys or tokens of its version, the swap refuses a
//! partition with rows still under an old key, and nobody may touch the
//! new table directly.

use super::{
    denied, fresh_dek, new_key, pg_code, refused, seed, token, who, ANALYST, REVEALER, ROTATOR,
    TEST_KEK, WORKER,
};
use crate::common::app::TestApp;

use pii_vault::crypto::KeyPurpose;
use pii_vault::store::{
    Chunks, JobKind, JobStart, Jobs, NewTokens, RewriteState, Rewrites, StoredKey, VaultRow,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrites_go_only_through_the_job_and_only_under_its_keys() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    // Three logins dated 2024-03-01: a closed month, rewritten.
    seed(app.owner()).await;
    let month = "vault_y2024m03";
    let rotator = app.store_as(ROTATOR).await;
    let raw = rotator.pool();
    for role in [WORKER, ANALYST, REVEALER] {
        let other = app.store_as(role).await;
        denied(
            other.pool(),
            &format!("SELECT pii_vault_rewrite_begin(1, 1, '{month}')"),
        )
        .await;
        denied(other.pool(), "SELECT * FROM rotation_rewrites").await;
    }
    let lease = rotator
        .begin_job(JobKind::DataKeys, "vault, quarantine", &who(), 3)
        .await
        .unwrap();
    let bounds = ["".to_string()];
    let job = rotator
        .start_job(&lease, JobStart::DataKeys { bounds: &bounds })
        .await
        .unwrap();
    refused(
        raw,
        &format!("SELECT * FROM pii_vault_rewrite_list(123, {})", job.id),
        "PV004",
    )
    .await;
    let listed = rotator.rewrites(&job).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        (listed[0].partition.as_str(), listed[0].state),
        (month, RewriteState::Pending)
    );
    // The in-place reader leaves the closed month to its rewrite.
    assert!(rotator
        .vault_chunk(&job, "", None, 10)
        .await
        .unwrap()
        .is_empty());
    // A step out of order, or of the other rotation, is refused.
    let r = rotator.rewrite_vault_chunk(&job, month, "", 10).await;
    assert_eq!(pg_code(&r.unwrap_err()), Some("PV011"));
    assert!(rotator.rewrite_begin(&job, month).await.unwrap());
    let r = rotator.rewrite_logins_chunk(&job, month, 0, 10).await;
    assert_eq!(pg_code(&r.unwrap_err()), Some("PV011"));
    // Nobody writes or reads the new table but the functions.
    denied(raw, &format!("SELECT * FROM {month}_rewrite")).await;
    denied(raw, &format!("DELETE FROM {month}_rewrite")).await;
    denied(raw, &format!("SELECT * FROM {month}")).await;

    let rows = rotator
        .rewrite_vault_chunk(&job, month, "", 10)
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    let under = |rows: &[VaultRow], key: &str| -> Vec<(VaultRow, String)> {
        rows.iter()
            .map(|r| {
                let mut v = r.clone();
                v.key_id = key.into();
                (v, r.key_id.clone())
            })
            .collect()
    };
    // Under an old key, or a key the job did not make: refused.
    for key in ["dek-1", "dek-unknown"] {
        let r = rotator
            .rewrite_vault_write(&job, month, &under(&rows, key), &[])
            .await;
        assert_eq!(pg_code(&r.unwrap_err()), Some("PV011"), "under {key}");
    }
    let dek2 = fresh_dek(TEST_KEK);
    rotator.job_new_data_key(&job, &dek2).await.unwrap();
    // Two of the three rows: the third, still under its old key, is one the
    // swap may not copy as it is.
    let written = rotator
        .rewrite_vault_write(&job, month, &under(&rows[..2], &dek2.id), &[])
        .await
        .unwrap();
    assert_eq!(written, 2);
    rotator.rewrite_index(&job, month).await.unwrap();
    let r = rotator.rewrite_swap(&job, month).await;
    assert_eq!(pg_code(&r.unwrap_err()), Some("PV011"));
    // Started over, whole: swapped.
    assert!(rotator.rewrite_begin(&job, month).await.unwrap());
    rotator
        .rewrite_vault_write(&job, month, &under(&rows, &dek2.id), &[])
        .await
        .unwrap();
    rotator.rewrite_index(&job, month).await.unwrap();
    assert_eq!(rotator.rewrite_swap(&job, month).await.unwrap(), 0);
    assert_eq!(
        rotator.rewrites(&job).await.unwrap()[0].state,
        RewriteState::Swapped
    );
    assert_eq!(
        app.scalar(&format!(
            "SELECT count(*) FROM {month} WHERE key_id = '{}'",
            dek2.id
        ))
        .await,
        3
    );
    rotator.range_done(&job, 0).await.unwrap();
    rotator.range_done(&job, 1).await.unwrap();
    rotator.finish_job(&job).await.unwrap();
    lease.finish().await;

    // ------------------------------------------------------- token key
    let lease = rotator
        .begin_job(JobKind::TokenKey, "user_logins", &who(), 3)
        .await
        .unwrap();
    let tok2 = StoredKey {
        id: format!("tok-{}", uuid::Uuid::new_v4()),
        ..new_key("x", KeyPurpose::Token, 2)
    };
    let job = rotator
        .start_job(
            &lease,
            JobStart::TokenKey {
                bounds: &bounds,
                key: &tok2,
            },
        )
        .await
        .unwrap();
    let month = "user_logins_y2024m03";
    assert!(rotator.rewrite_begin(&job, month).await.unwrap());
    let stale = rotator
        .rewrite_logins_chunk(&job, month, 0, 10)
        .await
        .unwrap();
    assert_eq!(stale.len(), 3);
    let tokens = |version: i64| -> Vec<NewTokens> {
        stale
            .iter()
            .map(|(id, _, _)| NewTokens {
                id: *id,
                masked_ip: token(version),
                masked_device_id: token(version),
                masked_ip_net: Some(token(version)),
            })
            .collect()
    };
    let r = rotator
        .rewrite_logins_write(&job, month, &tokens(1), &[])
        .await;
    assert_eq!(pg_code(&r.unwrap_err()), Some("PV003"), "tokens of v1");
    let written = rotator
        .rewrite_logins_write(&job, month, &tokens(2), &[])
        .await
        .unwrap();
    assert_eq!(written, 3);
    rotator.rewrite_index(&job, month).await.unwrap();
    rotator.rewrite_swap(&job, month).await.unwrap();
    assert_eq!(
        app.scalar(&format!(
            "SELECT count(*) FROM {month} WHERE masked_ip LIKE 't2\\_%'"
        ))
        .await,
        3
    );
    lease.finish().await;
    app.finish().await;
}
