//! Per-event CPU cost of the protect step: parse, tokenise, seal.
//!
//! Run with `cargo bench --bench protect`. These bound what one core can
//! do before any I/O; the end-to-end figures come from scripts/bench-e2e.sh.

use chrono::Utc;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use pii_vault::crypto::aead::Sealer;
use pii_vault::crypto::{Aad, KeyMaterial, TokenField, TokenKey};
use pii_vault::domain::{Ack, LoginEvent, Message};
use pii_vault::pipeline::protect::protect;
use zeroize::Zeroizing;

const EVENT: &str = r#"{"user_id": "424cdd21-063a-43a7-b91b-7ca1a833afae", "app_version": "2.3.0", "device_type": "android", "ip": "199.172.111.135", "locale": "RU", "device_id": "593-47-5928"}"#;

fn benches(c: &mut Criterion) {
    let token_key = TokenKey::new(1, &KeyMaterial::generate());
    let dek = KeyMaterial::generate();
    let sealer = Sealer::new(&dek);
    let mut g = c.benchmark_group("per_event");
    g.throughput(Throughput::Elements(1));

    g.bench_function("parse", |b| {
        b.iter(|| LoginEvent::parse(black_box(EVENT.as_bytes())).unwrap())
    });
    g.bench_function("tokenise_ip_and_device", |b| {
        b.iter(|| {
            (
                token_key.token(TokenField::Ip, black_box("199.172.111.135")),
                token_key.token(TokenField::DeviceId, black_box("593-47-5928")),
            )
        })
    });
    let plain = br#"{"ip":"199.172.111.135","device_id":"593-47-5928"}"#;
    let aad = Aad {
        kind: "vault",
        message_id: "0f9e4c1a-5b7d-4e2a-9c3f-8a1b2c3d4e5f",
        user_id: "424cdd21-063a-43a7-b91b-7ca1a833afae",
        key_id: "dek-0",
    };
    g.bench_function("seal_originals", |b| {
        b.iter(|| sealer.seal(black_box(&aad), black_box(plain)).unwrap())
    });

    let msg = Message {
        id: "0f9e4c1a-5b7d-4e2a-9c3f-8a1b2c3d4e5f".into(),
        body: Zeroizing::new(EVENT.as_bytes().to_vec()),
        sent_at: Utc::now(),
        ack: Ack::None,
        line: None,
        source: None,
    };
    // With the network token (the default) and without: what
    // `masked_ip_net` costs per event.
    g.bench_function("protect_event", |b| {
        b.iter(|| protect(black_box(&msg), &token_key, true, "dek-0", &sealer).unwrap())
    });
    g.bench_function("protect_event_without_network_token", |b| {
        b.iter(|| protect(black_box(&msg), &token_key, false, "dek-0", &sealer).unwrap())
    });
    g.finish();
}

criterion_group!(protect_benches, benches);
criterion_main!(protect_benches);
