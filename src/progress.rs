//! A progress bar for long file runs: only on a terminal, only with text
//! logs, never when stderr is piped.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::source::file::FileSource;

pub fn for_file(file: Arc<FileSource>, done: CancellationToken) -> Option<JoinHandle<()>> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = match file.len {
        Some(len) => ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr())
            .with_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({eta})",
                )
                .expect("valid template"),
            ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bytes} read")
                .expect("valid template"),
        ),
    };
    Some(tokio::spawn(async move {
        loop {
            bar.set_position(file.position().await);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = done.cancelled() => break,
            }
        }
        bar.finish_and_clear();
    }))
}
