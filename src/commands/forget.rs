//! `pii-vault forget`: erase a user's recoverable originals, or all older
//! than a retention date.
//!
//! Both delete ciphertext in bulk, never decrypt it, and leave the masked
//! `user_logins` rows for analytics (tokens alone reveal nothing). Each is
//! one call of the store's [`Erasure`](crate::store::Erasure), which deletes
//! and writes the audit row, with its count, in one transaction (on
//! Postgres a `SECURITY DEFINER` function: the rotator has no `DELETE` of
//! its own). Retention also destroys the data keys that no longer seal
//! anything, which is what makes copies of those rows in older backups
//! unreadable once the KMS key that wrapped them is rotated away
//! (SECURITY.md has the procedure).

use crate::cli::{Cli, ForgetArgs};
use crate::store::Requester;

pub async fn forget(cli: &Cli, args: &ForgetArgs) -> anyhow::Result<()> {
    let store = super::open_store(cli).await?;
    let who = || Requester {
        claimed_actor: super::claimed_actor(args.actor.as_deref()),
        reason: args.reason.clone().unwrap_or_default(),
    };
    match (&args.user_id, args.before) {
        (Some(user_id), _) => {
            let f = store.forget(user_id, &who()).await?;
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
            let (vault_rows, quarantined) = store.count_older_than(before).await?;
            eprintln!(
                "pii-vault: dry run: `forget --before {before}` would erase {vault_rows} vault row(s) and \
                 {quarantined} quarantined body(ies) now; nothing was erased"
            );
        }
        (None, Some(before)) => {
            let tomorrow = chrono::Utc::now().date_naive() + chrono::Days::new(1);
            anyhow::ensure!(
                before <= tomorrow,
                "--before {before} is in the future: retention erases what is older than a day that has begun"
            );
            let started = std::time::Instant::now();
            let e = store.retention(before, &who()).await?;
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "pii-vault: erased {} vault row(s) and {} quarantined body(ies) from before {before} in {secs:.1}s; \
                 masked logins kept for analytics; {} retired data key(s) destroyed.",
                e.vault_rows,
                e.quarantined,
                e.keys_destroyed.len()
            );
            if !e.partitions_dropped.is_empty() {
                eprintln!(
                    "pii-vault: {} monthly vault partition(s) dropped whole: {}",
                    e.partitions_dropped.len(),
                    e.partitions_dropped.join(", ")
                );
            }
            if e.drops_left > 0 {
                eprintln!(
                    "pii-vault: {} detached month(s) are still to be dropped: another session holds them \
                     (a retention running beside this one, or a transaction left open); readable by no role, \
                     the next `forget --before` drops them",
                    e.drops_left
                );
            }
            if e.earlier_drops_finished > 0 {
                eprintln!(
                    "pii-vault: also dropped {} month(s) that an earlier retention detached and was stopped before dropping",
                    e.earlier_drops_finished
                );
            }
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
