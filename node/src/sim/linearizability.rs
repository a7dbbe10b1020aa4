//! Judges a [`History`]: are its linearizable and lease reads and all its
//! writes linearizable, and do its stale reads keep their weaker promise?
//!
//! # The model
//!
//! Every key is an independent register (P-compositionality: a history is
//! linearizable iff each key's sub-history is), holding either nothing
//! (version 0) or a value and a version. The checker assumes of versions only
//! what the store promises: a successful write gives the key a version
//! greater than the key's current one, and no two writes of a key get the
//! same version. It does not assume versions are log indices, so after a
//! delete a write may get a smaller version than the key ever had.
//!
//! A write whose answer is unknown has no observed version. When the search
//! lets it take effect, the register holds its value with a version known
//! only to be above the previous one ([`model::Version::Above`]); the first
//! read or mismatch that sees the key then binds the version (if no other
//! write owns that version). A write is told apart from the others by its value (the
//! recorder asserts values are unique per key), so a read names the write it
//! saw.
//!
//! # Checks, per key, in order
//!
//! 1. Static: every value read was written by a write of the key that was
//!    invoked before the read finished; a write's value is always seen with
//!    one version; no two writes share a version; no answer says version 0
//!    for a value. These hold for stale reads too.
//! 2. Stale reads ([`check_stale_reads`]): see [`stale::stale_reads_of_key`].
//! 3. Linearizability of everything but stale reads: a Wing-Gong/Lowe search
//!    over the porcupine entry list (calls and returns in real-time order;
//!    an operation may be linearized when no unlinearized operation returned
//!    before it was called), memoised on (linearized set, register).
//!    Operations without an answer have no return entry, so they may take
//!    effect at any later point or never; the search succeeds once every
//!    answered operation is placed.
//!
//! What keeps the search small on real histories:
//! - Reads (and anything else that leaves the register as it is, or a read
//!   that names the write it saw) are placed as soon as they fit, without
//!   branching: placing such an operation earlier never removes a way to
//!   place the rest.
//! - Unanswered operations are tried only after answered ones; a state
//!   reached with a superset of the unanswered operations already placed is
//!   pruned (the smaller set can do everything the larger one can); an
//!   unanswered operation is placed only where it lets something fit that
//!   did not before, and not right after another one it does not need.
//! - Unanswered operations that nothing tells apart (lost writes whose value
//!   nobody read) are placed in invocation order only, and those that no
//!   operation could observe are left out altogether.
//! - A first search with a budget proportional to the history; if it runs
//!   out, short windows around where it got stuck are tried (below) before
//!   the full budget, [`Limits::steps_per_key`], is spent. Beyond that the
//!   verdict is [`CheckError::Inconclusive`], never a hang or a false alarm.
//!
//! # Limits
//!
//! The search is exponential in the worst case: many concurrent writes
//! with unknown outcome, or deletes racing writes (after a delete a version
//! may go down, so more orders fit), can exhaust the budget. A history that
//! is not linearizable costs more than one that is, as every order must be
//! ruled out, unless a short window shows the violation.
//!
//! # Windows and excerpts
//!
//! A window is the operations invoked from some point on, plus those still
//! running then (answers forgotten), started from whatever the earlier
//! operations could have left ([`model::Register::Before`]). Any
//! linearization of the history, cut at that point, linearizes the window,
//! so a window that fails proves the history fails.
//!
//! A violation comes with a short excerpt that is itself not linearizable,
//! and every step of its making provably keeps it so (no step invents a
//! violation by cutting away context): the shortest failing window ending
//! where the search got stuck (or else the shortest failing prefix), then
//! operations removed while the rest still fails: reads and other
//! operations that change nothing, and writes that nothing left could have
//! observed. The writes of the values read, and the owners of the versions
//! named, are shown with it; unanswered operations from before the window
//! are listed by id.

// Layout: this file holds the public API, the static checks and the driver;
// `model` the register, `search` the search, `excerpt` windows and short
// excerpts, `stale` the stale-read rule; `tests` and `generated` the tests.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use bytes::Bytes;

use super::history::{
    ClientId, Consistency, End, Excerpt, History, Op, OpId, Outcome, Quoted, Record,
};

mod excerpt;
#[cfg(test)]
mod generated;
mod model;
mod search;
mod stale;
#[cfg(test)]
mod tests;

use excerpt::{
    drop_unobserved, failing_window, shortest_failing_prefix, without_unobserved_unanswered,
    Trials, Window,
};
use model::{Action, CasResult, Claims, DeleteResult, KeyOp, Read};
use search::{Reach, SearchResult};
use stale::stale_reads_of_key;

