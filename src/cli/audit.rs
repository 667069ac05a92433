//! `pii-vault audit …`: listing the trail, and what an auditor does with it.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

use super::parse::{non_blank, parse_duration, parse_since};
use super::OutputFormat;

#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  \
        pii-vault audit --since 2026-12-01\n  \
        pii-vault audit checkpoint --out /mnt/worm/pii-vault-checkpoints.jsonl\n  \
        pii-vault audit verify --checkpoints /mnt/worm/pii-vault-checkpoints.jsonl --public-key auditor.pem\n  \
        pii-vault audit export --after-id 0 --follow --format cef | logger -t pii-vault\n  \
        pii-vault audit subject --user-id 424cdd21-063a-43a7-b91b-7ca1a833afae --reason 'GDPR request #77'"
)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: Option<AuditCommand>,

    #[command(flatten)]
    pub list: AuditListArgs,
}

/// Listing the trail (no subcommand).
#[derive(Debug, Args)]
pub struct AuditListArgs {
    /// Most entries to show.
    #[arg(long, default_value_t = 100)]
    pub limit: i64,

    /// Only entries at or after this time (RFC 3339, or a UTC date YYYY-MM-DD).
    #[arg(long, value_name = "TIME", value_parser = parse_since)]
    pub since: Option<chrono::DateTime<chrono::Utc>>,

    /// Only entries written by this database login (the `actor` column).
    #[arg(long, value_name = "LOGIN")]
    pub actor: Option<String>,

    /// The honeytoken alarms instead of the trail (the schema owner and the
    /// auditor).
    #[arg(long)]
    pub alarms: bool,

    /// With --alarms on Postgres: keep running and report each new alarm as
    /// it is raised (LISTEN pii_vault_alarm), as an ERROR log line and an
    /// output line.
    #[arg(long, requires = "alarms")]
    pub follow: bool,

    /// Output: a table for people, or JSON Lines for programs.
    #[arg(long, value_enum, env = "PII_VAULT_FORMAT", default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Sign where both hash chains stand now (head row, its hash, row
    /// count, time, the previous checkpoint's signature) and write it as
    /// one JSON line: appended to --out, or printed for shipping (S3, a
    /// SIEM). A copy is kept in the database. Cheap: run it every minute.
    Checkpoint(CheckpointArgs),
    /// Recompute both hash chains and check every checkpoint: its
    /// signature, its place in the sequence, and that the database still
    /// holds what it covered. Exit 0 when intact, 4 when anything is wrong
    /// (each finding names the first bad row and what is wrong).
    Verify(VerifyArgs),
    /// Stream trail entries after an id, with their hashes, for a SIEM;
    /// says the last id it wrote (the next run's --after-id).
    Export(ExportArgs),
    /// A data subject's ledger: every reveal that handed out a row of the
    /// user (by any selector) and every erasure that touched the user.
    /// Recorded on the trail (action `subject-access`).
    Subject(SubjectArgs),
    /// Move entries older than a date out of the database (the schema
    /// owner only): written to a file with a signed checkpoint at its end,
    /// then deleted, so that the rows left still verify from a signed start.
    Archive(ArchiveArgs),
    /// Print the public key that checkpoints are verified with (PEM), to
    /// hand to auditors.
    PublicKey(PublicKeyArgs),
}

/// Which key signs checkpoints.
#[derive(Debug, Args)]
pub struct SigningArgs {
    /// An asymmetric AWS KMS key (ECC_NIST_P256, SIGN_VERIFY) that signs
    /// checkpoints. Without it, an Ed25519 key in --key-dir
    /// (audit-signing.key, created on first use).
    #[arg(long, env = "PII_VAULT_AUDIT_SIGNING_KEY_ID", value_name = "KMS_KEY")]
    pub signing_key_id: Option<String>,
}

#[derive(Debug, Args)]
pub struct CheckpointArgs {
    #[command(flatten)]
    pub signing: SigningArgs,

    /// Append the checkpoint line to this file (created if missing) instead
    /// of printing it.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,

    /// Keep running and make a checkpoint every DURATION (30s, 1m, 1h).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub every: Option<std::time::Duration>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub signing: SigningArgs,

    /// The checkpoints as shipped (a file of JSON lines). Without it, the
    /// copies in the database, which its owner could have cut back too.
    #[arg(long, value_name = "FILE")]
    pub checkpoints: Option<PathBuf>,

    /// The public key to trust (PEM or DER), kept apart from the database.
    /// Without it: the KMS signing key's, or keys/audit-signing.pub.
    #[arg(long, value_name = "FILE")]
    pub public_key: Option<PathBuf>,

    /// Verify an archive file written by `audit archive` instead of the
    /// database.
    #[arg(long, value_name = "FILE", conflicts_with = "checkpoints")]
    pub archive: Option<PathBuf>,

    /// Output: a report for people, or JSON for programs.
    #[arg(long, value_enum, env = "PII_VAULT_FORMAT", default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// One JSON object per entry.
    Jsonl,
    /// ArcSight Common Event Format, one line per entry.
    Cef,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Export entries with an id above this (0: from the start). Resume
    /// with the last id the previous run reported.
    #[arg(long, value_name = "ID", default_value_t = 0)]
    pub after_id: i64,

    /// Keep running and write new entries as they are recorded.
    #[arg(long)]
    pub follow: bool,

    /// With --follow: how often to look for new entries.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "1s")]
    pub poll: std::time::Duration,

    /// Output: JSON Lines, or CEF lines for a SIEM.
    #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
    pub format: ExportFormat,
}

#[derive(Debug, Args)]
pub struct SubjectArgs {
    /// The data subject.
    #[arg(long, value_name = "USER_ID")]
    pub user_id: String,

    /// Why you look (a ticket): kept in the audit trail.
    #[arg(long, value_parser = non_blank)]
    pub reason: String,

    /// Who is asking, kept as the claimed actor beside the database login
    /// [default: $USER].
    #[arg(long, env = "PII_VAULT_ACTOR")]
    pub actor: Option<String>,

    /// Output: a table for people, or JSON Lines for programs.
    #[arg(long, value_enum, env = "PII_VAULT_FORMAT", default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
}

#[derive(Debug, Args)]
pub struct ArchiveArgs {
    #[command(flatten)]
    pub signing: SigningArgs,

    /// Archive entries recorded before this time (RFC 3339, or a UTC date).
    #[arg(long, value_name = "TIME", value_parser = parse_since)]
    pub before: chrono::DateTime<chrono::Utc>,

    /// The archive file to write (must not exist).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,

    /// Also append the archive's checkpoint to this checkpoints file.
    #[arg(long, value_name = "FILE")]
    pub checkpoints: Option<PathBuf>,

    /// Why (a retention rule, a ticket): kept in the audit trail.
    #[arg(long, value_parser = non_blank)]
    pub reason: String,

    /// Who is asking, kept as the claimed actor beside the database login
    /// [default: $USER].
    #[arg(long, env = "PII_VAULT_ACTOR")]
    pub actor: Option<String>,

    /// Say what would be archived, change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct PublicKeyArgs {
    #[command(flatten)]
    pub signing: SigningArgs,

    /// Write it to this file instead of printing it.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}
