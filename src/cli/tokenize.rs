//! `pii-vault tokenize`: an analyst's search by a raw value.

use clap::Args;

use super::parse::non_blank;
use super::OutputFormat;

#[derive(Debug, Args)]
#[command(
    group(clap::ArgGroup::new("value").required(true).args(["ip", "ip_net", "device_id"])),
    about = "The tokens an IP or device id has in user_logins, to find its logins without revealing \
anyone (searcher role; audited, daily limit)",
    long_about = "Print the token(s) an IP address or a device id has in user_logins, and a SELECT that \
finds its logins, without revealing anyone: the token is computed here, from the value you already \
have, with the token key (unwrapped through KMS, or the local key file). During a token-key rotation \
there are two tokens, the current version's and the previous one's; the SELECT matches both.\n\n\
It is still a privileged act (whoever can tokenize can test guesses), so it needs a login with the \
pii_vault_searcher role on Postgres, and the database records it (the token and the reason, never the \
value) and commits that record before anything is printed. Each login may search \
max_searches_per_day times in 24 hours (`pii-vault policy show`; 200 unless changed), and a search \
for a honeytoken's value raises the alarm. Reading the logins the SELECT finds needs the analyst role.",
    after_help = "Examples:\n  \
        pii-vault tokenize --ip 198.51.100.23 --reason 'FRAUD-1234: logins from the reported address'\n  \
        pii-vault tokenize --device-id 593-47-5928 --reason 'FRAUD-1234' --format json\n  \
        pii-vault tokenize --ip-net 198.51.100.0/24 --reason 'FRAUD-1234: the reported network'\n\n\
        IPv4, IPv4-mapped IPv6 (::ffff:198.51.100.23) and any spelling of an IPv6 address give the \
        token the worker stored for that address."
)]
pub struct TokenizeArgs {
    /// The IP address (IPv4 or IPv6, any spelling) to find.
    #[arg(long, value_name = "ADDR")]
    pub ip: Option<String>,

    /// The network to find (`masked_ip_net`): a /24 of IPv4
    /// (198.51.100.0/24) or a /48 of IPv6 (2001:db8:1::/48).
    #[arg(long, value_name = "NET")]
    pub ip_net: Option<String>,

    /// The device id to find, exactly as the events carry it.
    #[arg(long, value_name = "ID")]
    pub device_id: Option<String>,

    /// Why you search (ticket, incident): kept in the audit trail.
    #[arg(long, value_parser = non_blank)]
    pub reason: String,

    /// Who is asking, kept in the audit trail as the claimed actor beside
    /// the database login [default: $USER].
    #[arg(long, env = "PII_VAULT_ACTOR")]
    pub actor: Option<String>,

    /// Output: lines for people, or one JSON object for programs.
    #[arg(long, value_enum, env = "PII_VAULT_FORMAT", default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
}