/// Bounds on the work of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Search steps (states entered, and dead ends) per key before the
    /// verdict is Inconclusive. Each entered state is kept in the memo, so
    /// this also bounds memory (roughly 150 bytes a step).
    pub steps_per_key: u64,
    /// Searches of windows and shorter excerpts for one key.
    pub minimise_searches: u32,
    /// Search steps for each of those searches.
    pub steps_per_minimise_search: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            steps_per_key: 1_000_000,
            minimise_searches: 200,
            steps_per_minimise_search: 100_000,
        }
    }
}

/// Why a history did not pass.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// The history breaks the store's promises.
    #[error("{0}")]
    Violation(Violation),
    /// The search for a linearization ran out of budget: nothing is known.
    /// No violation was found on any other key either.
    #[error("{0}")]
    Inconclusive(Inconclusive),
}

/// A broken promise, on one key, with the operations that show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The key.
    pub key: Bytes,
    /// What is wrong.
    pub reason: Reason,
    /// A short part of the key's history that shows it, in invocation order.
    pub excerpt: Excerpt,
    /// Operations without an answer, invoked before the excerpt, that may
    /// take effect anywhere in it: part of what was ruled out, but listed by
    /// id only (a long run piles up lost writes).
    pub earlier_unanswered: Vec<OpId>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "key {}: {}", Quoted(&self.key), self.reason)?;
        write!(f, "{}", self.excerpt)?;
        if !self.earlier_unanswered.is_empty() {
            write!(
                f,
                "  and {} operations without an answer, invoked earlier, which may take effect anywhere among these:",
                self.earlier_unanswered.len()
            )?;
            for id in &self.earlier_unanswered {
                write!(f, " {id}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// What is wrong in a [`Violation`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// No order of the key's operations explains their answers.
    NotLinearizable {
        /// Most answered operations the search placed in a valid order.
        placed: usize,
        /// Answered operations of the key that the search had to place.
        answered: usize,
        /// The operation that could not be placed after that longest
        /// partial order: the earliest answered one left.
        stuck_at: Option<OpId>,
        /// The excerpt starts mid-history (but for the writes of values it
        /// reads): it admits no order whatever the operations before it
        /// left in the key.
        mid_history: bool,
    },
    /// A read returned a value that no write of the key wrote (or only a
    /// write that failed or did not match).
    NeverWritten {
        /// The read.
        read: OpId,
    },
    /// A read returned the value of a write invoked after the read finished.
    ReadFromFuture {
        /// The read.
        read: OpId,
        /// The write.
        write: OpId,
    },
    /// A write's value was seen with two versions.
    VersionConflict {
        /// The write.
        write: OpId,
        /// The first version seen, and where.
        first: (u64, OpId),
        /// The other version, and where.
        second: (u64, OpId),
    },
    /// Two writes got the same version.
    DuplicateVersion {
        /// The version.
        version: u64,
        /// One write and where its version was seen.
        first: (OpId, OpId),
        /// The other.
        second: (OpId, OpId),
    },
    /// An answer gave a value version 0, which only an absent key has.
    ZeroVersion {
        /// The operation.
        op: OpId,
    },
    /// A client's stale read saw an older state of the key than an earlier
    /// stale read of the same client, and no delete can explain it.
    StaleReadWentBack {
        /// The client.
        client: ClientId,
        /// The earlier read.
        earlier: OpId,
        /// The later read.
        later: OpId,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NotLinearizable {
                placed,
                answered,
                stuck_at,
                mid_history,
            } => {
                write!(
                    f,
                    "not linearizable: at most {placed} of {answered} answered operations fit in one order"
                )?;
                if let Some(op) = stuck_at {
                    write!(f, "; none fits {op} after them")?;
                }
                if *mid_history {
                    f.write_str("; the excerpt admits no order whatever the key held before it")?;
                }
                Ok(())
            }
            Reason::NeverWritten { read } => {
                write!(f, "{read} read a value that no write of this key wrote")
            }
            Reason::ReadFromFuture { read, write } => write!(
                f,
                "{read} read the value of {write}, which was invoked after the read finished"
            ),
            Reason::VersionConflict {
                write,
                first,
                second,
            } => write!(
                f,
                "the value of {write} was seen with version {} ({}) and version {} ({})",
                first.0, first.1, second.0, second.1
            ),
            Reason::DuplicateVersion {
                version,
                first,
                second,
            } => write!(
                f,
                "{} (seen in {}) and {} (seen in {}) both have version {version}",
                first.0, first.1, second.0, second.1
            ),
            Reason::ZeroVersion { op } => {
                write!(f, "{op} gave a value version 0, which only an absent key has")
            }
            Reason::StaleReadWentBack {
                client,
                earlier,
                later,
            } => write!(
                f,
                "client {client}'s stale read {later} saw an older state than its earlier stale read {earlier}, and no delete explains it"
            ),
        }
    }
}

/// The search of one key ran out of budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inconclusive {
    /// The key.
    pub key: Bytes,
    /// The budget that ran out.
    pub steps: u64,
    /// Operations the search had to order.
    pub ops: usize,
}

