//! The command line. The settings a deployment makes once (database, KMS
//! key, queue, concurrency, metrics address, …) can also come from the
//! environment, so the same binary runs under a shell, systemd, Kubernetes
//! or a CI job; per-call flags (`--reason`, `--user-id`) cannot.

use std::net::SocketAddr;
use std::path::PathBuf;

mod audit;
mod ops;
mod parse;
mod policy;
mod quarantine;
mod rotate;
mod tokenize;

pub use audit::{
    ArchiveArgs, AuditArgs, AuditCommand, AuditListArgs, CheckpointArgs, ExportArgs, ExportFormat,
    PublicKeyArgs, SigningArgs, SubjectArgs, VerifyArgs,
};
pub use quarantine::{
    QuarantineCommand, QuarantineListArgs, QuarantineReplayArgs, QuarantineShowArgs,
};

pub use ops::{HealthcheckArgs, MigrateArgs};
pub use policy::PolicyCommand;
pub use rotate::{JobArgs, RotateCommand, ScaleArgs};
pub use tokenize::TokenizeArgs;

use clap::{Args, Parser, Subcommand, ValueEnum};
pub use parse::redact_usage_error;
use parse::{non_blank, parse_day, parse_duration};

/// Used when neither `--database-url` nor `DATABASE_URL` is given.
pub const DEFAULT_DATABASE_URL: &str = "sqlite:pii-vault.db";

#[derive(Debug, Parser)]
#[command(
    name = "pii-vault",
    version = crate::metrics::build::LONG_VERSION,
    about = "Mask the PII in login events with keyed tokens; keep the originals in an encrypted vault.",
    long_about = "pii-vault reads user-login events (from AWS SQS or a JSON Lines file), replaces the IP \
address and device id with deterministic keyed tokens in `user_logins` (equal values give equal tokens, \
so analysts can count and join), and keeps the originals as AES-256-GCM ciphertext under data keys \
wrapped by AWS KMS or a local key file. `reveal` recovers originals, with a reason on the audit trail.\n\n\
With no options at all it uses an SQLite file (pii-vault.db) and a local key file (keys/local-kek.key) \
in the working directory: fine to try it out and for small single-node use."
)]
pub struct Cli {
    /// Database: postgres://user:pass@host/db, or sqlite:PATH [default: sqlite:pii-vault.db]
    #[arg(
        long,
        env = "DATABASE_URL",
        global = true,
        help_heading = "Global options",
        hide_env_values = true
    )]
    pub database_url: Option<String>,

    /// Read the database URL from this file (a mounted secret), so that the
    /// password need not sit in the environment; surrounding whitespace and
    /// the final newline are ignored. Not together with --database-url /
    /// DATABASE_URL. (Or leave the password out of the URL: Postgres
    /// passwords are also read from PGPASSFILE, default ~/.pgpass.)
    #[arg(
        long,
        env = "DATABASE_URL_FILE",
        global = true,
        help_heading = "Global options",
        value_name = "PATH"
    )]
    pub database_url_file: Option<PathBuf>,

    /// AWS KMS key (id, ARN or alias/NAME) that wraps data and token keys.
    /// Without it, a local key file in --key-dir is used (with a warning).
    #[arg(
        long,
        env = "PII_VAULT_KMS_KEY_ID",
        global = true,
        help_heading = "Global options"
    )]
    pub kms_key_id: Option<String>,

    /// Directory of the local key-encryption key (used when no KMS key is given).
    #[arg(
        long,
        env = "PII_VAULT_KEY_DIR",
        global = true,
        help_heading = "Global options",
        default_value = "keys"
    )]
    pub key_dir: PathBuf,

    /// Log format on stderr.
    #[arg(long, env = "PII_VAULT_LOG_FORMAT", global = true, help_heading = "Global options", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The command line of this process, as `Cli::try_parse` reads it, with
    /// one rule clap cannot say: a flag typed wins over the environment.
    /// `run --from-file F` reads the file even when `PII_VAULT_QUEUE_URL`
    /// is set (a worker's environment); typing both inputs is refused; and
    /// `PII_VAULT_SOURCE_ID` in a queue worker's environment is ignored.
    pub fn try_parse_args() -> Result<Cli, clap::Error> {
        use clap::parser::ValueSource;
        use clap::{CommandFactory, FromArgMatches};
        let mut cmd = Cli::command();
        let matches = cmd.try_get_matches_from_mut(std::env::args_os())?;
        if let Some(("run", run)) = matches.subcommand() {
            let typed = |id: &str| run.value_source(id) == Some(ValueSource::CommandLine);
            if typed("queue_url") && typed("from_file") {
                return Err(cmd.error(
                    clap::error::ErrorKind::ArgumentConflict,
                    "--queue-url and --from-file cannot be used together: give one input",
                ));
            }
            // Typed, it must go with a file; from the environment (a file
            // loader's settings) it does not stop a queue worker.
            if typed("source_id") && !run.contains_id("from_file") {
                return Err(cmd.error(
                    clap::error::ErrorKind::MissingRequiredArgument,
                    "--source-id names the source of a file: it goes with --from-file",
                ));
            }
        }
        Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))
    }

    pub fn database_url(&self) -> &str {
        self.database_url.as_deref().unwrap_or(DEFAULT_DATABASE_URL)
    }

    /// Whether long jobs may draw a progress bar: text logs on a terminal.
    pub fn progress(&self) -> bool {
        use std::io::IsTerminal;
        self.log_format == LogFormat::Text && std::io::stderr().is_terminal()
    }
}

