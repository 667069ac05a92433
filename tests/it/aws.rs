//! The AWS adapters against LocalStack (SQS and KMS): `kms::aws::AwsKms`,
//! `source::sqs::SqsSource`, and the worker end to end through the binary.
//!
//! `scripts/test.sh` starts LocalStack and sets `AWS_ENDPOINT_URL` and
//! `PII_VAULT_TEST_AWS=1`; without them these tests fail (or skip, under
//! `PII_VAULT_SKIP_SERVICES=1`). Every test makes its own queue and keys.

use crate::common::{self, app::TestApp, aws as aws_helpers};

use std::collections::HashSet;
use std::process::Output;
use std::time::Duration;

use chrono::Utc;
use pii_vault::crypto::{KeyPurpose, KeyWrapper, WrapError};
use pii_vault::domain::{Ack, CanonicalIp};
use pii_vault::kms::aws::AwsKms;
use pii_vault::source::sqs::SqsSource;
use pii_vault::source::MessageSource;

const PURPOSES: [KeyPurpose; 2] = [KeyPurpose::Vault, KeyPurpose::Token];

// ------------------------------------------------------------------- KMS

#[tokio::test]
async fn kms_connects_by_key_id_by_arn_and_by_alias() {
    if aws_helpers::endpoint().is_none() {
        return;
    }
    let kms = aws_helpers::kms().await;
    let (id, arn) = aws_helpers::create_key(&kms).await;
    let alias = aws_helpers::create_alias(&kms, &id).await;
    for how in [&id, &arn, &alias] {
        let wrapper = AwsKms::connect(how)
            .await
            .unwrap_or_else(|e| panic!("connect {how}: {e}"));
        assert_eq!(
            wrapper.kek_id(),
            arn,
            "connecting with {how} must resolve to the key's ARN"
        );
        wrapper.check().await.unwrap();
    }
}

#[tokio::test]
async fn kms_generate_then_unwrap_round_trips_for_each_purpose() {
    if aws_helpers::endpoint().is_none() {
        return;
    }
    let kms = aws_helpers::kms().await;
    let (id, arn) = aws_helpers::create_key(&kms).await;
    let wrapper = AwsKms::connect(&id).await.unwrap();
    for purpose in PURPOSES {
        let (key, wrapped) = wrapper.generate(purpose).await.unwrap();
        assert_eq!(wrapped.kek_id, arn);
        assert!(
            wrapped.blob.len() > 32,
            "the stored form must be a KMS ciphertext, not the key"
        );
        assert!(
            !wrapped
                .blob
                .windows(32)
                .any(|w| w == key.expose_for_wrapping()),
            "the wrapped blob contains the plaintext key"
        );
        let back = wrapper.unwrap(purpose, &wrapped).await.unwrap();
        assert_eq!(
            back.expose_for_wrapping(),
            key.expose_for_wrapping(),
            "{purpose:?}"
        );
        // A second key is a different key.
        let (other, _) = wrapper.generate(purpose).await.unwrap();
        assert_ne!(other.expose_for_wrapping(), key.expose_for_wrapping());
    }
}

#[tokio::test]
async fn kms_unwrap_with_the_wrong_purpose_fails() {
    if aws_helpers::endpoint().is_none() {
        return;
    }
    let kms = aws_helpers::kms().await;
    let (id, _) = aws_helpers::create_key(&kms).await;
    let wrapper = AwsKms::connect(&id).await.unwrap();
    for (made, asked) in [
        (KeyPurpose::Vault, KeyPurpose::Token),
        (KeyPurpose::Token, KeyPurpose::Vault),
    ] {
        let (_, wrapped) = wrapper.generate(made).await.unwrap();
        let err = wrapper
            .unwrap(asked, &wrapped)
            .await
            .expect_err("a key unwrapped under the wrong purpose");
        assert!(
            matches!(err, WrapError::Unwrap),
            "{made:?} as {asked:?}: {err:?}"
        );
        assert!(!err.is_transient());
    }
}

