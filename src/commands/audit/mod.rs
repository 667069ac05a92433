//! `pii-vault audit` and its subcommands: the trail as a reader sees it
//! (`list`), and as an auditor checks it: checkpoints signed and shipped
//! out of the database owner's reach, verification against them, export
//! to a SIEM, a data subject's ledger, and the archive of old entries.

mod archive;
mod checkpoint;
mod export;
mod list;
mod subject;
mod verify;

use crate::cli::{AuditArgs, AuditCommand, Cli};
use crate::store::Store;
use crate::trail::{Linked, RequestEntry, TrailEntry};

pub async fn audit(cli: &Cli, args: &AuditArgs) -> anyhow::Result<()> {
    match &args.command {
        None => list::list(cli, &args.list).await,
        Some(AuditCommand::Checkpoint(a)) => checkpoint::checkpoint(cli, a).await,
        Some(AuditCommand::Verify(a)) => verify::verify(cli, a).await,
        Some(AuditCommand::Export(a)) => export::export(cli, a).await,
        Some(AuditCommand::Subject(a)) => subject::subject(cli, a).await,
        Some(AuditCommand::Archive(a)) => archive::archive(cli, a).await,
        Some(AuditCommand::PublicKey(a)) => checkpoint::public_key(cli, a).await,
    }
}

/// Rows per read of the chains: big enough that a round trip is nothing
/// beside hashing them, small enough to keep memory flat.
const PAGE: i64 = 10_000;

/// Calls `each` with every audit row after `after` (through `through`), in
/// id order, a page at a time; returns the last id seen (or `after`).
async fn for_each_entry(
    store: &dyn Store,
    after: i64,
    through: Option<i64>,
    each: impl FnMut(&TrailEntry) -> anyhow::Result<()>,
) -> anyhow::Result<i64> {
    for_each(|a| store.trail_page(a, through, PAGE), after, each).await
}

/// The same for reveal requests.
async fn for_each_request(
    store: &dyn Store,
    after: i64,
    through: Option<i64>,
    each: impl FnMut(&RequestEntry) -> anyhow::Result<()>,
) -> anyhow::Result<i64> {
    for_each(|a| store.request_page(a, through, PAGE), after, each).await
}

async fn for_each<T: Linked, F, Fut>(
    mut page_after: F,
    mut after: i64,
    mut each: impl FnMut(&T) -> anyhow::Result<()>,
) -> anyhow::Result<i64>
where
    F: FnMut(i64) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<T>, crate::store::StoreError>>,
{
    loop {
        let page = page_after(after).await?;
        for e in &page {
            each(e)?;
        }
        match page.last() {
            Some(e) if page.len() as i64 == PAGE => after = e.id(),
            Some(e) => return Ok(e.id()),
            None => return Ok(after),
        }
    }
}
