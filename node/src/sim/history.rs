//! The history of a simulated run: every operation a client invoked, when,
//! and what it got back, in the order the simulator saw it happen.
//!
//! Real-time order comes from event sequence numbers, not from ticks: every
//! invocation and every answer takes the next number, so operation A
//! precedes B exactly when A's answer was recorded before B was invoked.
//! Two events in the same tick are therefore still ordered, as the
//! simulator ran them. Ticks are kept for people reading an excerpt.
//!
//! An operation ends in one of three ways:
//!
//! ```text
//!   invoke --complete(outcome)--> Answered  (a definite result, or Failed:
//!      |                                      definitely not applied)
//!      +------unknown(time)-----> GaveUp    (the client stopped waiting)
//!      +------(nothing)---------> Pending   (the run ended first)
//! ```
//!
//! GaveUp and Pending mean the same to the checker: the operation may take
//! effect at any point after its invocation, even after the client gave up
//! (it may sit in a Raft log until a later leader applies it), or never.
//!
//! The checker identifies a write by its value, so every Put and Cas of a key
//! must carry a value no other write of that key carries; `invoke` asserts it.
//! A client library's retries of one logical write are one operation here.

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;

/// A simulated client; the checker's per-client rules (monotonic stale
/// reads) are keyed by it.
pub type ClientId = u64;

/// Position of an operation in its [`History`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpId(u32);

impl OpId {
    /// Index of the operation in [`History::records`].
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// How fresh a Get must be, as the client asked for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    /// Raft ReadIndex: must be linearizable.
    Linearizable,
    /// Leader lease: must be linearizable too (while clocks behave).
    Lease,
    /// Any replica's local state: only monotonic per client, and only ever
    /// a value that some write wrote.
    Stale,
}

/// What a client asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Write `value`, creating or replacing the key.
    Put {
        /// The key.
        key: Bytes,
        /// The value, unique among this key's writes.
        value: Bytes,
    },
    /// Write `value` only if the key's version is `expected_version`
    /// (0: only if absent).
    Cas {
        /// The key.
        key: Bytes,
        /// The version the key must have.
        expected_version: u64,
        /// The value, unique among this key's writes.
        value: Bytes,
    },
    /// Remove the key; with `expected_version`, only if its version is that.
    Delete {
        /// The key.
        key: Bytes,
        /// The version the key must have, if any.
        expected_version: Option<u64>,
    },
    /// Read the key.
    Get {
        /// The key.
        key: Bytes,
        /// How fresh the answer must be.
        consistency: Consistency,
    },
}

impl Op {
    /// The key the operation touches.
    pub fn key(&self) -> &Bytes {
        match self {
            Op::Put { key, .. } | Op::Cas { key, .. } | Op::Delete { key, .. } => key,
            Op::Get { key, .. } => key,
        }
    }

    /// The value the operation writes, if it writes one.
    pub fn written_value(&self) -> Option<&Bytes> {
        match self {
            Op::Put { value, .. } | Op::Cas { value, .. } => Some(value),
            Op::Delete { .. } | Op::Get { .. } => None,
        }
    }

    fn fits(&self, outcome: &Outcome) -> bool {
        matches!(
            (self, outcome),
            (_, Outcome::Failed)
                | (Op::Put { .. }, Outcome::Written { .. })
                | (
                    Op::Cas { .. },
                    Outcome::Written { .. } | Outcome::Mismatch { .. }
                )
                | (
                    Op::Delete { .. },
                    Outcome::Deleted { .. } | Outcome::Mismatch { .. }
                )
                | (Op::Get { .. }, Outcome::Found { .. } | Outcome::NotFound)
        )
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Put { key, value } => write!(f, "put {} {}", Quoted(key), Quoted(value)),
            Op::Cas {
                key,
                expected_version,
                value,
            } => write!(
                f,
                "cas {} if v{expected_version} {}",
                Quoted(key),
                Quoted(value)
            ),
            Op::Delete {
                key,
                expected_version: None,
            } => write!(f, "delete {}", Quoted(key)),
            Op::Delete {
                key,
                expected_version: Some(expected),
            } => write!(f, "delete {} if v{expected}", Quoted(key)),
            Op::Get { key, consistency } => {
                write!(f, "get {}", Quoted(key))?;
                match consistency {
                    Consistency::Linearizable => Ok(()),
                    Consistency::Lease => f.write_str(" (lease)"),
                    Consistency::Stale => f.write_str(" (stale)"),
                }
            }
        }
    }
}