impl fmt::Display for Inconclusive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "key {}: no verdict on linearizability after {} search steps over {} operations; raise Limits::steps_per_key or record fewer concurrent unanswered writes",
            Quoted(&self.key),
            self.steps,
            self.ops
        )
    }
}

/// Checks `history` with the default [`Limits`].
pub fn check(history: &History) -> Result<(), CheckError> {
    check_with(history, &Limits::default())
}

/// Checks every key of `history`: the static rules, stale reads, then
/// linearizability. Returns the first violation in key order; Inconclusive
/// only when no key has a violation.
pub fn check_with(history: &History, limits: &Limits) -> Result<(), CheckError> {
    let mut inconclusive = None;
    for (key, records) in by_key(history) {
        let context = KeyContext::new(history, key, records).map_err(CheckError::Violation)?;
        stale_reads_of_key(&context).map_err(CheckError::Violation)?;
        match linearizable_key(&context, limits) {
            Ok(()) => {}
            Err(CheckError::Inconclusive(i)) => {
                inconclusive.get_or_insert(i);
            }
            Err(violation) => return Err(violation),
        }
    }
    inconclusive.map_or(Ok(()), |i| Err(CheckError::Inconclusive(i)))
}

/// Checks only the rules stale reads must keep (and the static rules that
/// every read keeps), on every key.
pub fn check_stale_reads(history: &History) -> Result<(), Violation> {
    for (key, records) in by_key(history) {
        let context = KeyContext::new(history, key, records)?;
        stale_reads_of_key(&context)?;
    }
    Ok(())
}

fn by_key(history: &History) -> BTreeMap<&Bytes, Vec<&Record>> {
    let mut keys: BTreeMap<&Bytes, Vec<&Record>> = BTreeMap::new();
    for record in history.records() {
        keys.entry(record.op.key()).or_default().push(record);
    }
    keys
}

/// One key's records and what the static checks learned about its writes.
struct KeyContext<'h> {
    history: &'h History,
    key: &'h Bytes,
    /// The key's records, in invocation order.
    records: Vec<&'h Record>,
    /// The write that wrote each value: a Put or Cas that did not fail and
    /// did not mismatch.
    writer_of: BTreeMap<&'h Bytes, OpId>,
    /// The write that owns each version seen in an answer.
    claims: Claims,
    /// For each version in `claims`: its write and the answer that showed it.
    owners: BTreeMap<u64, (OpId, OpId)>,
}

impl<'h> KeyContext<'h> {
    /// Gathers the key's writes and checks the static rules.
    fn new(
        history: &'h History,
        key: &'h Bytes,
        records: Vec<&'h Record>,
    ) -> Result<Self, Violation> {
        let mut writer_of = BTreeMap::new();
        for record in &records {
            let wrote_nothing = matches!(
                record.answer(),
                Some((Outcome::Failed | Outcome::Mismatch { .. }, _))
            );
            if let (Some(value), false) = (record.op.written_value(), wrote_nothing) {
                writer_of.insert(value, record.id);
            }
        }
        let mut context = KeyContext {
            history,
            key,
            records,
            writer_of,
            claims: Claims::default(),
            owners: BTreeMap::new(),
        };
        context.check_versions()?;
        Ok(context)
    }

    fn violation(&self, reason: Reason, ops: impl IntoIterator<Item = OpId>) -> Violation {
        Violation {
            key: self.key.clone(),
            reason,
            excerpt: Excerpt::of(self.history, ops),
            earlier_unanswered: Vec::new(),
        }
    }

