//! `pii-vault audit checkpoint` and `audit public-key`: signing where the
//! chains stand, keeping a copy in the database, and shipping the line.

use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;

use crate::cli::{CheckpointArgs, Cli, PublicKeyArgs};
use crate::commands::open_store;
use crate::crypto::signing::Signer;
use crate::kms::signing::signer_from_config;
use crate::store::{Store, StoreError};
use crate::trail::{ChainState, Checkpoint, Head, Kind};

pub async fn checkpoint(cli: &Cli, args: &CheckpointArgs) -> anyhow::Result<()> {
    let store = open_store(cli).await?;
    let signer = signer_from_config(args.signing.signing_key_id.as_deref(), &cli.key_dir).await?;
    let Some(every) = args.every else {
        let c = at_head(store.as_ref(), signer.as_ref()).await?;
        return emit(&c, args.out.as_deref());
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tick.tick() => {}
        }
        match at_head(store.as_ref(), signer.as_ref()).await {
            Ok(c) => emit(&c, args.out.as_deref())?,
            // The database or KMS away for a while: the next tick tries again,
            // and the gap shows as a later `at`, not as a forged line.
            Err(e) if is_transient(&e) => {
                tracing::warn!(error = %format!("{e:#}"), "no checkpoint this time; trying again at the next one");
            }
            Err(e) => return Err(e),
        }
    }
}

fn is_transient(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<StoreError>()
            .is_some_and(StoreError::is_transient)
            || c.downcast_ref::<crate::crypto::WrapError>()
                .is_some_and(crate::crypto::WrapError::is_transient)
    })
}

pub(super) fn head(state: &ChainState) -> Head {
    Head {
        head_id: state.head_id,
        head_hash: hex::encode(&state.head_hash),
        count: state.count,
    }
}

/// A checkpoint of where both chains stand now, signed and stored.
async fn at_head(store: &dyn Store, signer: &dyn Signer) -> anyhow::Result<Checkpoint> {
    // Another checkpoint stored between our read and our write makes ours
    // not the next one: read again.
    let mut attempts = 0;
    loop {
        let heads = store.chain_heads().await?;
        let made = sign_and_store(
            store,
            signer,
            Kind::Head,
            head(&heads.trail),
            head(&heads.requests),
            heads.now,
        )
        .await;
        match made {
            Err(e) if attempts < 3 && is_race(&e) => attempts += 1,
            other => return other,
        }
    }
}

fn is_race(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| matches!(c.downcast_ref::<StoreError>(), Some(StoreError::Refused(m)) if m.contains("is not the next one")))
}

/// Signs a checkpoint after the last stored one and keeps its copy.
pub(super) async fn sign_and_store(
    store: &dyn Store,
    signer: &dyn Signer,
    kind: Kind,
    trail: Head,
    requests: Head,
    at: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<Checkpoint> {
    let (seq, prev_sig) = match store.last_checkpoint().await? {
        Some(line) => {
            let last =
                Checkpoint::parse(&line, 1).context("the last checkpoint in the database")?;
            (last.seq + 1, Some(last.sig))
        }
        None => (1, None),
    };
    let mut c = Checkpoint {
        seq,
        kind,
        at,
        trail,
        requests,
        prev_sig,
        key: signer.key_id(),
        alg: signer.algorithm().as_str().into(),
        sig: String::new(),
    };
    let sig = signer
        .sign(&c.signed_bytes())
        .await
        .with_context(|| format!("cannot sign with {}", signer.key_id()))?;
    c.set_signature(&sig);
    store.store_checkpoint(c.seq, c.at, &c.to_line()).await?;
    Ok(c)
}

/// Appends `line` and a newline to `path` (created if missing), on disk
/// before it returns.
pub(super) fn append_line(path: &Path, line: &str) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    f.write_all(format!("{line}\n").as_bytes())
        .and_then(|()| f.sync_data())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn emit(c: &Checkpoint, out: Option<&Path>) -> anyhow::Result<()> {
    match out {
        None => println!("{}", c.to_line()),
        Some(path) => {
            append_line(path, &c.to_line())?;
            eprintln!(
                "checkpoint {}: trail through row {} ({} rows), requests through {} ({}); appended to {}",
                c.seq,
                c.trail.head_id,
                c.trail.count,
                c.requests.head_id,
                c.requests.count,
                path.display()
            );
        }
    }
    Ok(())
}

pub async fn public_key(cli: &Cli, args: &PublicKeyArgs) -> anyhow::Result<()> {
    let signer = signer_from_config(args.signing.signing_key_id.as_deref(), &cli.key_dir).await?;
    let key = signer
        .verifying_key()
        .await
        .with_context(|| format!("cannot read the public key of {}", signer.key_id()))?;
    let pem = key.to_pem();
    match &args.out {
        None => print!("{pem}"),
        Some(path) => {
            std::fs::write(path, &pem)
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!(
                "public key of {} ({} {}) written to {}",
                signer.key_id(),
                key.algorithm().as_str(),
                key.fingerprint(),
                path.display()
            );
        }
    }
    Ok(())
}
