//! The audit trail as something an auditor can check: two hash chains (every
//! audit row; every reveal request, with its alarm count and the users it
//! returned), signed checkpoints of where they stood, and the verifier.
//!
//! Values and rules only, no I/O: the store reads and writes the rows, the
//! key homes sign, the `audit` commands put them together. The database
//! computes the same hashes in its trigger (Postgres) or writer (SQLite);
//! whoever holds the rows and a checkpoint file can recompute everything
//! here without trusting the database's owner.

pub mod checkpoint;
pub mod entry;
pub mod siem;
pub mod verify;

#[cfg(test)]
mod tests;

pub use checkpoint::{Checkpoint, Head, Kind};
pub use entry::{Chain, Linked, RequestEntry, TrailEntry, GENESIS};
pub use verify::{ChainState, Finding, Problem, Walk};
