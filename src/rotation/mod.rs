//! Key rotation: safe to run while workers consume, audited before it reads
//! anything, one job of a kind at a time.
//!
//! Workers hold keys in memory, so a rotation cannot swap them directly.
//! Instead it *retires* keys in the database, and the database refuses any
//! row written under a retired key (the fence triggers on Postgres, the
//! checks of `write_batch` on SQLite). A worker whose key was retired gets
//! its batch refused, takes fresh keys and protects the batch again. So once
//! a rotation has retired a key, no row is ever committed under it again,
//! and the rotation can re-encrypt or re-tokenise what is there without
//! racing the workers.
//!
//! Every run first commits its audit record and takes its kind's lease
//! ([`Jobs::begin_job`](crate::store::Jobs::begin_job)); on Postgres every
//! row it reads or writes goes through database functions that check that
//! record and lease. A row that cannot be opened (tampered, or under a
//! destroyed key) is reported and skipped, never a reason to stop halfway:
//! the keys it needs are then kept, not destroyed.
//!
//! - `job.rs`: what every rotation shares: resuming a job, its key ranges
//!   worked on several connections, progress, the test hook that stops it;
//! - `rewrite.rs`: closed partitions copied into new tables and swapped
//!   in, rather than updated in place;
//! - `kek.rs`, `data_keys.rs`, `token_key.rs`: one rotation each.

mod data_keys;
mod job;
mod kek;
mod rewrite;
mod token_key;

pub use data_keys::{rotate_data_keys, ROWS_PER_DATA_KEY};
pub use job::RotationOptions;
pub use kek::rotate_kek;
pub use token_key::rotate_token_key;

/// Message ids of skipped rows kept for the report.
const SKIPPED_SHOWN: usize = 20;

/// Rows a job could not open, by message id.
#[derive(Debug, Default, Clone)]
pub struct Skipped {
    pub count: u64,
    /// The first 20 of them.
    pub message_ids: Vec<String>,
}

impl Skipped {
    fn merge(&mut self, other: Skipped) {
        self.count += other.count;
        for id in other.message_ids {
            if self.message_ids.len() < SKIPPED_SHOWN {
                self.message_ids.push(id);
            }
        }
    }

    fn add(&mut self, message_id: &str, why: &anyhow::Error) {
        tracing::error!(message_id, error = %why, "cannot open a sealed row; skipped");
        self.count += 1;
        if self.message_ids.len() < SKIPPED_SHOWN {
            self.message_ids.push(message_id.to_string());
        }
    }
}

/// What `rotate data-keys` did.
#[derive(Debug, Default)]
pub struct DataKeysRotated {
    pub record_id: i64,
    pub resealed: u64,
    /// The rotation's own data keys (one per [`ROWS_PER_DATA_KEY`] rows).
    pub new_keys: Vec<String>,
    pub destroyed: Vec<String>,
    pub skipped: Skipped,
}

/// What `rotate token-key` did.
#[derive(Debug, Default)]
pub struct TokenKeyRotated {
    pub record_id: i64,
    pub version: i64,
    pub retokenised: u64,
    pub destroyed: Vec<String>,
    pub skipped: Skipped,
}

/// What `rotate kek` did.
#[derive(Debug, Default)]
pub struct KekRotated {
    pub record_id: i64,
    pub target: String,
    pub rewrapped: u64,
}
