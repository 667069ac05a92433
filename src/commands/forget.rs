//! `pii-vault forget`: erase a user's recoverable originals.
//!
//! Deletes the user's vault rows and quarantined bodies, with the audit row
//! in the same transaction. Their masked rows stay for analytics (tokens
//! alone reveal nothing). Copies of the deleted ciphertexts in backups stay
//! readable only while the data keys that sealed them exist: the next
//! `rotate data-keys` destroys those keys, which makes the backups' copies
//! unreadable too (crypto-shredding).

use crate::cli::{Cli, ForgetArgs};
use crate::store::AuditEntry;

pub async fn forget(cli: &Cli, args: &ForgetArgs) -> anyhow::Result<()> {
    let store = super::open_admin_store(cli).await?;
    let audit = AuditEntry {
        actor: super::reveal::actor(args.actor.as_deref()),
        action: "forget".into(),
        target: format!("user_id={}", args.user_id),
        reason: args.reason.clone(),
    };
    let f = store.forget(&args.user_id, &audit).await?;
    eprintln!(
        "pii-vault: erased {} vault row(s) and {} quarantined body(ies) of user {}; {} masked login(s) kept for analytics. \
         Run `pii-vault rotate data-keys` to make copies in backups unreadable too.",
        f.vault_rows, f.quarantined, args.user_id, f.logins_kept
    );
    Ok(())
}
