//! Verifying the chains and the checkpoints: the rows are walked in id
//! order once, streaming, and each break is named by its first bad row and
//! what is wrong there.
//!
//! How a break is told apart, at the first row `r` that does not follow:
//!
//! | what is seen at `r` | what happened |
//! |---|---|
//! | links to the last good row, but its fields do not give its hash | `r` was changed, or (if the next row links past it) inserted |
//! | links to what the previous row linked to | the previous row was inserted |
//! | links to a row that stands later in id order | rows were reordered (ids swapped) |
//! | the next row links to the last good row | `r` was inserted |
//! | links to a row that is nowhere | rows were removed before `r` |
//!
//! After the walk: rows cut from the end show against the chain's head
//! (which the owner can edit too) and against every checkpoint (which the
//! owner cannot sign); an archived start must be a signed checkpoint.

use std::collections::HashMap;

use serde::Serialize;

use super::checkpoint::Checkpoint;
use super::entry::{Chain, Linked};
use crate::crypto::signing::VerifyingKey;

/// Where a chain stands according to the database (`audit_chain`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChainState {
    pub head_id: i64,
    pub head_hash: Vec<u8>,
    pub count: i64,
    /// Rows up to here were archived; the first row held links to `base_hash`.
    pub base_id: i64,
    pub base_hash: Vec<u8>,
    pub base_count: i64,
}

/// What is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Problem {
    RowChanged,
    RowRemoved,
    RowInserted,
    RowsReordered,
    TailCut,
    HeadChanged,
    CheckpointForged,
    CheckpointMissing,
    StartUnanchored,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub problem: Problem,
    /// The chain, for problems of rows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chain: Option<Chain>,
    /// The first bad row.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    /// The checkpoint concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<i64>,
    pub detail: String,
}

struct Break {
    id: i64,
    prev: Vec<u8>,
    link_ok: bool,
    /// The first row after it: its id and what it links to.
    next: Option<(i64, Vec<u8>)>,
    /// A later row whose hash is what `r` links to.
    later: Option<i64>,
}

/// One chain's walk. Feed rows in id order with [`Walk::push`], then
/// [`Walk::finish`].
pub struct Walk {
    chain: Chain,
    state: ChainState,
    expected: Vec<u8>,
    before_last: Option<Vec<u8>>,
    last_id: Option<i64>,
    rows: i64,
    /// Rows checkpoints name: their stored hash and their place in the
    /// chain (rows since it began).
    wanted: HashMap<i64, Option<(Vec<u8>, i64)>>,
    /// Ids of rows past the head the walk began with (rows written while it
    /// ran, or added behind the trigger's back), held against the head it
    /// ends with.
    beyond: Vec<i64>,
    broken: Option<Break>,
}

impl Walk {
    /// `wanted`: the row ids that checkpoints name as heads.
    pub fn new(chain: Chain, state: ChainState, wanted: impl IntoIterator<Item = i64>) -> Self {
        Walk {
            chain,
            expected: state.base_hash.clone(),
            state,
            before_last: None,
            last_id: None,
            rows: 0,
            wanted: wanted.into_iter().map(|id| (id, None)).collect(),
            beyond: Vec::new(),
            broken: None,
        }
    }

    pub fn rows(&self) -> i64 {
        self.rows
    }

    /// The last row accepted so far.
    pub fn last_id(&self) -> Option<i64> {
        self.last_id
    }

    /// The chain's head as read after the walk (rows written while it ran
    /// move it on).
    pub fn set_state(&mut self, state: ChainState) {
        self.state = state;
    }

    pub fn push(&mut self, row: &impl Linked) {
        if let Some(b) = &mut self.broken {
            if b.next.is_none() {
                b.next = Some((row.id(), row.prev_hash().to_vec()));
            }
            if b.later.is_none() && row.hash() == b.prev.as_slice() {
                b.later = Some(row.id());
            }
            return;
        }
        let link_ok = row.prev_hash() == self.expected.as_slice();
        let content_ok = row.expected_hash().as_slice() == row.hash();
        if !(link_ok && content_ok) {
            self.broken = Some(Break {
                id: row.id(),
                prev: row.prev_hash().to_vec(),
                link_ok,
                next: None,
                later: None,
            });
            return;
        }
        self.rows += 1;
        if let Some(w) = self.wanted.get_mut(&row.id()) {
            *w = Some((row.hash().to_vec(), self.state.base_count + self.rows));
        }
        if row.id() > self.state.head_id && self.beyond.len() < 1_000_000 {
            self.beyond.push(row.id());
        }
        self.before_last = Some(std::mem::replace(&mut self.expected, row.hash().to_vec()));
        self.last_id = Some(row.id());
    }

