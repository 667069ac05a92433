//! One module per subcommand; this file holds what they share: opening the
//! store and the key wrapper with clear, actionable start-up errors.

pub mod approve;
pub mod audit;
pub mod docs;
pub mod forget;
pub mod healthcheck;
pub mod honeytoken;
pub mod keys;
pub mod migrate;
pub mod policy;
pub mod quarantine;
pub mod reveal;
pub mod rotate;
pub mod run;
pub mod tokenize;

use std::sync::Arc;

use anyhow::Context as _;

use crate::cli::{Cli, Command, KeysCommand, RunArgs};
use crate::crypto::KeyWrapper;
use crate::store::Store;

pub async fn dispatch(mut cli: Cli) -> anyhow::Result<()> {
    cli.read_database_url_file()?;
    match &cli.command {
        Command::Migrate(args) => migrate::migrate(&cli, args).await,
        Command::Run(args) => {
            check_input_file(args)?;
            run::run(&cli, args).await
        }
        Command::Reveal(args) => reveal::reveal(&cli, args).await,
        Command::Tokenize(args) => tokenize::tokenize(&cli, args).await,
        Command::Forget(args) => forget::forget(&cli, args).await,
        Command::Rotate(cmd) => rotate::rotate(&cli, cmd).await,
        Command::Keys(cmd) => keys::keys(&cli, cmd).await,
        Command::Audit(args) => audit::audit(&cli, args).await,
        Command::Approve(args) => approve::approve(&cli, args).await,
        Command::Policy(cmd) => policy::policy(&cli, cmd).await,
        Command::Honeytoken(cmd) => honeytoken::honeytoken(&cli, cmd).await,
        Command::Healthcheck(args) => healthcheck::healthcheck(args).await,
        Command::Completions { shell } => docs::completions(*shell),
        Command::Man { dir } => docs::man(dir.as_deref()),
        Command::Quarantine(cmd) => quarantine::quarantine(&cli, cmd).await,
    }
}

/// Whether this command sets a store up: `run`, `migrate` and `keys init`
/// create the SQLite file and the local key file when they are missing.
/// Every other command reads or acts on a store that exists, so that one
/// run in the wrong directory (or with a mistyped path) says so instead of
/// leaving an empty database and a new key behind.
fn creates_state(cli: &Cli) -> bool {
    matches!(
        cli.command,
        Command::Run(_) | Command::Migrate(_) | Command::Keys(KeysCommand::Init)
    )
}

/// `run --from-file PATH`: the file is opened before anything else, so that
/// a mistyped path fails with nothing created.
fn check_input_file(args: &RunArgs) -> anyhow::Result<()> {
    let Some(path) = args.from_file.as_deref() else {
        return Ok(());
    };
    if path == std::path::Path::new("-") {
        return Ok(());
    }
    let readable = std::fs::File::open(path).and_then(|f| {
        if f.metadata()?.is_dir() {
            Err(std::io::Error::other("it is a directory"))
        } else {
            Ok(())
        }
    });
    readable.map_err(|e| {
        anyhow::anyhow!(
            "cannot open {} (the input file): {e}; nothing was created or stored \
             (check --from-file; `-` reads stdin)",
            path.display()
        )
    })
}

/// Opens the database. A self-managed store (the embedded SQLite default)
/// migrates itself, so the first command on a fresh machine just works; a
/// server store is migrated by `pii-vault migrate` (run by an owner role),
/// so workers need no DDL rights. What a login may do is the database's to
/// decide, not this function's.
///
/// Only the commands that set a store up ([`creates_state`]) create a
/// missing SQLite file; the others fail, naming the file they looked for.
pub async fn open_store(cli: &Cli) -> anyhow::Result<Arc<dyn Store>> {
    let url = cli.database_url();
    let connected = if creates_state(cli) {
        crate::store::connect(url).await
    } else {
        crate::store::connect_existing(url).await
    };
    let store = match connected {
        Ok(store) => store,
        Err(e) => {
            if let Some(crate::store::StoreError::Missing(file)) =
                e.downcast_ref::<crate::store::StoreError>()
            {
                let dir = std::env::current_dir()
                    .map(|d| format!(" (looked in {})", d.display()))
                    .unwrap_or_default();
                anyhow::bail!(
                    "no database at {}: the file {file} does not exist{dir}. Run from the directory \
                     that holds it, or pass --database-url / DATABASE_URL; `pii-vault run` or \
                     `pii-vault migrate` creates one. Nothing was created or recorded.",
                    redact_url(url)
                );
            }
            return Err(e.context(format!(
                "cannot open the database {} (check --database-url / DATABASE_URL)",
                redact_url(url)
            )));
        }
    };
    store
        .ping()
        .await
        .with_context(|| format!("the database {} does not answer", redact_url(url)))?;
    if store.profile().self_managed {
        store
            .migrate()
            .await
            .context("cannot apply the SQLite migrations")?;
    }
    Ok(store)
}