    /// Every read names a real, earlier write, and every write has one
    /// version that no other write has.
    fn check_versions(&mut self) -> Result<(), Violation> {
        // (version, where it was seen) per write, and (write, where) per version.
        let mut version_of: BTreeMap<OpId, (u64, OpId)> = BTreeMap::new();
        let mut owner_of: BTreeMap<u64, (OpId, OpId)> = BTreeMap::new();
        for record in &self.records {
            let Some((outcome, answered_seq)) = record.answer() else {
                continue;
            };
            let (write, version) = match outcome {
                Outcome::Written { version } => (record.id, *version),
                Outcome::Found { value, version } => {
                    let Some(&write) = self.writer_of.get(value) else {
                        return Err(
                            self.violation(Reason::NeverWritten { read: record.id }, [record.id])
                        );
                    };
                    if self.history.record(write).invoke_seq > answered_seq {
                        let reason = Reason::ReadFromFuture {
                            read: record.id,
                            write,
                        };
                        return Err(self.violation(reason, [record.id, write]));
                    }
                    (write, *version)
                }
                _ => continue,
            };
            if version == 0 {
                return Err(
                    self.violation(Reason::ZeroVersion { op: record.id }, [write, record.id])
                );
            }
            let seen = *version_of.entry(write).or_insert((version, record.id));
            if seen.0 != version {
                let reason = Reason::VersionConflict {
                    write,
                    first: seen,
                    second: (version, record.id),
                };
                return Err(self.violation(reason, [write, seen.1, record.id]));
            }
            let owner = *owner_of.entry(version).or_insert((write, record.id));
            if owner.0 != write {
                let reason = Reason::DuplicateVersion {
                    version,
                    first: owner,
                    second: (write, record.id),
                };
                return Err(self.violation(reason, [owner.0, owner.1, write, record.id]));
            }
        }
        self.claims = Claims(
            owner_of
                .iter()
                .map(|(version, (write, _))| (*version, slot(*write)))
                .collect(),
        );
        self.owners = owner_of;
        Ok(())
    }

    /// The search's view of the key's operations: stale reads, failed
    /// operations and unanswered reads left out.
    fn search_ops(&self) -> Vec<KeyOp> {
        self.records
            .iter()
            .filter_map(|record| {
                let answer = record.answer();
                let action = self.action(record, answer.map(|(outcome, _)| outcome))?;
                Some(KeyOp {
                    record: slot(record.id),
                    call: record.invoke_seq,
                    ret: answer.map(|(_, seq)| seq),
                    action,
                })
            })
            .collect()
    }

    fn action(&self, record: &Record, outcome: Option<&Outcome>) -> Option<Action> {
        let write = slot(record.id);
        let action = match (&record.op, outcome) {
            (_, Some(Outcome::Failed)) => return None,
            (
                Op::Get {
                    consistency: Consistency::Stale,
                    ..
                },
                _,
            )
            | (Op::Get { .. }, None) => return None,
            (Op::Get { .. }, Some(Outcome::Found { value, version })) => Action::Get(Read::Found {
                // Static checks ran first; a missing writer matches no state.
                write: self.writer_of.get(value).map_or(NO_WRITE, |id| slot(*id)),
                version: *version,
            }),
            (Op::Get { .. }, Some(_)) => Action::Get(Read::NotFound),
            (Op::Put { .. }, outcome) => Action::Put {
                write,
                version: match outcome {
                    Some(Outcome::Written { version }) => Some(*version),
                    _ => None,
                },
            },
            (
                Op::Cas {
                    expected_version, ..
                },
                outcome,
            ) => Action::Cas {
                write,
                expected: *expected_version,
                result: match outcome {
                    None => None,
                    Some(Outcome::Mismatch { current_version }) => {
                        Some(CasResult::Mismatch(*current_version))
                    }
                    Some(Outcome::Written { version }) => Some(CasResult::Written(*version)),
                    Some(other) => unreachable!("History::complete refuses {other} for a cas"),
                },
            },
            (
                Op::Delete {
                    expected_version, ..
                },
                outcome,
            ) => Action::Delete {
                expected: *expected_version,
                result: match outcome {
                    None => None,
                    Some(Outcome::Mismatch { current_version }) => {
                        Some(DeleteResult::Mismatch(*current_version))
                    }
                    Some(Outcome::Deleted { found }) => {
                        Some(DeleteResult::Deleted { found: *found })
                    }
                    Some(other) => unreachable!("History::complete refuses {other} for a delete"),
                },
            },
        };
        Some(action)
    }
}

/// The model's name for a write: its index in the history.
fn slot(id: OpId) -> u32 {
    id.index() as u32
}

/// A write no state ever holds.
const NO_WRITE: u32 = u32::MAX;

