//! Parsed types. Parse, don't validate: a [`LoginEvent`] can only be built by
//! [`LoginEvent::parse`], so every later stage holds data that already passed
//! the input rules of the design, and the PII in it is wrapped in [`Pii`] so
//! that no `Debug` or log line can print it.

pub mod event;
pub mod ip;
pub mod message;
pub mod pii;

pub use event::{Field, LoginEvent, Rejection};
pub use ip::CanonicalIp;
pub use message::{Ack, Message};
pub use pii::Pii;
