//! `pii-vault forget`: erase a user's recoverable originals.
//!
//! Deletes the user's vault rows and quarantined bodies, with the audit row
//! in the same transaction. Their masked rows stay for analytics (tokens
//! alone reveal nothing). What this does not reach (backups, the WAL, the
//! data key that sealed the rows) and how to reach it is in SECURITY.md.

use crate::cli::{Cli, ForgetArgs};
use crate::rotation::{self, JobRequest};

pub async fn forget(cli: &Cli, args: &ForgetArgs) -> anyhow::Result<()> {
    let store = super::open_admin_store(cli).await?;
    let job = JobRequest {
        claimed_actor: super::claimed_actor(args.actor.as_deref()),
        reason: args.reason.clone(),
    };
    let f = rotation::forget(&*store, &args.user_id, &job).await?;
    eprintln!(
        "pii-vault: erased {} vault row(s) and {} quarantined body(ies) of user {}; {} masked login(s) kept for analytics. \
         Copies in backups stay readable until `pii-vault rotate data-keys` has destroyed the data keys that sealed them (see SECURITY.md).",
        f.vault_rows, f.quarantined, args.user_id, f.logins_kept
    );
    Ok(())
}
