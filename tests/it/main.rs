//! The integration tests, in one binary: linking the AWS SDK and sqlx once
//! instead of once per file is most of what a test build costs.
//!
//! Each module is a group of scenarios; `common` holds the one set of
//! helpers they share: the fixture every test starts from
//! (`common::app::TestApp`: a database with role logins, the binary's one
//! runner), services from the environment, the event generator, leak scans,
//! LocalStack clients, the fault injectors. Run one group with
//! `scripts/test.sh -E 'test(/^roles::/)'`.

mod common;

mod architecture;
mod audit_trail;
mod aws;
mod boundaries;
mod cli_embedded;
mod compose;
mod disk_full;
mod faults;
mod first_hour_cli;
mod first_hour_ops;
mod first_hour_state;
mod kms_faults;
mod month_ledgers;
mod network_tokens;
mod operations;
mod partitions;
mod production;
mod quarantine;
mod retention_drops;
mod roles;
mod roles_e2e;
mod rotation;
mod rotation_rewrite;
mod schema;
mod search;
mod sqs_faults;
mod store_conformance;
mod tls;
