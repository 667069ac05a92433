//! `pii-vault honeytoken plant --count N [--over DURATION]`.

use crate::cli::{Cli, HoneytokenCommand, OutputFormat};

pub async fn honeytoken(cli: &Cli, cmd: &HoneytokenCommand) -> anyhow::Result<()> {
    let HoneytokenCommand::Plant {
        count,
        over,
        format,
    } = cmd;
    let store = super::open_store(cli).await?;
    let planted = crate::honeytoken::plant(store, usize::from(*count), *over).await?;
    if *format == OutputFormat::Json {
        println!(
            "{}",
            serde_json::json!({
                "planted_users": planted.users.len(),
                "logins": planted.logins,
                "over_seconds": over.as_secs(),
            })
        );
    }
    // The ids are not printed: they are as secret as the trap itself, and
    // the owner can read them in `honeytokens`.
    eprintln!(
        "pii-vault: planted {} honeytoken user(s) with {} login(s), falling due over the next {}; \
         running workers write each among real events. A reveal that touches one raises an alarm \
         (`pii-vault audit --alarms`)",
        planted.users.len(),
        planted.logins,
        crate::output::age(chrono::Duration::from_std(*over).unwrap_or_default())
    );
    Ok(())
}