/// Whether this process's command line or environment asks for JSON logs,
/// read without the parser (for a command line that does not parse).
pub fn json_logs_requested() -> bool {
    let args: Vec<String> = std::env::args().collect();
    let typed = args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix("--log-format=")
            .map(str::to_string)
            .or_else(|| (a == "--log-format").then(|| args.get(i + 1).cloned().unwrap_or_default()))
    });
    typed
        .or_else(|| std::env::var("PII_VAULT_LOG_FORMAT").ok())
        .is_some_and(|f| f.eq_ignore_ascii_case("json"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or upgrade the database schema (also converts a legacy
    /// `user_logins.app_version integer` column to text, keeping its rows),
    /// put the configured key-encryption key on the KMS allow-list and
    /// create the token and line-id keys if there are none. Run it as the
    /// schema owner.
    Migrate(MigrateArgs),
    /// Consume login events: mask, vault, store; quarantine bad ones.
    Run(RunArgs),
    /// Show the original IP and device id of logins, recording who asked and why.
    Reveal(RevealArgs),
    // About and long about: on TokenizeArgs.
    Tokenize(TokenizeArgs),
    /// Erase recoverable originals (vault rows and quarantined bodies): one
    /// user's, or all older than a retention date.
    Forget(ForgetArgs),
    /// Rotate keys; safe while workers run.
    #[command(subcommand)]
    Rotate(RotateCommand),
    /// Inspect keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The audit trail: show it (newest first; `--alarms`, the owner, the
    /// honeytoken alarms), verify its hash chains against signed
    /// checkpoints, sign a checkpoint, export it to a SIEM, a data
    /// subject's ledger, archive old entries.
    Audit(AuditArgs),
    /// Approve another login's pending reveal request (the two-person rule).
    Approve(ApproveArgs),
    /// The reveal policy: users per reveal, reveals and searches per login per 24 h.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Honeytokens: synthetic users whose reveal or search raises an alarm.
    #[command(subcommand)]
    Honeytoken(HoneytokenCommand),
    /// Ask a running worker's /readyz (for container healthchecks: the
    /// image has no curl). Exit status 0: ready; 1: not ready; 2: nothing
    /// answered (no worker, wrong address, timeout).
    Healthcheck(HealthcheckArgs),
    /// Print a shell completion script on stdout (bash, zsh, fish,
    /// elvish, powershell).
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout, or, with --dir, write one page
    /// per command into that directory.
    Man {
        /// Write pii-vault.1, pii-vault-run.1, … here instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Rejected messages: list them (never a body), show one (an audited
    /// reveal), replay them after a fix (stored once each).
    #[command(subcommand)]
    Quarantine(QuarantineCommand),
}

#[derive(Debug, Args)]
pub struct ApproveArgs {
    /// The request id that `reveal` printed.
    #[arg(value_name = "REQUEST_ID")]
    pub request_id: i64,

    /// Why you approve it: kept in the audit trail.
    #[arg(long, value_parser = non_blank)]
    pub reason: String,

    /// Who is approving, kept as the claimed actor beside the database login
    /// [default: $USER].
    #[arg(long, env = "PII_VAULT_ACTOR")]
    pub actor: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum HoneytokenCommand {
    /// Plant N synthetic users among the real ones (the schema owner only).
    /// Their user ids and login counts are shaped like a sample of the real
    /// users; their logins are written by running workers, each in one of
    /// their batches among real events, as they fall due over --over. A
    /// reveal that touches one is served as usual and raises an alarm that
    /// only the owner sees (`audit --alarms`).
    Plant {
        /// How many synthetic users to plant.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=10000))]
        count: u16,
        /// The period over which their logins fall due (`0` for the next
        /// batch, `90m`, `12h`, `7d`).
        #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = parse_duration)]
        over: std::time::Duration,
        /// Output: a table for people, or JSON for programs.
        #[arg(long, value_enum, env = "PII_VAULT_FORMAT", default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("input").required(true).multiple(true).args(["queue_url", "from_file"])))]
pub struct RunArgs {
    /// SQS queue URL to consume.
    #[arg(long, env = "PII_VAULT_QUEUE_URL")]
    pub queue_url: Option<String>,

    /// JSON Lines file to read instead of a queue (`-` for stdin).
    #[arg(long, value_name = "PATH")]
    pub from_file: Option<PathBuf>,

    /// With --from-file: the name of this input, part of every line's
    /// message id, so that re-running the same input stores nothing new
    /// while another input with identical lines is stored in full
    /// [default: the file's name; required for stdin]. An empty value gives
    /// the ids of earlier versions, which had no source id (to re-run a file
    /// that one of them loaded).
    #[arg(long, value_name = "ID", env = "PII_VAULT_SOURCE_ID")]
    pub source_id: Option<String>,

    /// Exit 0 once the queue is empty instead of waiting for more (batch jobs, tests).
    #[arg(long)]
    pub until_empty: bool,

    /// Receive loops running at once (SQS).
    #[arg(long, env = "PII_VAULT_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: u16,

    /// Most messages written in one database transaction [default: 2000
    /// from a file into Postgres and 5000 into SQLite, where larger
    /// transactions load faster; 500 from SQS, where a batch also waits at
    /// most 200 ms to fill].
    #[arg(long, env = "PII_VAULT_BATCH_SIZE", value_parser = clap::value_parser!(u16).range(1..=5000))]
    pub batch_size: Option<u16>,

    /// Batches written to the database at once, each on its own connection
    /// [default: on Postgres 4 from a file, 2 from SQS; 1 on SQLite].
    #[arg(long, env = "PII_VAULT_WRITERS", value_parser = clap::value_parser!(u16).range(1..=32))]
    pub writers: Option<u16>,

    /// Serve Prometheus metrics, /healthz and /readyz on this address (e.g. 127.0.0.1:9187).
    #[arg(long, env = "PII_VAULT_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Seconds a received SQS message stays invisible to other consumers
    /// (asked for on every receive). If this worker dies holding a message,
    /// SQS hands it out again after this long, so shorter means faster
    /// recovery; it must stay well above the time a batch takes to commit,
    /// or messages still being written are delivered twice (harmless, but
    /// counted as duplicates). Ignored for --from-file.
    #[arg(long, env = "PII_VAULT_VISIBILITY_TIMEOUT", value_name = "SECS", default_value_t = 120,
          value_parser = clap::value_parser!(u32).range(1..=43200))]
    pub visibility_timeout: u32,

    /// Never draw a progress bar (a file run then logs a progress line
    /// every 10 seconds, as it does when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,

    /// With --from-file: parse and validate every line and print what
    /// would be stored and rejected; store nothing, open no database and
    /// use no key.
    #[arg(long, requires = "from_file")]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("selector").required(true).args(["user_id", "masked_ip", "masked_device_id", "request"])))]
pub struct RevealArgs {
    /// Reveal every login of this user.
    #[arg(long)]
    pub user_id: Option<String>,

    /// Reveal every login with this `masked_ip` token.
    #[arg(long, value_name = "TOKEN")]
    pub masked_ip: Option<String>,

    /// Reveal every login with this `masked_device_id` token.
    #[arg(long, value_name = "TOKEN")]
    pub masked_device_id: Option<String>,

    /// Fetch a request that was over the reveal policy once another login
    /// has approved it (once, within 24 hours of the request).
    #[arg(long, value_name = "REQUEST_ID")]
    pub request: Option<i64>,

    /// Why you need the originals (ticket, incident, request): kept in the
    /// audit trail. Not needed with --request (the request has one).
    #[arg(long, value_parser = non_blank, required_unless_present = "request")]
    pub reason: Option<String>,

    /// Who is asking, kept in the audit trail as the claimed actor beside
    /// the database login that the database records itself [default: $USER].
    #[arg(long, env = "PII_VAULT_ACTOR")]
    pub actor: Option<String>,

    /// Output: a table for people, or JSON Lines for programs.
    #[arg(long, value_enum, env = "PII_VAULT_FORMAT", default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// For people (`text` is the same; PII_VAULT_FORMAT sets the default
    /// for every command that prints results).
    #[value(alias = "text")]
    Table,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Args)]
#[command(
    group(clap::ArgGroup::new("what").required(true).args(["user_id", "before"])),
    after_help = "Examples:\n  \
        pii-vault forget --user-id 424cdd21-063a-43a7-b91b-7ca1a833afae --reason 'erasure request #123'\n  \
        pii-vault forget --before 2025-12-01 --reason 'retention: 12 months' --dry-run\n\n\
        The masked user_logins rows stay. Honeytokens are never erased by --before. Copies in \
        backups stay readable until the data keys that sealed them are destroyed and the KMS key \
        that wrapped those is rotated away: see SECURITY.md."
)]
pub struct ForgetArgs {
    /// The user whose originals are erased.
    #[arg(long)]
    pub user_id: Option<String>,

    /// Retention: erase the originals of every login before this day (UTC,
    /// YYYY-MM-DD) and every body quarantined before it, in bulk; then
    /// destroy the retired data keys left with nothing to open. On Postgres
    /// the months wholly before the day are dropped whole (detached in the
    /// erasure's transaction, dropped right after on four connections),
    /// and only the month the day falls in is deleted from row by row: the
    /// first day of a month erases by dropping alone, the fastest. Months a
    /// stopped run left detached are dropped by the next run.
    #[arg(long, value_name = "DATE", value_parser = parse_day)]
    pub before: Option<chrono::NaiveDate>,

    /// With --before: count what would be erased, erase nothing.
    #[arg(long, requires = "before")]
    pub dry_run: bool,

    /// Why (erasure request, ticket, retention policy): kept in the audit trail.
    #[arg(long, value_parser = non_blank, required_unless_present = "dry_run")]
    pub reason: Option<String>,

    /// Who is asking, kept in the audit trail as the claimed actor beside
    /// the database login [default: $USER].
    #[arg(long, env = "PII_VAULT_ACTOR")]
    pub actor: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Keys with purpose, state, wrapping key, creation time and usage.
    List(FormatArgs),
    /// Put the configured key-encryption key on the KMS allow-list and create
    /// the token and line-id keys if missing (owner or rotator; `migrate`
    /// does this too).
    Init,
    /// The KMS allow-list: the key-encryption keys stored keys may be wrapped under.
    Allowed(FormatArgs),
}

#[derive(Debug, Args)]
pub struct FormatArgs {
    /// Output: a table for people, or JSON Lines for programs.
    #[arg(long, value_enum, env = "PII_VAULT_FORMAT", default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn visibility_timeout_defaults_to_120_and_stays_in_the_sqs_range() {
        let vt = |extra: &[&str]| {
            let args = ["pii-vault", "run", "--queue-url", "q"];
            Cli::try_parse_from(args.iter().chain(extra)).map(|c| match c.command {
                Command::Run(r) => r.visibility_timeout,
                _ => unreachable!(),
            })
        };
        if std::env::var_os("PII_VAULT_VISIBILITY_TIMEOUT").is_none() {
            assert_eq!(vt(&[]).unwrap(), 120);
        }
        assert_eq!(vt(&["--visibility-timeout", "5"]).unwrap(), 5);
        assert_eq!(vt(&["--visibility-timeout", "43200"]).unwrap(), 43200);
        assert!(vt(&["--visibility-timeout", "0"]).is_err());
        assert!(vt(&["--visibility-timeout", "43201"]).is_err());
    }

    #[test]
    fn reveal_needs_a_reason_and_one_selector() {
        assert!(Cli::try_parse_from(["pii-vault", "reveal", "--user-id", "u"]).is_err());
        assert!(Cli::try_parse_from(["pii-vault", "reveal", "--reason", "x"]).is_err());
        assert!(
            Cli::try_parse_from(["pii-vault", "reveal", "--user-id", "u", "--reason", "  "])
                .is_err()
        );
        assert!(Cli::try_parse_from([
            "pii-vault",
            "reveal",
            "--user-id",
            "u",
            "--masked-ip",
            "t",
            "--reason",
            "x"
        ])
        .is_err());
        assert!(Cli::try_parse_from([
            "pii-vault",
            "reveal",
            "--user-id",
            "u",
            "--reason",
            "ticket 1"
        ])
        .is_ok());
    }
}
