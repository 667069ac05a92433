//! The verifier against every kind of tampering, on chains built in memory
//! (the same cases run against Postgres in tests/it/audit_trail.rs).

use chrono::{DateTime, Utc};

use super::checkpoint::{Checkpoint, Head, Kind};
use super::entry::{Chain, Linked, TrailEntry, GENESIS};
use super::verify::{check_checkpoints, wanted, ChainState, Finding, Problem, Walk};
use crate::crypto::signing::Ed25519Key;
use crate::crypto::KeyMaterial;

fn at(i: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + i, 0).unwrap()
}

fn chain(n: i64) -> Vec<TrailEntry> {
    let mut prev = GENESIS.to_vec();
    (1..=n)
        .map(|id| {
            let mut e = TrailEntry {
                id,
                at: at(id),
                actor: "alice".into(),
                claimed_actor: Some("a@example".into()),
                action: "reveal".into(),
                target: format!("user_id=u{id}"),
                reason: "ticket".into(),
                row_count: id,
                xact: Some(100 + id),
                prev_hash: vec![],
                hash: vec![],
            };
            e.link_after(&prev);
            prev = e.hash.clone();
            e
        })
        .collect()
}

fn state(rows: &[TrailEntry]) -> ChainState {
    let last = rows.last().unwrap();
    ChainState {
        head_id: last.id,
        head_hash: last.hash.clone(),
        count: rows.len() as i64,
        base_id: 0,
        base_hash: GENESIS.to_vec(),
        base_count: 0,
    }
}

fn walk(rows: &[TrailEntry], st: ChainState) -> Vec<Finding> {
    let mut w = Walk::new(Chain::Trail, st, []);
    for r in rows {
        w.push(r);
    }
    w.finish().findings
}

fn only(findings: Vec<Finding>) -> (Problem, Option<i64>) {
    assert_eq!(findings.len(), 1, "{findings:?}");
    (findings[0].problem, findings[0].id)
}

#[test]
fn an_intact_chain_has_no_findings() {
    let rows = chain(10);
    assert!(walk(&rows, state(&rows)).is_empty());
}

#[test]
fn a_changed_field_is_named_by_its_row() {
    let mut rows = chain(10);
    let st = state(&rows);
    rows[4].reason = "something else".into();
    assert_eq!(only(walk(&rows, st)), (Problem::RowChanged, Some(5)));
}

#[test]
fn a_removed_middle_row_is_named_by_the_row_after_the_gap() {
    let mut rows = chain(10);
    let st = state(&rows);
    rows.remove(4);
    assert_eq!(only(walk(&rows, st)), (Problem::RowRemoved, Some(6)));
}

#[test]
fn a_removed_first_row_is_found() {
    let mut rows = chain(5);
    let st = state(&rows);
    rows.remove(0);
    assert_eq!(only(walk(&rows, st)), (Problem::RowRemoved, Some(2)));
}

#[test]
fn an_inserted_row_is_named_whether_or_not_its_links_are_right() {
    let rows = chain_with_gaps();
    let st = state(&rows);
    let forge = |f: &dyn Fn(&mut TrailEntry, &[TrailEntry])| {
        let mut rows = rows.clone();
        let mut forged = rows[4].clone();
        forged.id = 51; // between 50 and 60
        forged.reason = "forged".into();
        f(&mut forged, &rows);
        rows.insert(5, forged);
        only(walk(&rows, st.clone()))
    };
    // Careless: any hashes.
    let careless = forge(&|r, _| {
        r.prev_hash = vec![9; 32];
        r.hash = vec![8; 32];
    });
    assert_eq!(careless, (Problem::RowInserted, Some(51)));
    // Careful: linked to its predecessor, its own hash right.
    let careful = forge(&|r, rows| r.link_after(&rows[4].hash));
    assert_eq!(careful, (Problem::RowInserted, Some(51)));
    // Linked right, hash wrong.
    let half = forge(&|r, rows| {
        r.prev_hash = rows[4].hash.clone();
        r.hash = vec![7; 32];
    });
    assert_eq!(half, (Problem::RowInserted, Some(51)));
}

/// Ids 10, 20, …, 100 (as a trail with rolled-back writes would have gaps).
fn chain_with_gaps() -> Vec<TrailEntry> {
    let mut prev = GENESIS.to_vec();
    chain(10)
        .into_iter()
        .map(|mut e| {
            e.id *= 10;
            e.link_after(&prev);
            prev = e.hash.clone();
            e
        })
        .collect()
}

#[test]
fn swapped_ids_are_reordered_rows() {
    let rows = chain(10);
    let st = state(&rows);
    for (a, b) in [(3usize, 4usize), (2, 7)] {
        let mut swapped = rows.clone();
        let (ia, ib) = (swapped[a].id, swapped[b].id);
        swapped[a].id = ib;
        swapped[b].id = ia;
        swapped.sort_by_key(|r| r.id);
        let (p, id) = only(walk(&swapped, st.clone()));
        assert_eq!(p, Problem::RowsReordered, "swap {a} {b}");
        assert_eq!(id, Some(ia));
    }
}

#[test]
fn rows_cut_from_the_end_show_against_the_head() {
    let mut rows = chain(10);
    let st = state(&rows);
    rows.truncate(7);
    assert_eq!(only(walk(&rows, st)), (Problem::TailCut, Some(10)));
}

