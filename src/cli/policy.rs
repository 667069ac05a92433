//! `pii-vault policy …`: the limits the database holds reveals and
//! searches to.

use clap::Subcommand;

use super::FormatArgs;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Change the limits (the schema owner only; audited by the database).
    Set {
        /// Most distinct users one reveal may cover without approval.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(1..=1_000_000))]
        max_users_per_reveal: Option<i64>,
        /// Most reveals one login may make in 24 hours without approval.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(1..=1_000_000))]
        max_reveals_per_day: Option<i64>,
        /// Most searches (`tokenize`) one login may make in 24 hours; the
        /// next is refused (no approval path) [initially 200].
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(1..=1_000_000))]
        max_searches_per_day: Option<i64>,
    },
    /// Show the limits.
    Show(FormatArgs),
}
