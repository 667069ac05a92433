//! pii-vault: mask the PII in login events, keep the originals recoverable.
//!
//! ```text
//!   SQS / JSON Lines                     ┌──────────── user_logins (analysts)
//!        │                               │  masked_ip, masked_device_id:
//!  source::MessageSource                 │  HMAC-SHA256 tokens (crypto::token)
//!        │  Message {id, body, sent_at}  │
//!        ▼                               │
//!  domain::LoginEvent::parse ──► pipeline::protect ──► store::Ingest::write_batch
//!        │ (or Rejection)                │  one transaction per batch,
//!        │                               │  COPY; ON CONFLICT DO NOTHING if redelivered
//!        ▼                               └──────────── vault: AES-256-GCM of the
//!   quarantine (body sealed,                            originals (crypto::aead), AAD =
//!   value-free reason)                                  message id, user id, key id
//!                                                        under a data key wrapped by
//!   ack to the source only after commit                 kms::{aws, local} (crypto::envelope)
//! ```
//!
//! `reveal` reads the vault back through [`vault::VaultReader`] only after
//! its audit row has committed (two transactions, see [`store::Reveal`]);
//! [`rotation`] re-keys online under the store's [`store::Jobs`]; `forget`
//! erases originals of one user or older than a retention date
//! ([`store::Erasure`]). `docs/architecture.md` has the layers and where a
//! change of each kind goes.

#![forbid(unsafe_code)]

/// Every `eprintln!` in this crate goes through [`telemetry::stderr_line`]
/// (a `macro_rules!` in scope takes precedence over the standard one): the
/// same text, or under `--log-format json` one JSON object per line, so
/// that no line on stderr escapes the log format an operator asked for.
macro_rules! eprintln {
    ($($arg:tt)*) => {
        $crate::telemetry::stderr_line(format_args!($($arg)*))
    };
}

pub mod cli;
pub mod clock;
pub mod commands;
pub mod crypto;
pub mod domain;
pub mod honeytoken;
pub mod keyring;
pub mod kms;
pub mod metrics;
pub mod output;
pub mod pipeline;
pub mod progress;
pub mod retry;
pub mod rotation;
pub mod source;
pub mod store;
pub mod telemetry;
pub mod trail;
pub mod vault;
