//! Where messages come from: [`sqs`] in production, [`file`](mod@file) (JSON Lines, or
//! stdin) for the embedded default, tests and backfills.

pub mod file;
pub mod sqs;

use async_trait::async_trait;

use crate::domain::{Ack, Message};
use crate::retry::Transient;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0}")]
    Transient(String),
    #[error("{0}")]
    Permanent(String),
}

impl SourceError {
    pub fn is_transient(&self) -> bool {
        matches!(self, SourceError::Transient(_))
    }
}

impl Transient for SourceError {
    fn is_transient(&self) -> bool {
        SourceError::is_transient(self)
    }
}

#[async_trait]
pub trait MessageSource: Send + Sync {
    /// Up to `max` messages. `Ok(None)` means the source is exhausted (end of
    /// file; an empty queue under `--until-empty`); `Ok(Some(vec![]))` means
    /// nothing arrived this time.
    async fn receive(&self, max: usize) -> Result<Option<Vec<Message>>, SourceError>;

    /// Acknowledges messages whose rows are committed, so they are not
    /// delivered again. Called only after the commit.
    async fn ack(&self, acks: Vec<Ack>) -> Result<(), SourceError>;

    /// How many messages one `receive` should ask for.
    fn preferred_batch(&self) -> usize;

    /// Number of receive loops worth running at once.
    fn max_receivers(&self) -> usize {
        usize::MAX
    }
}