#[tokio::test]
async fn kms_rewrap_moves_a_key_to_another_kms_key() {
    if aws_helpers::endpoint().is_none() {
        return;
    }
    let kms = aws_helpers::kms().await;
    let (id1, arn1) = aws_helpers::create_key(&kms).await;
    let (id2, arn2) = aws_helpers::create_key(&kms).await;
    let first = AwsKms::connect(&id1).await.unwrap();
    let second = AwsKms::connect(&id2).await.unwrap();
    for purpose in PURPOSES {
        let (key, wrapped) = first.generate(purpose).await.unwrap();
        assert_eq!(wrapped.kek_id, arn1);
        let moved = second.rewrap(purpose, &wrapped).await.unwrap();
        assert_eq!(
            moved.kek_id, arn2,
            "the re-wrapped key must name its new KMS key"
        );
        assert_ne!(moved.blob, wrapped.blob);
        let back = second.unwrap(purpose, &moved).await.unwrap();
        assert_eq!(back.expose_for_wrapping(), key.expose_for_wrapping());
        // The purpose is kept across the move.
        let other = if purpose == KeyPurpose::Vault {
            KeyPurpose::Token
        } else {
            KeyPurpose::Vault
        };
        // KMS refuses the other purpose's encryption context as it would
        // a tampered blob: InvalidCiphertextException.
        let unwrapped = second.unwrap(other, &moved).await;
        assert!(
            matches!(unwrapped, Err(WrapError::Unwrap)),
            "unwrap under the other purpose: {:?}",
            unwrapped.map(|_| "a key")
        );
        let rewrapped = second.rewrap(other, &wrapped).await;
        assert!(
            matches!(rewrapped, Err(WrapError::Unwrap)),
            "rewrap must check the source purpose: {rewrapped:?}"
        );
    }
}

#[tokio::test]
async fn kms_missing_or_disabled_key_is_one_clear_error() {
    if aws_helpers::endpoint().is_none() {
        return;
    }
    let kms = aws_helpers::kms().await;

    for missing in [
        uuid::Uuid::new_v4().to_string(),
        format!("alias/{}", aws_helpers::unique("missing")),
    ] {
        let err = AwsKms::connect(&missing)
            .await
            .err()
            .unwrap_or_else(|| panic!("connected to missing key {missing}"));
        let text = err.to_string();
        assert!(text.contains("NotFound"), "{missing}: {text}");
        assert!(
            !err.is_transient(),
            "a missing key must not be retried: {text}"
        );
    }

    let (id, _) = aws_helpers::create_key(&kms).await;
    let wrapper = AwsKms::connect(&id).await.unwrap();
    kms.disable_key()
        .key_id(&id)
        .send()
        .await
        .expect("DisableKey");
    let err = AwsKms::connect(&id)
        .await
        .err()
        .expect("connected to a disabled key");
    let text = err.to_string();
    assert!(text.contains("Disabled") && text.contains(&id), "{text}");
    assert!(!err.is_transient());
    // A worker already connected finds out at its next check.
    let disabled = |r: Result<(), WrapError>, what: &str| match r {
        Err(e) => assert!(
            !e.is_transient() && e.to_string().contains("Disabled"),
            "{what}: refused, but not as a disabled key: {e}"
        ),
        Ok(()) => panic!("{what} with a disabled key succeeded"),
    };
    disabled(wrapper.check().await, "check");
    disabled(
        wrapper.generate(KeyPurpose::Vault).await.map(|_| ()),
        "generate",
    );
}

// ------------------------------------------------------------------- SQS

/// Receives until `want` messages arrived (a receive may return fewer than
/// are there) or 20 receives went by.
async fn receive_n(source: &SqsSource, want: usize) -> Vec<pii_vault::domain::Message> {
    let mut got = Vec::new();
    for _ in 0..20 {
        match source.receive(10).await.unwrap() {
            Some(batch) => got.extend(batch),
            None => break,
        }
        if got.len() >= want {
            break;
        }
    }
    got
}