/// A definite answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Put or Cas applied; the key now has `version`.
    Written {
        /// The version the write produced.
        version: u64,
    },
    /// Cas or Delete did nothing because the key had `current_version`.
    Mismatch {
        /// The key's version when the operation was applied (0: absent).
        current_version: u64,
    },
    /// Delete applied; `found` says whether the key existed.
    Deleted {
        /// Whether there was something to remove.
        found: bool,
    },
    /// Get saw the key.
    Found {
        /// The value read.
        value: Bytes,
        /// The version read.
        version: u64,
    },
    /// Get saw no key.
    NotFound,
    /// An error that guarantees the operation was not applied (NotLeader,
    /// Unavailable before proposing): the operation had no effect.
    Failed,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Written { version } => write!(f, "written v{version}"),
            Outcome::Mismatch { current_version } => {
                write!(f, "mismatch, current v{current_version}")
            }
            Outcome::Deleted { found: true } => f.write_str("deleted"),
            Outcome::Deleted { found: false } => f.write_str("deleted, was absent"),
            Outcome::Found { value, version } => write!(f, "found {} v{version}", Quoted(value)),
            Outcome::NotFound => f.write_str("not found"),
            Outcome::Failed => f.write_str("failed, not applied"),
        }
    }
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// No answer when the run ended: outcome unknown.
    Pending,
    /// The client stopped waiting at `time`: outcome unknown, and the
    /// operation may still take effect later.
    GaveUp {
        /// Tick at which the client gave up.
        time: u64,
    },
    /// An answer arrived.
    Answered {
        /// The answer.
        outcome: Outcome,
        /// Tick of the answer.
        time: u64,
        /// Event sequence number of the answer.
        seq: u64,
    },
}

/// One operation of a history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Its position in the history.
    pub id: OpId,
    /// Who invoked it.
    pub client: ClientId,
    /// What was asked.
    pub op: Op,
    /// Tick of the invocation.
    pub invoke_time: u64,
    /// Event sequence number of the invocation.
    pub invoke_seq: u64,
    /// How it ended.
    pub end: End,
}

impl Record {
    /// The answer and its event sequence number, if a definite one arrived.
    pub fn answer(&self) -> Option<(&Outcome, u64)> {
        match &self.end {
            End::Answered { outcome, seq, .. } => Some((outcome, *seq)),
            End::Pending | End::GaveUp { .. } => None,
        }
    }

    /// True when `self` was answered before `other` was invoked, so every
    /// linearization puts `self` first.
    pub fn precedes(&self, other: &Record) -> bool {
        self.answer().is_some_and(|(_, seq)| seq < other.invoke_seq)
    }
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} client {}: {} -> ", self.id, self.client, self.op)?;
        match &self.end {
            End::Pending => write!(f, "no answer [t {}..]", self.invoke_time),
            End::GaveUp { time } => {
                write!(f, "gave up at t {time} [t {}..]", self.invoke_time)
            }
            End::Answered { outcome, time, .. } => {
                write!(f, "{outcome} [t {}..{time}]", self.invoke_time)
            }
        }
    }
}

/// Some operations of a history, in invocation order, for a report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Excerpt {
    /// The operations, ordered by invocation.
    pub records: Vec<Record>,
}

impl Excerpt {
    /// The operations `ids` of `history`, in invocation order, each once.
    pub fn of(history: &History, ids: impl IntoIterator<Item = OpId>) -> Excerpt {
        let mut ids: Vec<OpId> = ids.into_iter().collect();
        // Ids grow with invocation order, so sorting them sorts by invocation.
        ids.sort_unstable();
        ids.dedup();
        Excerpt {
            records: ids
                .into_iter()
                .map(|id| history.record(id).clone())
                .collect(),
        }
    }
}

impl fmt::Display for Excerpt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for record in &self.records {
            writeln!(f, "  {record}")?;
        }
        Ok(())
    }
}

/// The record of a run. Deterministic: its content and its printed form
/// depend only on the calls made, in their order.
#[derive(Clone, Debug, Default)]
pub struct History {
    records: Vec<Record>,
    /// Sequence number of the next event (invocation or answer).
    next_seq: u64,
    /// Tick of the latest event; ticks must not go backwards.
    last_time: u64,
    /// Which operation writes each (key, value), to keep values unique.
    writers: BTreeMap<(Bytes, Bytes), OpId>,
}

impl History {
    /// An empty history.
    pub fn new() -> History {
        History::default()
    }

    /// Records that `client` invoked `op` at tick `time`.
    ///
    /// # Panics
    ///
    /// Panics if `time` is earlier than the previous event's, or if `op`
    /// writes a value that an earlier write of the same key wrote (the
    /// checker tells writes apart by value).
    pub fn invoke(&mut self, client: ClientId, op: Op, time: u64) -> OpId {
        let seq = self.next_event(time);
        let id = OpId(u32::try_from(self.records.len()).expect("a history holds < 2^32 ops"));
        if let Some(value) = op.written_value() {
            let previous = self.writers.insert((op.key().clone(), value.clone()), id);
            if let Some(previous) = previous {
                panic!(
                    "{id} writes {} to key {} as {previous} did: give every write of a key its own value",
                    Quoted(value),
                    Quoted(op.key())
                );
            }
        }
        self.records.push(Record {
            id,
            client,
            op,
            invoke_time: time,
            invoke_seq: seq,
            end: End::Pending,
        });
        id
    }