#[test]
fn a_row_added_after_the_head_is_inserted() {
    let rows = chain(10);
    let st = state(&rows[..9]);
    assert_eq!(only(walk(&rows, st)), (Problem::RowInserted, Some(10)));
}

fn signed(
    key: &Ed25519Key,
    seq: i64,
    rows: &[TrailEntry],
    prev: Option<&Checkpoint>,
) -> Checkpoint {
    let last = rows.last().unwrap();
    let mut c = Checkpoint {
        seq,
        kind: Kind::Head,
        at: at(1000 + seq),
        trail: Head {
            head_id: last.id,
            head_hash: hex::encode(&last.hash),
            count: rows.len() as i64,
        },
        requests: Head {
            head_id: 0,
            head_hash: hex::encode(GENESIS),
            count: 0,
        },
        prev_sig: prev.map(|p| p.sig.clone()),
        key: "local:ed25519:test".into(),
        alg: "ed25519".into(),
        sig: String::new(),
    };
    c.set_signature(&key.sign(&c.signed_bytes()));
    c
}

fn check(
    rows: &[TrailEntry],
    st: ChainState,
    cps: &[Checkpoint],
    key: &Ed25519Key,
) -> Vec<Finding> {
    let mut w = Walk::new(Chain::Trail, st, wanted(cps, Chain::Trail));
    for r in rows {
        w.push(r);
    }
    let done = w.finish();
    let mut all = done.findings.clone();
    all.extend(check_checkpoints(cps, &key.verifying_key(), &[&done], true));
    all
}

#[test]
fn checkpoints_catch_a_tail_cut_with_the_head_rewritten_too() {
    let key = Ed25519Key::from_seed(&KeyMaterial::generate());
    let rows = chain(10);
    let c1 = signed(&key, 1, &rows[..5], None);
    let c2 = signed(&key, 2, &rows, Some(&c1));
    assert!(check(&rows, state(&rows), &[c1.clone(), c2.clone()], &key).is_empty());
    // The owner deletes rows 9 and 10 and sets the head back to row 8.
    let cut = &rows[..8];
    let findings = check(cut, state(cut), &[c1, c2], &key);
    assert_eq!(only(findings), (Problem::TailCut, Some(10)));
}

#[test]
fn a_rewritten_chain_passes_its_own_links_but_not_the_checkpoint() {
    let key = Ed25519Key::from_seed(&KeyMaterial::generate());
    let rows = chain(10);
    let c1 = signed(&key, 1, &rows, None);
    // Row 3 changed and every hash from it on recomputed by the owner.
    let mut rewritten = rows.clone();
    rewritten[2].reason = "rewritten".into();
    let mut prev = rewritten[1].hash.clone();
    for r in &mut rewritten[2..] {
        r.link_after(&prev);
        prev = r.hash.clone();
    }
    let findings = check(&rewritten, state(&rewritten), &[c1], &key);
    assert_eq!(only(findings), (Problem::RowChanged, Some(10)));
}

#[test]
fn a_replaced_or_dropped_checkpoint_line_is_found() {
    let key = Ed25519Key::from_seed(&KeyMaterial::generate());
    let rows = chain(10);
    let c1 = signed(&key, 1, &rows[..3], None);
    let c2 = signed(&key, 2, &rows[..6], Some(&c1));
    let c3 = signed(&key, 3, &rows, Some(&c2));
    // Replaced: a line edited to claim less.
    let mut forged = c2.clone();
    forged.trail.count = 5;
    let f = check(&rows, state(&rows), &[c1.clone(), forged, c3.clone()], &key);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].problem, Problem::CheckpointForged);
    assert_eq!(f[0].checkpoint, Some(2));
    // Signed by another key.
    let other = Ed25519Key::from_seed(&KeyMaterial::generate());
    let alien = signed(&other, 2, &rows[..6], Some(&c1));
    let f = check(&rows, state(&rows), &[c1.clone(), alien, c3.clone()], &key);
    assert!(f
        .iter()
        .any(|f| f.problem == Problem::CheckpointForged && f.checkpoint == Some(2)));
    // Dropped.
    let f = check(&rows, state(&rows), &[c1, c3], &key);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(
        (f[0].problem, f[0].checkpoint),
        (Problem::CheckpointMissing, Some(3))
    );
}

#[test]
fn an_archived_start_must_be_a_signed_checkpoint() {
    let key = Ed25519Key::from_seed(&KeyMaterial::generate());
    let rows = chain(10);
    let c1 = signed(&key, 1, &rows[..4], None);
    let mut c1 = c1;
    c1.kind = Kind::Archive;
    c1.set_signature(&key.sign(&c1.signed_bytes()));
    let held = &rows[4..];
    let mut st = state(&rows);
    st.base_id = 4;
    st.base_hash = rows[3].hash.clone();
    st.base_count = 4;
    assert!(check(held, st.clone(), std::slice::from_ref(&c1), &key).is_empty());
    // Two more rows removed from the start, the base moved to match.
    let mut st2 = st.clone();
    st2.base_id = 6;
    st2.base_hash = rows[5].hash.clone();
    st2.base_count = 6;
    let f = check(&rows[6..], st2, &[c1], &key);
    assert_eq!(only(f), (Problem::StartUnanchored, Some(6)));
}