#[tokio::test]
async fn sqs_receive_gives_bodies_ids_and_sent_at_and_ack_deletes() {
    if aws_helpers::endpoint().is_none() {
        return;
    }
    let sqs = aws_helpers::sqs().await;
    let url = aws_helpers::create_queue(&sqs).await;
    let bodies: Vec<String> = (0..7).map(|i| format!(r#"{{"n": {i}}}"#)).collect();
    let before = Utc::now() - chrono::Duration::milliseconds(500);
    aws_helpers::send_all(&sqs, &url, &bodies).await;
    let after = Utc::now() + chrono::Duration::milliseconds(500);
    // Receive well after sending, so a sent_at of "now" would show.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let source = SqsSource::connect(&url, true).await.unwrap();
    assert_eq!(source.preferred_batch(), 10);
    let got = receive_n(&source, bodies.len()).await;
    assert_eq!(got.len(), bodies.len());
    let mut seen: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8(m.body.to_vec()).unwrap())
        .collect();
    seen.sort();
    assert_eq!(seen, bodies);
    let ids: HashSet<&str> = got.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids.len(), bodies.len(), "message ids must be distinct");
    for m in &got {
        assert!(
            m.sent_at >= before && m.sent_at <= after,
            "sent_at {} is not the SentTimestamp",
            m.sent_at
        );
        assert!(matches!(m.ack, Ack::Sqs { .. }));
    }
    // Received but not acknowledged: invisible, still there.
    assert_eq!(
        aws_helpers::queue_counts(&sqs, &url).await,
        (0, bodies.len() as u64)
    );

    // Acknowledge all but two: only those two remain (in flight).
    let mut acks: Vec<Ack> = got.into_iter().map(|m| m.ack).collect();
    let kept = acks.split_off(acks.len() - 2);
    source.ack(acks).await.unwrap();
    assert_eq!(aws_helpers::queue_counts(&sqs, &url).await, (0, 2));
    source.ack(kept).await.unwrap();
    assert_eq!(aws_helpers::queue_counts(&sqs, &url).await, (0, 0));
    // Acknowledging nothing is fine.
    source.ack(Vec::new()).await.unwrap();
}

#[tokio::test]
async fn sqs_until_empty_ends_on_an_empty_queue() {
    if aws_helpers::endpoint().is_none() {
        return;
    }
    let sqs = aws_helpers::sqs().await;
    let url = aws_helpers::create_queue(&sqs).await;
    let source = SqsSource::connect(&url, true).await.unwrap();
    // A guard against hanging, not a timing assertion (timings belong to
    // the benches): well above any poll, so only a source that never ends
    // trips it.
    let received = tokio::time::timeout(Duration::from_secs(120), source.receive(10))
        .await
        .expect("receive on an empty queue under --until-empty never returned");
    assert!(
        received.unwrap().is_none(),
        "an empty queue under --until-empty is the end"
    );

    // Messages that arrive later are seen, and after them the end again.
    aws_helpers::send_all(&sqs, &url, &["{}".to_string()]).await;
    let got = receive_n(&source, 1).await;
    assert_eq!(got.len(), 1);
    source
        .ack(got.into_iter().map(|m| m.ack).collect())
        .await
        .unwrap();
    assert!(source.receive(10).await.unwrap().is_none());
}

#[tokio::test]
async fn sqs_missing_queue_is_one_clear_error() {
    let Some(endpoint) = aws_helpers::endpoint() else {
        return;
    };
    let url = format!(
        "{}/000000000000/{}",
        endpoint.trim_end_matches('/'),
        aws_helpers::unique("missing")
    );
    let err = SqsSource::connect(&url, true)
        .await
        .err()
        .expect("connected to a missing queue");
    let text = format!("{err:#}");
    assert!(
        text.contains("NonExistentQueue") || text.contains("QueueDoesNotExist"),
        "{text}"
    );
}

// ------------------------------------------------------------------- end to end

/// `pii-vault ARGS…` in the fixture's directory, which must succeed, with
/// every library's debug lines too (all of them go through the leak check).
fn pii_vault(app: &TestApp, args: &[&str]) -> Output {
    app.bin()
        .env("PII_VAULT_LOG", "debug,sqlx=warn")
        .ok_output(args)
}

