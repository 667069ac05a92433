//! `pii-vault audit export`: every trail entry after a cursor, in id order,
//! with its hash and the previous one (so the receiver can check that the
//! deliveries join up), as JSON Lines or CEF; `--follow` keeps polling.
//! The last id written goes to stderr, for the next run's `--after-id`.

use std::io::Write as _;

use super::for_each_entry;
use crate::cli::{Cli, ExportArgs, ExportFormat};
use crate::commands::open_store;
use crate::trail::siem;

pub async fn export(cli: &Cli, args: &ExportArgs) -> anyhow::Result<()> {
    let store = open_store(cli).await?;
    let version = env!("CARGO_PKG_VERSION");
    let mut out = std::io::BufWriter::new(std::io::stdout());
    let mut written = args.after_id;
    let mut closed = false;
    loop {
        let result = for_each_entry(store.as_ref(), written, None, |e| {
            let line = match args.format {
                ExportFormat::Jsonl => siem::jsonl(e),
                ExportFormat::Cef => siem::cef(e, version),
            };
            writeln!(out, "{line}")?;
            written = e.id;
            Ok(())
        })
        .await
        .and_then(|_| out.flush().map_err(anyhow::Error::from));
        match result {
            Ok(()) => {}
            // The reader went away (`| head`): what was written stands.
            Err(e) if is_broken_pipe(&e) => {
                closed = true;
                break;
            }
            Err(e) => {
                eprintln!("pii-vault: last id written: {written}");
                return Err(e);
            }
        }
        if !args.follow {
            break;
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tokio::time::sleep(args.poll) => {}
        }
    }
    if !closed {
        eprintln!("pii-vault: last id written: {written}");
    }
    Ok(())
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
