//! A message as a source hands it over: an id that is stable across
//! redeliveries, the raw body, when it was sent, and how to acknowledge it.

use chrono::{DateTime, Utc};
use zeroize::Zeroizing;

/// Source-specific acknowledgement handle (an SQS receipt handle; nothing
/// for a file).
#[derive(Debug, Clone)]
pub enum Ack {
    None,
    Sqs { receipt_handle: String },
}

pub struct Message {
    /// Stable across redeliveries: the SQS message id, or a keyed line id.
    pub id: String,
    /// Raw body; may hold PII, so zeroized on drop and never logged.
    pub body: Zeroizing<Vec<u8>>,
    pub sent_at: DateTime<Utc>,
    pub ack: Ack,
    /// Line number in the input file, to point a user at a rejected line.
    pub line: Option<u64>,
    /// The input's source id (a file name or `--source-id`; not PII), kept
    /// with a rejected line beside its number. `None` for SQS.
    pub source: Option<std::sync::Arc<str>>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("id", &self.id)
            .field(
                "body",
                &format_args!("[{} bytes redacted]", self.body.len()),
            )
            .field("sent_at", &self.sent_at)
            .finish()
    }
}