/// Steps per operation, plus a base, for the first search of a key. A
/// linearizable history rarely needs more than a few per operation. When
/// this runs out, short windows around where the search got stuck are
/// tried before the full budget is spent: ruling out every order of a long
/// history that is not linearizable can take the full search a long time,
/// while a window of a few operations shows the violation in a few steps.
const QUICK_STEPS_PER_OP: u64 = 8;
const QUICK_STEPS_BASE: u64 = 1_000;

/// Searches the key's sub-history for a linearization; on failure, makes
/// the excerpt.
fn linearizable_key(context: &KeyContext, limits: &Limits) -> Result<(), CheckError> {
    let claims = &context.claims;
    let whole = Window::whole(without_unobserved_unanswered(context.search_ops(), claims));
    let quick_steps = limits
        .steps_per_key
        .min(QUICK_STEPS_PER_OP * whole.ops.len() as u64 + QUICK_STEPS_BASE);
    let mut trials = Trials::new(claims, limits);
    let mut result = whole.search(claims, quick_steps);
    if let SearchResult::OutOfSteps(reach) = result {
        if let Some(window) = failing_window(&whole, reach.stuck_at, &mut trials) {
            let excerpt = drop_unobserved(window, &mut trials);
            return Err(CheckError::Violation(not_linearizable(
                context, &whole, reach, &excerpt,
            )));
        }
        if quick_steps < limits.steps_per_key {
            result = whole.search(claims, limits.steps_per_key);
        }
    }
    match result {
        SearchResult::Linearizable => Ok(()),
        SearchResult::OutOfSteps(_) => Err(CheckError::Inconclusive(Inconclusive {
            key: context.key.clone(),
            steps: limits.steps_per_key,
            ops: whole.ops.len(),
        })),
        SearchResult::NotLinearizable(reach) => {
            let excerpt = match failing_window(&whole, reach.stuck_at, &mut trials) {
                Some(window) => window,
                None => shortest_failing_prefix(&whole, &mut trials),
            };
            let excerpt = drop_unobserved(excerpt, &mut trials);
            Err(CheckError::Violation(not_linearizable(
                context, &whole, reach, &excerpt,
            )))
        }
    }
}

fn not_linearizable(
    context: &KeyContext,
    whole: &Window,
    reach: Reach,
    excerpt: &Window,
) -> Violation {
    let id = |record: u32| context.history.records()[record as usize].id;
    let reason = Reason::NotLinearizable {
        placed: reach.placed,
        answered: whole.ops.iter().filter(|op| op.ret.is_some()).count(),
        stuck_at: reach.stuck_at.map(id),
        mid_history: excerpt.before > 0,
    };
    // The writes of the values read are shown too, even when they came
    // before a window: the window fails from any state they left, so adding
    // them in front keeps the excerpt failing, and a reader wants to see them.
    let writes: BTreeSet<u32> = excerpt
        .ops
        .iter()
        .filter_map(|op| match op.action {
            Action::Get(Read::Found { write, .. }) if write != NO_WRITE => Some(write),
            _ => None,
        })
        .collect();
    let (shown, earlier): (Vec<&KeyOp>, Vec<&KeyOp>) = excerpt
        .ops
        .iter()
        .partition(|op| op.record >= excerpt.before || writes.contains(&op.record));
    // So are the owners of the versions the shown operations name, and the
    // answers that showed them: the model refuses an unseen version that
    // another write owns, and a reader must see why. Adding them keeps the
    // excerpt failing too: each came before the excerpt, or after its end,
    // or is in it, or is a write nothing in it observes, or is a read. An
    // owner shown with its answer names versions of its own (a Cas's
    // expected one), so their owners are shown too, until none is new.
    let mut shown: BTreeSet<OpId> = shown
        .iter()
        .map(|op| op.record)
        .chain(writes.iter().copied())
        .map(id)
        .collect();
    let named = |record: u32| {
        whole
            .ops
            .iter()
            .find(|op| op.record == record)
            .and_then(|op| op.action.version_seen())
    };
    let mut unchased: Vec<OpId> = shown.iter().copied().collect();
    while let Some(op) = unchased.pop() {
        let owners = named(slot(op))
            .and_then(|version| context.owners.get(&version))
            .map(|(write, evidence)| [*write, *evidence]);
        for owner in owners.into_iter().flatten() {
            if shown.insert(owner) {
                unchased.push(owner);
            }
        }
    }
    let earlier = earlier
        .iter()
        .map(|op| id(op.record))
        .filter(|op| !shown.contains(op))
        .collect();
    let mut violation = context.violation(reason, shown);
    violation.earlier_unanswered = earlier;
    violation
}
