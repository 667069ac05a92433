//! `pii-vault rotate kek | data-keys | token-key`: the command-line face of
//! [`crate::rotation`]: progress on a terminal, a summary, the exit status.

use anyhow::Context as _;

use crate::cli::{Cli, JobArgs, RotateCommand, ScaleArgs};
use crate::crypto::KeyWrapper;
use crate::progress::JobProgress;
use crate::rotation::{self, RotationOptions, Skipped};
use crate::store::{Profile, Requester};

pub async fn rotate(cli: &Cli, cmd: &RotateCommand) -> anyhow::Result<()> {
    let store = super::open_store(cli).await?;
    let wrapper = super::open_wrapper(cli).await?;
    match cmd {
        RotateCommand::Kek { to, job } => {
            let target = crate::kms::aws::AwsKms::connect(to)
                .await
                .with_context(|| format!("the target KMS key {to}"))?;
            let done = rotation::rotate_kek(&*store, &*wrapper, &target, &request(job)).await?;
            eprintln!(
                "pii-vault: re-wrapped {} key(s) under {}; every stored key is now wrapped by it (audit record {}). \
                 Point PII_VAULT_KMS_KEY_ID at it; the old KMS key can then be disabled.",
                done.rewrapped,
                target.kek_id(),
                done.record_id
            );
            Ok(())
        }
        RotateCommand::DataKeys(args) => {
            let pb = JobProgress::new(cli.progress(), "rows re-encrypted");
            let opts = options(store.profile(), args);
            let done =
                rotation::rotate_data_keys(store, wrapper, &request(&args.job), &opts, &pb).await?;
            pb.finish();
            eprintln!(
                "pii-vault: re-encrypted {} row(s) under {} new data key(s); destroyed {} old data key(s) (audit record {})",
                done.resealed,
                done.new_keys.len(),
                done.destroyed.len(),
                done.record_id
            );
            skipped_is_an_error(&done.skipped, "their old data keys were kept")
        }
        RotateCommand::TokenKey(args) => {
            let pb = JobProgress::new(cli.progress(), "logins re-tokenised");
            let opts = options(store.profile(), args);
            let done =
                rotation::rotate_token_key(store, wrapper, &request(&args.job), &opts, &pb).await?;
            pb.finish();
            eprintln!(
                "pii-vault: token key v{} is current; re-tokenised {} login(s); destroyed {} old token key(s) (audit record {})",
                done.version,
                done.retokenised,
                done.destroyed.len(),
                done.record_id
            );
            skipped_is_an_error(
                &done.skipped,
                "they keep their old tokens and the old token key stays retired, not destroyed",
            )
        }
    }
}

fn request(job: &JobArgs) -> Requester {
    Requester {
        claimed_actor: super::claimed_actor(job.actor.as_deref()),
        reason: job.reason.clone(),
    }
}

/// A rotation that skipped rows finished everything else, but must not look
/// like a clean run to a scheduler.
fn skipped_is_an_error(skipped: &Skipped, consequence: &str) -> anyhow::Result<()> {
    if skipped.count == 0 {
        return Ok(());
    }
    anyhow::bail!(
        "{} sealed row(s) could not be opened and were skipped ({consequence}); message ids: {}{}",
        skipped.count,
        skipped.message_ids.join(", "),
        if skipped.count as usize > skipped.message_ids.len() {
            ", …"
        } else {
            ""
        }
    )
}

fn options(profile: Profile, args: &ScaleArgs) -> RotationOptions {
    RotationOptions {
        jobs: (args.jobs as usize).min(profile.max_rotation_jobs),
        chunk_rows: args.chunk_rows as i64,
        stop_after_chunks: args.stop_after_chunks,
    }
}