    /// Records the answer to `id` at tick `time`.
    ///
    /// # Panics
    ///
    /// Panics if `id` already ended, if `outcome` cannot answer its kind of
    /// operation (a Found for a Put), or if `time` goes backwards.
    pub fn complete(&mut self, id: OpId, outcome: Outcome, time: u64) {
        let seq = self.next_event(time);
        let record = self.pending(id);
        assert!(
            record.op.fits(&outcome),
            "{id} ({}) cannot be answered with {outcome}",
            record.op
        );
        record.end = End::Answered { outcome, time, seq };
    }

    /// Records that the client stopped waiting for `id` at tick `time`
    /// (timeout, lost connection, crash): its outcome is unknown.
    ///
    /// # Panics
    ///
    /// Panics if `id` already ended or if `time` goes backwards.
    pub fn unknown(&mut self, id: OpId, time: u64) {
        // No sequence number: giving up orders nothing, the operation may
        // still be applied later.
        self.advance_time(time);
        self.pending(id).end = End::GaveUp { time };
    }

    /// Every operation, in invocation order.
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// The operation `id`.
    pub fn record(&self, id: OpId) -> &Record {
        &self.records[id.index()]
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when nothing was invoked.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    fn next_event(&mut self, time: u64) -> u64 {
        self.advance_time(time);
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    fn advance_time(&mut self, time: u64) {
        assert!(
            time >= self.last_time,
            "history ticks must not go backwards, last event at t {}, new event at t {time}",
            self.last_time
        );
        self.last_time = time;
    }

    fn pending(&mut self, id: OpId) -> &mut Record {
        let record = &mut self.records[id.index()];
        assert!(record.end == End::Pending, "{id} already ended: {record}");
        record
    }
}

/// Bytes printed as a quoted string, non-printable bytes escaped.
pub(crate) struct Quoted<'a>(pub(crate) &'a [u8]);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.0.escape_ascii())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str) -> Op {
        Op::Put {
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::copy_from_slice(value.as_bytes()),
        }
    }

    fn get(key: &str) -> Op {
        Op::Get {
            key: Bytes::copy_from_slice(key.as_bytes()),
            consistency: Consistency::Stale,
        }
    }

    #[test]
    fn real_time_order_follows_events_not_ticks() {
        let mut history = History::new();
        let write = history.invoke(1, put("k", "a"), 5);
        history.complete(write, Outcome::Written { version: 3 }, 5);
        let read = history.invoke(2, get("k"), 5);
        let concurrent = history.invoke(3, get("k"), 5);
        history.complete(read, Outcome::NotFound, 6);
        let (write, read, concurrent) = (
            history.record(write),
            history.record(read),
            history.record(concurrent),
        );
        assert!(
            write.precedes(read),
            "answered before the read was invoked, same tick"
        );
        assert!(!read.precedes(write));
        assert!(!read.precedes(concurrent), "overlapping");
        assert!(!concurrent.precedes(read), "never answered");
    }

    #[test]
    fn records_print_client_op_answer_and_ticks() {
        let mut history = History::new();
        let a = history.invoke(7, put("k", "a\n"), 10);
        let b = history.invoke(8, get("k"), 11);
        let c = history.invoke(9, put("k", "c"), 12);
        history.complete(a, Outcome::Written { version: 4 }, 15);
        history.unknown(b, 20);
        let excerpt = Excerpt::of(&history, [c, a, b, a]);
        assert_eq!(
            excerpt.to_string(),
            "  #0 client 7: put \"k\" \"a\\n\" -> written v4 [t 10..15]\n\
             \x20 #1 client 8: get \"k\" (stale) -> gave up at t 20 [t 11..]\n\
             \x20 #2 client 9: put \"k\" \"c\" -> no answer [t 12..]\n"
        );
    }

    #[test]
    #[should_panic(expected = "give every write of a key its own value")]
    fn a_value_written_twice_to_a_key_is_refused() {
        let mut history = History::new();
        history.invoke(1, put("k", "a"), 0);
        history.invoke(2, put("k", "a"), 0);
    }

    #[test]
    fn the_same_value_may_go_to_different_keys() {
        let mut history = History::new();
        history.invoke(1, put("k", "a"), 0);
        history.invoke(2, put("j", "a"), 0);
        assert_eq!(history.len(), 2);
    }

    #[test]
    #[should_panic(expected = "cannot be answered with found")]
    fn an_answer_of_the_wrong_kind_is_refused() {
        let mut history = History::new();
        let id = history.invoke(1, put("k", "a"), 0);
        history.complete(
            id,
            Outcome::Found {
                value: Bytes::from_static(b"a"),
                version: 1,
            },
            1,
        );
    }

    #[test]
    #[should_panic(expected = "already ended")]
    fn an_operation_ends_once() {
        let mut history = History::new();
        let id = history.invoke(1, get("k"), 0);
        history.unknown(id, 1);
        history.complete(id, Outcome::NotFound, 2);
    }

    #[test]
    #[should_panic(expected = "ticks must not go backwards")]
    fn ticks_must_not_go_backwards() {
        let mut history = History::new();
        history.invoke(1, get("k"), 5);
        history.invoke(2, get("k"), 4);
    }
}
