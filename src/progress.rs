//! Progress of long runs: a bar on a terminal with text logs; otherwise a
//! log line every 10 seconds, so that a run under a scheduler or with its
//! stderr in a file still shows how far it is.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::source::file::FileSource;

/// The bar on screen, if any: log lines and operator messages are written
/// through [`suspend`], which clears it, writes, and draws it again below,
/// instead of tearing it (a line written over a half-drawn bar).
static ON_SCREEN: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Runs `write` (something that writes to stderr) with the bar on screen,
/// if any, cleared for it.
pub fn suspend<R>(write: impl FnOnce() -> R) -> R {
    let bar = ON_SCREEN.lock().unwrap_or_else(|e| e.into_inner()).clone();
    match bar {
        Some(bar) => bar.suspend(write),
        None => write(),
    }
}

/// `bar` is now on screen (until [`off_screen`]).
fn on_screen(bar: &ProgressBar) {
    *ON_SCREEN.lock().unwrap_or_else(|e| e.into_inner()) = Some(bar.clone());
}

/// Clears `bar` and forgets it.
fn off_screen(bar: &ProgressBar) {
    let mut current = ON_SCREEN.lock().unwrap_or_else(|e| e.into_inner());
    bar.finish_and_clear();
    *current = None;
}

/// `(stored, duplicates, rejected)` so far, for the log lines.
pub type Counts = Arc<dyn Fn() -> (u64, u64, u64) + Send + Sync>;

/// Progress of a file run: a bar when `bar` is allowed and stderr is a
/// terminal; otherwise (a pipe, a log file, JSON logs) an INFO line every
/// 10 seconds with the bytes read and the counts so far.
pub fn for_file(
    file: Arc<FileSource>,
    done: CancellationToken,
    bar: bool,
    counts: Counts,
) -> Option<JoinHandle<()>> {
    if !(bar && std::io::stderr().is_terminal()) {
        return Some(tokio::spawn(async move {
            let start = std::time::Instant::now();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(LOG_EVERY) => {}
                    _ = done.cancelled() => break,
                }
                // A read blocked on a quiet stdin holds the reader: never
                // wait for it past the end of the run.
                let read = tokio::select! {
                    read = file.position() => read,
                    _ = done.cancelled() => break,
                };
                let (stored, duplicates, rejected) = counts();
                let of = file.len.map(|len| format!(" of {len}")).unwrap_or_default();
                tracing::info!(
                    bytes_read = read,
                    bytes_total = file.len,
                    stored,
                    duplicates,
                    rejected,
                    elapsed_s = start.elapsed().as_secs(),
                    "progress: {read}{of} bytes read; {stored} stored, {duplicates} duplicates, {rejected} rejected"
                );
            }
        }));
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
    on_screen(&bar);
    Some(tokio::spawn(async move {
        loop {
            bar.set_position(file.position().await);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = done.cancelled() => break,
            }
        }
        off_screen(&bar);
    }))
}

/// How often a file run or a rotation without a terminal logs its progress.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Progress of a long job over a known number of rows: a bar with ETA on a
/// terminal, otherwise a log line every 10 seconds (done/total, rows/s,
/// ETA), so that a scheduled rotation's log shows how far it is.
pub struct JobProgress {
    bar: ProgressBar,
    what: &'static str,
    visible: bool,
    stop: CancellationToken,
    ticker: Option<JoinHandle<()>>,
}

impl JobProgress {
    /// A bar when `bar` (a terminal, text logs), else log lines; needs a
    /// Tokio runtime for the latter.
    pub fn new(bar: bool, what: &'static str) -> Self {
        let stop = CancellationToken::new();
        if bar {
            let pb = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr()).with_style(
                ProgressStyle::with_template(&format!(
                    "[{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {what} ({{per_sec}}, ETA {{eta}})"
                ))
                .expect("valid template"),
            );
            on_screen(&pb);
            return JobProgress {
                bar: pb,
                what,
                visible: true,
                stop,
                ticker: None,
            };
        }
        // A hidden bar still counts; the ticker reads it.
        let pb = ProgressBar::hidden();
        let ticker = tokio::runtime::Handle::try_current().ok().map(|rt| {
            let (pb, stop) = (pb.clone(), stop.clone());
            rt.spawn(async move {
                let start = std::time::Instant::now();
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(LOG_EVERY) => {}
                        _ = stop.cancelled() => break,
                    }
                    log_line(&pb, what, start.elapsed());
                }
            })
        });
        JobProgress {
            bar: pb,
            what,
            visible: false,
            stop,
            ticker,
        }
    }

    /// Counts only (tests, library callers).
    pub fn hidden() -> Self {
        JobProgress {
            bar: ProgressBar::hidden(),
            what: "rows",
            visible: false,
            stop: CancellationToken::new(),
            ticker: None,
        }
    }

    pub fn set_length(&self, total: u64) {
        self.bar.set_length(total);
    }

    /// Rows already done by an earlier run of a resumed job.
    pub fn set_position(&self, done: u64) {
        self.bar.set_position(done);
        self.bar.reset_eta();
    }

    pub fn inc(&self, rows: u64) {
        self.bar.inc(rows);
    }

    /// A handle that counts into this progress from other tasks.
    pub fn counter(&self) -> ProgressBar {
        self.bar.clone()
    }

    pub fn position(&self) -> u64 {
        self.bar.position()
    }

    /// A message for the operator on stderr, above the bar if there is one.
    pub fn note(&self, message: &str) {
        eprintln!("pii-vault: {message}");
    }

    pub fn finish(mut self) {
        self.stop.cancel();
        if let Some(t) = self.ticker.take() {
            t.abort();
        }
        if self.visible {
            off_screen(&self.bar);
        } else {
            self.bar.finish_and_clear();
        }
        tracing::debug!(what = self.what, done = self.bar.position(), "job finished");
    }
}

impl Drop for JobProgress {
    fn drop(&mut self) {
        self.stop.cancel();
        if self.visible && !self.bar.is_finished() {
            off_screen(&self.bar);
        }
    }
}

fn log_line(pb: &ProgressBar, what: &str, elapsed: Duration) {
    let done = pb.position();
    let total = pb.length().unwrap_or(0).max(done);
    let rate = pb.per_sec();
    let eta = if rate > 0.0 {
        format!("{:.0}s", (total - done) as f64 / rate)
    } else {
        "unknown".into()
    };
    tracing::info!(
        done,
        total,
        rows_per_s = rate.round() as u64,
        eta = %eta,
        elapsed_s = elapsed.as_secs(),
        "progress: {done}/{total} {what}"
    );
}