#[tokio::test]
async fn worker_drains_a_queue_into_sqlite_with_kms_and_reveals_originals() {
    if aws_helpers::endpoint().is_none() {
        return;
    }
    let (sqs, kms) = (aws_helpers::sqs().await, aws_helpers::kms().await);
    let url = aws_helpers::create_queue(&sqs).await;
    let (key_id, _) = aws_helpers::create_key(&kms).await;

    let gen = common::gen_events_recorded(&["-n", &300.to_string(), "--malformed-pct", "2"]);
    let input = gen.text.clone();
    let bodies: Vec<String> = input.lines().map(str::to_string).collect();
    assert_eq!(bodies.len(), 300);
    let valid: Vec<serde_json::Value> = gen
        .valid()
        .iter()
        .map(|b| serde_json::from_str(b).unwrap())
        .collect();
    assert!(
        !gen.malformed.is_empty(),
        "the input should carry malformed events"
    );
    aws_helpers::send_all(&sqs, &url, &bodies).await;
    assert_eq!(aws_helpers::queue_counts(&sqs, &url).await, (300, 0));

    let app = TestApp::embedded();
    let db = format!("sqlite:{}", app.path("e2e.db").display());
    let common_args = ["--database-url", &db, "--kms-key-id", &key_id];
    let run_args = [
        "run",
        "--queue-url",
        &url,
        "--until-empty",
        "--concurrency",
        "2",
        "--no-progress",
    ];
    let run: Vec<&str> = common_args.iter().chain(&run_args).copied().collect();

    let first = pii_vault(&app, &run);
    let (stored, duplicates, rejected) = common::summary(&first.stderr);
    assert_eq!(
        stored + rejected,
        300,
        "every event is stored or rejected: {:?}",
        common::summary(&first.stderr)
    );
    assert_eq!(duplicates, 0);
    assert_eq!(stored, valid.len() as u64);
    assert_eq!(
        aws_helpers::queue_counts(&sqs, &url).await,
        (0, 0),
        "the queue must be drained"
    );
    assert!(
        !String::from_utf8_lossy(&first.stderr).contains("not for production"),
        "with --kms-key-id the local key file must not be used"
    );

    let second = pii_vault(&app, &run);
    assert_eq!(
        common::summary(&second.stderr),
        (0, 0, 0),
        "a second run must add nothing"
    );

    // Reveal one user's logins: exactly the originals of that user's valid events.
    let user = valid[0]["user_id"].as_str().unwrap();
    let mut want: Vec<(String, String)> = valid
        .iter()
        .filter(|v| v["user_id"] == user)
        .map(|v| {
            let ip = CanonicalIp::parse(v["ip"].as_str().unwrap())
                .unwrap()
                .expose()
                .to_string();
            (ip, v["device_id"].as_str().unwrap().to_string())
        })
        .collect();
    let reveal_args = [
        "reveal",
        "--user-id",
        user,
        "--reason",
        "e2e test",
        "--format",
        "json",
    ];
    let revealed = pii_vault(
        &app,
        &common_args
            .iter()
            .chain(&reveal_args)
            .copied()
            .collect::<Vec<_>>(),
    );
    let mut got: Vec<(String, String)> = String::from_utf8(revealed.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["user_id"], user);
            let ip = CanonicalIp::parse(v["ip"].as_str().unwrap())
                .unwrap()
                .expose()
                .to_string();
            (ip, v["device_id"].as_str().unwrap().to_string())
        })
        .collect();
    want.sort();
    got.sort();
    assert_eq!(got, want);

    // No plaintext PII in the database or in what the runs printed.
    let raw = common::raw_pii(&input);
    assert!(raw.len() > 50);
    let leaks = common::leaked(&common::files_bytes(app.dir(), "e2e.db"), &raw);
    assert!(
        leaks.is_empty(),
        "the database holds plaintext PII: {} values",
        leaks.len()
    );
    for out in [&first, &second] {
        let leaks = common::leaked(&[&out.stdout[..], &out.stderr[..]].concat(), &raw);
        assert!(
            leaks.is_empty(),
            "run output holds plaintext PII: {} values",
            leaks.len()
        );
    }
}
