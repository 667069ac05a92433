//! `pii-vault rotate kek | data-keys | token-key`: the command-line face of
//! [`crate::rotation`]: progress on a terminal, a summary, the exit status.

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::{Cli, JobArgs, RotateCommand};
use crate::crypto::KeyWrapper;
use crate::rotation::{self, JobRequest, Skipped};

pub async fn rotate(cli: &Cli, cmd: &RotateCommand) -> anyhow::Result<()> {
    let store = super::open_admin_store(cli).await?;
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
        RotateCommand::DataKeys(job) => {
            let pb = bar(cli.progress(), "rows re-encrypted");
            let done = rotation::rotate_data_keys(store, wrapper, &request(job), &pb).await?;
            pb.finish_and_clear();
            eprintln!(
                "pii-vault: re-encrypted {} row(s) under {} new data key(s); destroyed {} old data key(s) (audit record {})",
                done.resealed,
                done.new_keys.len(),
                done.destroyed.len(),
                done.record_id
            );
            skipped_is_an_error(&done.skipped, "their old data keys were kept")
        }
        RotateCommand::TokenKey(job) => {
            let pb = bar(cli.progress(), "logins re-tokenised");
            let done = rotation::rotate_token_key(store, wrapper, &request(job), &pb).await?;
            pb.finish_and_clear();
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

fn request(job: &JobArgs) -> JobRequest {
    JobRequest {
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

fn bar(show: bool, what: &'static str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    ProgressBar::new(0).with_style(
        ProgressStyle::with_template(&format!(
            "[{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {what} ({{per_sec}}, ETA {{eta}})"
        ))
        .expect("valid template"),
    )
}