/// An outcome that is not a failure of the command but must not look like
/// success to a script: `main` prints the message and exits with `code`
/// (3: a reveal over the policy, waiting for approval).
#[derive(Debug)]
pub struct Exit {
    pub code: u8,
    pub message: String,
}

impl Exit {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Exit {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

/// Who the client says is asking, for the audit trail's `claimed_actor`:
/// `--actor`, else `$USER`. The database records its own login beside it.
pub fn claimed_actor(explicit: Option<&str>) -> String {
    explicit
        .map(str::to_string)
        .or_else(|| std::env::var("USER").ok())
        .or_else(|| std::env::var("USERNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

pub async fn open_wrapper(cli: &Cli) -> anyhow::Result<Arc<dyn KeyWrapper>> {
    let wrapper =
        crate::kms::from_config(cli.kms_key_id.as_deref(), &cli.key_dir, creates_state(cli))
            .await?;
    wrapper
        .check()
        .await
        .with_context(|| format!("the key-encryption key {} cannot be used", wrapper.kek_id()))?;
    Ok(wrapper)
}

/// Query parameters of a database URL that hold a secret: libpq's
/// `password` (which sqlx reads too) and `sslpassword` (the client key's
/// passphrase).
const SECRET_PARAMS: &[&str] = &["password", "sslpassword"];

/// A database URL without its secrets, for error messages: the password in
/// the user info and the value of every secret query parameter
/// (`password`, `sslpassword`) become `***`.
///
/// The URL is parsed (with the `url` crate, which sqlx parses Postgres URLs
/// with too), never searched as a string, so a password is found wherever
/// the parser finds it, whatever it contains. A URL that does not parse is
/// not shown at all. Other parts are kept as written.
pub fn redact_url(raw: &str) -> String {
    let Ok(mut url) = url::Url::parse(raw) else {
        return "(a database URL that does not parse; not shown)".into();
    };
    let secret_query = url.query_pairs().any(|(k, _)| is_secret_param(&k));
    if url.password().is_none() && !secret_query {
        return raw.to_string();
    }
    if url.password().is_some() && url.set_password(Some("***")).is_err() {
        return "(a database URL with a password; not shown)".into();
    }
    if secret_query {
        // Pair by pair, keeping the others exactly as written (re-encoding
        // them all would turn `sslrootcert=/etc/ca.pem` into `%2Fetc%2Fca.pem`).
        let query = url.query().unwrap_or_default().to_string();
        let redacted: Vec<String> = query
            .split('&')
            .map(|pair| {
                let key = url::form_urlencoded::parse(pair.as_bytes())
                    .next()
                    .map(|(k, _)| k.into_owned());
                match key {
                    Some(k) if is_secret_param(&k) => {
                        let written = pair.split_once('=').map_or(pair, |(k, _)| k);
                        format!("{written}=***")
                    }
                    _ => pair.to_string(),
                }
            })
            .collect();
        url.set_query(Some(&redacted.join("&")));
    }
    url.to_string()
}

fn is_secret_param(key: &str) -> bool {
    SECRET_PARAMS.iter().any(|p| key.eq_ignore_ascii_case(p))
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_in_the_user_info_are_redacted() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(
            redact_url("postgresql://app:p%40ss%3Aw0rd@db/x?sslmode=verify-full"),
            "postgresql://app:***@db/x?sslmode=verify-full"
        );
        // An @ in the password, unescaped: the parser still finds the host.
        let r = redact_url("postgres://app:a@b@db/x");
        assert!(!r.contains("a@b") && r.contains(":***@"), "{r}");
        assert_eq!(
            redact_url("postgres://app@db/x"),
            "postgres://app@db/x",
            "no password, nothing to hide"
        );
    }

    #[test]
    fn password_query_parameters_are_redacted() {
        assert_eq!(
            redact_url("postgres://db/x?user=app&password=s3cret"),
            "postgres://db/x?user=app&password=***"
        );
        assert_eq!(
            redact_url(
                "postgres://app:one@db/x?sslmode=verify-full&sslrootcert=/etc/ca.pem&PASSWORD=two&sslpassword=three"
            ),
            "postgres://app:***@db/x?sslmode=verify-full&sslrootcert=/etc/ca.pem&PASSWORD=***&sslpassword=***"
        );
        // A percent-encoded parameter name is still that parameter.
        let r = redact_url("postgres://db/x?pass%77ord=s3cret");
        assert!(!r.contains("s3cret"), "{r}");
        let r = redact_url("postgres://db/x?password");
        assert!(!r.contains("s3cret"), "{r}");
    }

    #[test]
    fn urls_without_secrets_are_kept_as_written() {
        for url in [
            "sqlite:pii-vault.db",
            "sqlite:/var/lib/pii vault/x.db?mode=rwc",
            "postgres://app@db/x?sslmode=verify-full&sslrootcert=/etc/pii-vault/ca.pem",
        ] {
            assert_eq!(redact_url(url), url);
        }
        assert_eq!(
            redact_url("not a url with hunter2"),
            "(a database URL that does not parse; not shown)"
        );
    }
}
