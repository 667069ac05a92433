//! `pii-vault forget`: erase a user's recoverable originals, or all older
//! than a retention date. The logic is in [`crate::erasure`].

use crate::cli::{Cli, ForgetArgs};
use crate::erasure;
use crate::rotation::JobRequest;

pub async fn forget(cli: &Cli, args: &ForgetArgs) -> anyhow::Result<()> {
    let store = super::open_admin_store(cli).await?;
    let job = || JobRequest {
        claimed_actor: super::claimed_actor(args.actor.as_deref()),
        reason: args.reason.clone().unwrap_or_default(),
    };
    match (&args.user_id, args.before) {
        (Some(user_id), _) => {
            let f = erasure::forget(&*store, user_id, &job()).await?;
            eprintln!(
                "pii-vault: erased {} vault row(s) and {} quarantined body(ies) of user {}; {} masked login(s) kept for analytics. \
                 Copies in backups stay readable until `pii-vault rotate data-keys` has destroyed the data keys that sealed them (see SECURITY.md).",
                f.vault_rows,
                f.quarantined,
                crate::output::safe(user_id),
                f.logins_kept
            );
        }
        (None, Some(before)) if args.dry_run => {
            let (vault_rows, quarantined) = erasure::preview(&*store, before).await?;
            eprintln!(
                "pii-vault: dry run: `forget --before {before}` would erase {vault_rows} vault row(s) and \
                 {quarantined} quarantined body(ies) now; nothing was erased"
            );
        }
        (None, Some(before)) => {
            let started = std::time::Instant::now();
            let done = erasure::retention(&*store, before, &job()).await?;
            let e = &done.erased;
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "pii-vault: erased {} vault row(s) and {} quarantined body(ies) from before {before} in {secs:.1}s; \
                 masked logins kept for analytics; {} retired data key(s) destroyed.",
                e.vault_rows,
                e.quarantined,
                done.destroyed_keys.len()
            );
            if e.undated_kept > 0 {
                eprintln!(
                    "pii-vault: {} vault row(s) have no date (legacy rows without a login) and are never erased by date; \
                     `forget --user-id` reaches them",
                    e.undated_kept
                );
            }
        }
        (None, None) => unreachable!("clap requires --user-id or --before"),
    }
    Ok(())
}
