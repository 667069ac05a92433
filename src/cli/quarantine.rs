//! `pii-vault quarantine …`: the rejected messages, after the fact.

use clap::{Args, Subcommand};

use super::parse::{non_blank, parse_since};
use super::OutputFormat;

#[derive(Debug, Subcommand)]
#[command(after_help = "Examples:\n  \
    pii-vault quarantine list --since 2026-12-01 --reason invalid_ip\n  \
    pii-vault quarantine show line-3f2a… --reason 'INC-4711: why was this line rejected'\n  \
    pii-vault quarantine replay --all")]
pub enum QuarantineCommand {
    /// The quarantined messages, oldest first: id (the SQS message id, or a
    /// file line's keyed id), when, the input's name and line number for a
    /// file, and the reason. Never a body. Worker, revealer and rotator
    /// logins may run it.
    List(QuarantineListArgs),
    /// One quarantined body, as received: an audited reveal (revealer
    /// role). The audit row is committed before anything is read, and
    /// counts against the reveal policy's daily limit.
    Show(QuarantineShowArgs),
    /// Parse quarantined bodies again with this version's parser and store
    /// those that now pass, each once, under its original message id (a
    /// second replay stores nothing twice); the others stay quarantined.
    /// Rotator role (it opens sealed bodies); recorded in the audit trail.
    Replay(QuarantineReplayArgs),
}

#[derive(Debug, Args)]
pub struct QuarantineListArgs {
    /// Only messages received at or after this time (RFC 3339, or a UTC
    /// date YYYY-MM-DD).
    #[arg(long, value_name = "TIME", value_parser = parse_since)]
    pub since: Option<chrono::DateTime<chrono::Utc>>,

    /// Only messages rejected for this reason code (e.g. invalid_ip).
    #[arg(long, value_name = "CODE")]
    pub reason: Option<String>,

    /// Output: a table for people, or JSON Lines for programs.
    #[arg(long, value_enum, env = "PII_VAULT_FORMAT", default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
}

#[derive(Debug, Args)]
pub struct QuarantineShowArgs {
    /// The quarantined message's id, as `quarantine list` shows it.
    #[arg(value_name = "ID")]
    pub id: String,

    /// Why you need to see the body: kept in the audit trail.
    #[arg(long, value_parser = non_blank)]
    pub reason: String,

    /// Who is asking, kept as the claimed actor beside the database login
    /// [default: $USER].
    #[arg(long, env = "PII_VAULT_ACTOR")]
    pub actor: Option<String>,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["ids", "all"])))]
pub struct QuarantineReplayArgs {
    /// The quarantined messages to replay.
    #[arg(value_name = "ID")]
    pub ids: Vec<String>,

    /// Every quarantined message.
    #[arg(long, conflicts_with = "ids")]
    pub all: bool,

    /// Why: kept in the audit trail.
    #[arg(long, value_parser = non_blank, default_value = "quarantine replay after a parser fix")]
    pub reason: String,

    /// Who is replaying, kept as the claimed actor beside the database
    /// login [default: $USER].
    #[arg(long, env = "PII_VAULT_ACTOR")]
    pub actor: Option<String>,
}
