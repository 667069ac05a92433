//! The options of `rotate`: which key, why and by whom (the rotation's
//! audit record), and how a big table is worked through.

use clap::{Args, Subcommand};

use super::parse::non_blank;

/// Why a rotation runs and who runs it: its audit record, written (and
/// committed) before it reads anything.
#[derive(Debug, Args)]
pub struct JobArgs {
    /// Why (schedule, incident, ticket): kept in the audit trail.
    #[arg(long, value_parser = non_blank, default_value = "scheduled key rotation")]
    pub reason: String,

    /// Who is asking, kept in the audit trail as the claimed actor beside
    /// the database login [default: $USER].
    #[arg(long, env = "PII_VAULT_ACTOR")]
    pub actor: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum RotateCommand {
    /// Re-wrap every stored key under another AWS KMS key (ReEncrypt; plaintext
    /// keys never leave KMS). Keys of a local key file move into KMS. Resumable.
    Kek {
        /// The new KMS key (id, ARN or alias/NAME). It is added to the KMS
        /// allow-list first.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        job: JobArgs,
    },
    /// Re-encrypt the vault and quarantine under fresh data keys (a new one
    /// every 2^20 rows), then destroy the old data keys. Resumable; a row
    /// that cannot be opened is reported and skipped (exit status 1).
    DataKeys(ScaleArgs),
    /// Make a new token-key version current and re-tokenise user_logins from
    /// the vault; running workers switch by themselves. Resumable: a rerun
    /// of a killed rotation keeps its version and continues where it stopped.
    TokenKey(ScaleArgs),
}

/// How a data-key or token-key rotation works through a big table.
#[derive(Debug, Args)]
pub struct ScaleArgs {
    #[command(flatten)]
    pub job: JobArgs,

    /// Key ranges worked at once, each on its own database connection
    /// (Postgres; SQLite always uses one). The ranges are fixed when a job
    /// starts; a resumed job keeps them.
    #[arg(long, env = "PII_VAULT_ROTATE_JOBS", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=6))]
    pub jobs: u16,

    /// Rows read, re-sealed and written back per statement.
    #[arg(long, env = "PII_VAULT_ROTATE_CHUNK_ROWS", default_value_t = 5000,
          value_parser = clap::value_parser!(u32).range(1..=50_000))]
    pub chunk_rows: u32,

    /// For tests of resumption: fail, as if killed, after this many chunks.
    #[arg(long, hide = true, env = "PII_VAULT_TEST_STOP_AFTER_CHUNKS")]
    pub stop_after_chunks: Option<u64>,
}
