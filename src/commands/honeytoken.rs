//! `pii-vault honeytoken plant --count N`.

use crate::cli::{Cli, HoneytokenCommand};

pub async fn honeytoken(cli: &Cli, cmd: &HoneytokenCommand) -> anyhow::Result<()> {
    let HoneytokenCommand::Plant { count } = cmd;
    let store = super::open_admin_store(cli).await?;
    let wrapper = super::open_wrapper(cli).await?;
    let planted = crate::honeytoken::plant(store, wrapper, usize::from(*count)).await?;
    // The ids are not printed: they are as secret as the trap itself, and
    // the owner can read them in `honeytokens`.
    eprintln!(
        "pii-vault: planted {} honeytoken user(s) with {} login(s); a reveal that touches one raises an alarm \
         (`pii-vault audit --alarms`, NOTIFY pii_vault_alarm on Postgres)",
        planted.users.len(),
        planted.logins
    );
    Ok(())
}