    fn finding(&self, problem: Problem, id: Option<i64>, detail: String) -> Finding {
        Finding {
            problem,
            chain: Some(self.chain),
            id,
            checkpoint: None,
            detail,
        }
    }

    fn last(&self) -> String {
        match self.last_id {
            Some(id) => format!("row {id}"),
            None if self.state.base_id > 0 => {
                format!("the archived rows (through {})", self.state.base_id)
            }
            None => "the start of the chain".into(),
        }
    }

    /// The first break, if any, and what the chain's head says.
    pub fn finish(self) -> Finished {
        let mut findings = Vec::new();
        let c = self.chain.as_str();
        if let Some(b) = &self.broken {
            let next_links_to = |h: &[u8]| b.next.as_ref().is_some_and(|(_, p)| p == h);
            let f = if b.link_ok {
                if next_links_to(&b.prev) {
                    self.finding(
                        Problem::RowInserted,
                        Some(b.id),
                        format!("{c} row {} is not part of the chain: the row after it links past it, to {}", b.id, self.last()),
                    )
                } else {
                    self.finding(
                        Problem::RowChanged,
                        Some(b.id),
                        format!(
                            "{c} row {} was changed: its fields no longer give its hash",
                            b.id
                        ),
                    )
                }
            } else if self.before_last.as_deref() == Some(b.prev.as_slice()) {
                let id = self.last_id.expect("a row before");
                self.finding(
                    Problem::RowInserted,
                    Some(id),
                    format!(
                        "{c} row {id} is not part of the chain: row {} links past it",
                        b.id
                    ),
                )
            } else if let Some(later) = b.later {
                self.finding(
                    Problem::RowsReordered,
                    Some(b.id),
                    format!("{c} rows are out of order: row {} follows row {later}, which stands after it (ids swapped or renumbered)", b.id),
                )
            } else if next_links_to(&self.expected) {
                self.finding(
                    Problem::RowInserted,
                    Some(b.id),
                    format!(
                        "{c} row {} is not part of the chain: the row after it links to {}",
                        b.id,
                        self.last()
                    ),
                )
            } else {
                self.finding(
                    Problem::RowRemoved,
                    Some(b.id),
                    format!(
                        "{c} rows were removed between {} and row {}",
                        self.last(),
                        b.id
                    ),
                )
            };
            findings.push(f);
        } else {
            let last = self.last_id.unwrap_or(self.state.base_id);
            let past_head = self.beyond.iter().find(|id| **id > self.state.head_id);
            if let Some(&id) = past_head {
                findings.push(self.finding(
                    Problem::RowInserted,
                    Some(id),
                    format!("{c} row {id} stands after the chain's head (row {}): added behind the trigger's back", self.state.head_id),
                ));
            } else if self.state.head_id > last {
                findings.push(self.finding(
                    Problem::TailCut,
                    Some(self.state.head_id),
                    format!(
                        "{c} rows after {} were removed: the chain's head names row {}",
                        self.last(),
                        self.state.head_id
                    ),
                ));
            } else if self.state.head_hash != self.expected {
                findings.push(self.finding(
                    Problem::HeadChanged,
                    Some(last),
                    format!("the {c} chain's head does not match its last row ({last})"),
                ));
            } else if self.state.base_count + self.rows != self.state.count {
                findings.push(self.finding(
                    Problem::RowRemoved,
                    None,
                    format!(
                        "the {c} chain's head counts {} rows, the database holds {} (and {} archived)",
                        self.state.count, self.rows, self.state.base_count
                    ),
                ));
            }
        }
        Finished {
            chain: self.chain,
            rows: self.rows,
            broken_at: self.broken.as_ref().map(|b| b.id),
            last_id: self.last_id,
            state: self.state,
            seen: self.wanted,
            findings,
        }
    }
}

/// A walked chain: its findings, and what the checkpoints are held against.
pub struct Finished {
    pub chain: Chain,
    pub rows: i64,
    pub broken_at: Option<i64>,
    pub last_id: Option<i64>,
    pub state: ChainState,
    seen: HashMap<i64, Option<(Vec<u8>, i64)>>,
    pub findings: Vec<Finding>,
}

/// The head ids that `checkpoints` name, per chain: what [`Walk::new`]
/// wants to be told about.
pub fn wanted(checkpoints: &[Checkpoint], chain: Chain) -> Vec<i64> {
    checkpoints
        .iter()
        .map(|c| match chain {
            Chain::Trail => c.trail.head_id,
            Chain::Requests => c.requests.head_id,
        })
        .collect()
}

/// Checks each checkpoint's signature and its place in the sequence, and
/// that the walked chains still hold what it covered. `from_start`: the
/// list must begin with the first checkpoint ever made (a checkpoints
/// file); an archive's checkpoints may begin anywhere.
pub fn check_checkpoints(
    checkpoints: &[Checkpoint],
    key: &VerifyingKey,
    chains: &[&Finished],
    from_start: bool,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut prev: Option<&Checkpoint> = None;
    let mut trusted: Vec<&Checkpoint> = Vec::new();
    for c in checkpoints {
        let signed = c.signed_by(key);
        if !signed {
            findings.push(Finding {
                problem: Problem::CheckpointForged,
                chain: None,
                id: None,
                checkpoint: Some(c.seq),
                detail: format!(
                    "checkpoint {} is not signed by the trusted key ({} {}): forged or altered",
                    c.seq,
                    key.algorithm().as_str(),
                    key.fingerprint()
                ),
            });
        }
        let want_seq = prev.map_or(1, |p| p.seq + 1);
        let want_sig = prev.map(|p| p.sig.as_str());
        let in_place = match prev {
            None if !from_start => true,
            _ => c.seq == want_seq && c.prev_sig.as_deref() == want_sig,
        };
        if !in_place {
            let detail = match prev {
                None => format!("checkpoint {} is the first one given, but does not chain to the start (checkpoints before it are missing)", c.seq),
                Some(p) => format!("checkpoint {} does not follow checkpoint {}: checkpoints between them are missing or out of order", c.seq, p.seq),
            };
            findings.push(Finding {
                problem: Problem::CheckpointMissing,
                chain: None,
                id: None,
                checkpoint: Some(c.seq),
                detail,
            });
        }
        // A forged line still holds its place in the sequence (the next
        // one chains to its `sig` as written), but nothing it claims counts.
        prev = Some(c);
        if !signed {
            continue;
        }
        trusted.push(c);
        for f in chains {
            if let Some(x) = covered(c, f) {
                findings.push(x);
            }
        }
    }
    for f in chains {
        if f.state.base_id > 0 && !trusted.iter().any(|c| anchors(c, f)) {
            findings.push(Finding {
                problem: Problem::StartUnanchored,
                chain: Some(f.chain),
                id: Some(f.state.base_id),
                checkpoint: None,
                detail: format!(
                    "the {} chain starts after row {} (archived), and no signed checkpoint names that point: rows may have been removed from its start",
                    f.chain.as_str(),
                    f.state.base_id
                ),
            });
        }
    }
    findings
}

fn head_of(c: &Checkpoint, chain: Chain) -> &super::checkpoint::Head {
    match chain {
        Chain::Trail => &c.trail,
        Chain::Requests => &c.requests,
    }
}

/// Whether checkpoint `c` names the point where the chain's held rows begin.
fn anchors(c: &Checkpoint, f: &Finished) -> bool {
    let h = head_of(c, f.chain);
    h.head_id == f.state.base_id
        && h.head_hash == hex::encode(&f.state.base_hash)
        && h.count == f.state.base_count
}

/// What is wrong with the rows checkpoint `c` covered, in chain `f`.
fn covered(c: &Checkpoint, f: &Finished) -> Option<Finding> {
    let h = head_of(c, f.chain);
    let name = f.chain.as_str();
    if h.head_id == 0 || h.head_id <= f.state.base_id {
        return None;
    }
    if f.broken_at.is_some_and(|b| h.head_id >= b) {
        // Already reported: the walk did not reach it intact.
        return None;
    }
    let finding = |problem, detail| {
        Some(Finding {
            problem,
            chain: Some(f.chain),
            id: Some(h.head_id),
            checkpoint: Some(c.seq),
            detail,
        })
    };
    match f.seen.get(&h.head_id).cloned().flatten() {
        None if f.last_id.is_none_or(|l| h.head_id > l) => finding(
            Problem::TailCut,
            format!(
                "the {name} chain was cut back: checkpoint {} covered it through row {}, the database ends at {}",
                c.seq,
                h.head_id,
                f.last_id.map_or("the archived rows".into(), |l| format!("row {l}"))
            ),
        ),
        None => finding(
            Problem::RowRemoved,
            format!("{name} row {}, the head of checkpoint {}, was removed", h.head_id, c.seq),
        ),
        Some((hash, _)) if hex::encode(&hash) != h.head_hash => finding(
            Problem::RowChanged,
            format!(
                "{name} row {} is not the row checkpoint {} signed: the chain was rewritten up to it",
                h.head_id, c.seq
            ),
        ),
        Some((_, count)) if count != h.count => finding(
            if count < h.count { Problem::RowRemoved } else { Problem::RowInserted },
            format!(
                "checkpoint {} counted {} {name} rows through row {}, the database has {count}",
                c.seq, h.count, h.head_id
            ),
        ),
        Some(_) => None,
    }
}
