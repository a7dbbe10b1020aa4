//! The Wing-Gong/Lowe search for a linearization of one key's operations,
//! on the porcupine entry list, memoised (see the parent module's doc).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::model::{Action, Claims, KeyOp, Model, Read, Register};

#[derive(Clone, Copy, Debug)]
pub(super) enum SearchResult {
    Linearizable,
    NotLinearizable(Reach),
    OutOfSteps(Reach),
}

/// How far a search got.
#[derive(Clone, Copy, Debug)]
pub(super) struct Reach {
    /// Most answered operations placed in one valid order.
    pub(super) placed: usize,
    /// History index of the earliest-answered operation left at the first
    /// dead end of that longest order.
    pub(super) stuck_at: Option<u32>,
}

/// Searches `ops` (by invocation) for a linearization, from an absent key,
/// or from whatever writes with a history index below `before` left when
/// that is not 0.
pub(super) fn search(ops: &[KeyOp], before: u32, claims: &Claims, max_steps: u64) -> SearchResult {
    Search::new(ops, before, claims).run(max_steps)
}

const HEAD: u32 = 0;
const NIL: u32 = u32::MAX;

/// The porcupine entry list: a call and (if answered) a return entry per
/// operation, in event order, doubly linked so that placing an operation
/// unlinks its two entries and backtracking relinks them in O(1).
struct Entries {
    next: Vec<u32>,
    prev: Vec<u32>,
    /// Operation of each entry (entry 0 is the head and has none).
    op: Vec<u32>,
    is_call: Vec<bool>,
    call_of: Vec<u32>,
    return_of: Vec<u32>,
}

impl Entries {
    fn new(ops: &[KeyOp]) -> Entries {
        let mut events: Vec<(u64, u32, bool)> = Vec::with_capacity(2 * ops.len());
        for (index, op) in ops.iter().enumerate() {
            events.push((op.call, index as u32, true));
            if let Some(ret) = op.ret {
                events.push((ret, index as u32, false));
            }
        }
        events.sort_unstable();
        let count = events.len() + 1;
        let mut entries = Entries {
            next: (1..=count as u32)
                .map(|next| if next as usize == count { NIL } else { next })
                .collect(),
            prev: (0..count as u32)
                .map(|entry| entry.wrapping_sub(1))
                .collect(),
            op: vec![NIL; count],
            is_call: vec![false; count],
            call_of: vec![NIL; ops.len()],
            return_of: vec![NIL; ops.len()],
        };
        for (position, (_, op, is_call)) in events.into_iter().enumerate() {
            let entry = position as u32 + 1;
            entries.op[entry as usize] = op;
            entries.is_call[entry as usize] = is_call;
            if is_call {
                entries.call_of[op as usize] = entry;
            } else {
                entries.return_of[op as usize] = entry;
            }
        }
        entries
    }

    fn first(&self) -> u32 {
        self.next[HEAD as usize]
    }

    fn lift(&mut self, op: u32) {
        self.unlink(self.call_of[op as usize]);
        let ret = self.return_of[op as usize];
        if ret != NIL {
            self.unlink(ret);
        }
    }

    /// Undoes the latest `lift` still in effect.
    fn unlift(&mut self, op: u32) {
        let ret = self.return_of[op as usize];
        if ret != NIL {
            self.relink(ret);
        }
        self.relink(self.call_of[op as usize]);
    }

    fn unlink(&mut self, entry: u32) {
        let (prev, next) = (self.prev[entry as usize], self.next[entry as usize]);
        self.next[prev as usize] = next;
        if next != NIL {
            self.prev[next as usize] = prev;
        }
    }

    fn relink(&mut self, entry: u32) {
        let (prev, next) = (self.prev[entry as usize], self.next[entry as usize]);
        self.next[prev as usize] = entry;
        if next != NIL {
            self.prev[next as usize] = entry;
        }
    }
}

/// A set of operations, one bit each.
#[derive(Clone, Debug)]
struct Bitset(Vec<u64>);

impl Bitset {
    fn new(bits: usize) -> Bitset {
        Bitset(vec![0; bits.div_ceil(64)])
    }

    fn set(&mut self, bit: usize, on: bool) {
        let mask = 1u64 << (bit % 64);
        if on {
            self.0[bit / 64] |= mask;
        } else {
            self.0[bit / 64] &= !mask;
        }
    }

    fn is_subset_of(small: &[u64], large: &[u64]) -> bool {
        small.iter().zip(large).all(|(s, l)| s & !l == 0)
    }

    /// The set as a memo key: placed operations are mostly a prefix of the
    /// history, so leading full words are counted, not stored.
    fn compact(&self) -> Compact {
        let full = self.0.iter().take_while(|word| **word == u64::MAX).count();
        let end = self
            .0
            .iter()
            .rposition(|word| *word != 0)
            .map_or(full, |last| (last + 1).max(full));
        Compact {
            full_words: full as u32,
            rest: self.0[full..end].into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Compact {
    full_words: u32,
    rest: Box<[u64]>,
}

/// Unanswered operations that nothing tells apart: Puts and Cas writes
/// whose value no read returned and whose version no answer owns (grouped by
/// expected version for Cas), and Deletes (by expected version). Any member
/// of a class can stand in for any other invoked earlier, so the search
/// places a class's members only in invocation order. Without this, a dozen
/// lost writes that never took effect are tried in every combination.
struct Classes {
    /// Class of each operation; NIL for answered or distinguishable ones.
    class_of: Vec<u32>,
    /// Members of each class, by invocation.
    members: Vec<Vec<u32>>,
    /// How many members of each class are placed (always the first ones).
    placed: Vec<usize>,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum ClassKey {
    Put,
    Cas(u64),
    Delete(Option<u64>),
}

impl Classes {
    fn new(ops: &[KeyOp], claims: &Claims) -> Classes {
        let mut named: BTreeSet<u32> = claims.0.values().copied().collect();
        named.extend(ops.iter().filter_map(|op| match op.action {
            Action::Get(Read::Found { write, .. }) => Some(write),
            _ => None,
        }));
        let mut ids: BTreeMap<ClassKey, u32> = BTreeMap::new();
        let mut classes = Classes {
            class_of: vec![NIL; ops.len()],
            members: Vec::new(),
            placed: Vec::new(),
        };
        for (index, op) in ops.iter().enumerate() {
            let key = match op.action {
                _ if op.ret.is_some() => continue,
                Action::Put { write, .. } if !named.contains(&write) => ClassKey::Put,
                Action::Cas {
                    write, expected, ..
                } if !named.contains(&write) => ClassKey::Cas(expected),
                Action::Delete { expected, .. } => ClassKey::Delete(expected),
                _ => continue,
            };
            let next_id = ids.len() as u32;
            let class = *ids.entry(key).or_insert(next_id);
            if class == next_id {
                classes.members.push(Vec::new());
                classes.placed.push(0);
            }
            classes.class_of[index] = class;
            classes.members[class as usize].push(index as u32);
        }
        classes
    }

    /// Whether `op` may be placed now: it has no class, or every member of
    /// its class invoked before it is placed.
    fn is_next(&self, op: u32) -> bool {
        let class = self.class_of[op as usize];
        class == NIL || self.members[class as usize].get(self.placed[class as usize]) == Some(&op)
    }

    fn placed(&mut self, op: u32, on: bool) {
        let class = self.class_of[op as usize];
        if class != NIL {
            if on {
                self.placed[class as usize] += 1;
            } else {
                self.placed[class as usize] -= 1;
            }
        }
    }
}

/// A placed operation, to undo on backtracking.
struct Frame {
    op: u32,
    before: Register,
    /// Placed without trying alternatives (see `place_read_only`): when the
    /// state after it fails, so does the state before it.
    forced: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Trying answered operations.
    Answered,
    /// Then operations without an answer.
    Unanswered,
}

enum Attempt {
    Placed,
    /// Fits, but a state at least as capable was already explored.
    Explored,
    DoesNotFit,
}

struct Search<'a> {
    ops: &'a [KeyOp],
    model: Model<'a>,
    entries: Entries,
    /// Interchangeable unanswered operations (see [`Classes`]).
    classes: Classes,
    /// Each operation's bit, in `answered` or `unanswered`.
    bit: Vec<usize>,
    answered: Bitset,
    unanswered: Bitset,
    answered_total: usize,
    answered_left: usize,
    state: Register,
    stack: Vec<Frame>,
    /// States explored, keyed by placed answered operations and register,
    /// each with the unanswered sets they were explored with.
    memo: HashMap<(Compact, Register), Vec<Box<[u64]>>>,
    placed_most: usize,
    stuck_at: Option<u32>,
}

impl<'a> Search<'a> {
    fn new(ops: &'a [KeyOp], before: u32, claims: &'a Claims) -> Search<'a> {
        let (mut answered_total, mut unanswered_total) = (0, 0);
        let bit = ops
            .iter()
            .map(|op| {
                let counter = if op.ret.is_some() {
                    &mut answered_total
                } else {
                    &mut unanswered_total
                };
                *counter += 1;
                *counter - 1
            })
            .collect();
        Search {
            ops,
            model: Model { claims, before },
            entries: Entries::new(ops),
            classes: Classes::new(ops, claims),
            bit,
            answered: Bitset::new(answered_total),
            unanswered: Bitset::new(unanswered_total),
            answered_total,
            answered_left: answered_total,
            state: if before == 0 {
                Register::Absent
            } else {
                Register::Before { version: None }
            },
            stack: Vec::new(),
            memo: HashMap::new(),
            placed_most: 0,
            stuck_at: None,
        }
    }

    fn run(mut self, max_steps: u64) -> SearchResult {
        self.remember(self.state);
        let mut cursor = NIL;
        let mut phase = Phase::Answered;
        // A state just entered: forced placements come first.
        let mut fresh = true;
        let mut steps = 0;
        loop {
            if self.answered_left == 0 {
                return SearchResult::Linearizable;
            }
            if steps == max_steps {
                return SearchResult::OutOfSteps(self.reach());
            }
            if fresh {
                steps += 1;
                fresh = false;
                match self.place_read_only() {
                    Attempt::Placed => {
                        fresh = true;
                        continue;
                    }
                    Attempt::Explored => {
                        let Some(resume) = self.backtrack() else {
                            return self.failed();
                        };
                        (cursor, phase) = resume;
                        continue;
                    }
                    Attempt::DoesNotFit => {
                        cursor = self.entries.first();
                        phase = Phase::Answered;
                    }
                }
            }
            if cursor == NIL || !self.entries.is_call[cursor as usize] {
                if phase == Phase::Answered {
                    phase = Phase::Unanswered;
                    cursor = self.entries.first();
                    continue;
                }
                steps += 1;
                self.note_dead_end();
                let Some(resume) = self.backtrack() else {
                    return self.failed();
                };
                (cursor, phase) = resume;
                continue;
            }
            let op = self.entries.op[cursor as usize];
            let in_phase = self.ops[op as usize].ret.is_some() == (phase == Phase::Answered);
            if in_phase && matches!(self.try_place(op, false), Attempt::Placed) {
                fresh = true;
                continue;
            }
            cursor = self.entries.next[cursor as usize];
        }
    }

    fn failed(&self) -> SearchResult {
        SearchResult::NotLinearizable(self.reach())
    }

    fn reach(&self) -> Reach {
        Reach {
            placed: self.placed_most,
            stuck_at: self.stuck_at,
        }
    }

    /// Places the first callable read-only operation that fits and may go
    /// first without loss, if any. That is one that leaves the register as
    /// it is, or a read that names the write it saw: that write stays in the
    /// register until the read in any order. Not a mismatch that would bind
    /// an unseen version: in another order it may see a later write with
    /// that version. And nothing while the register is still what came
    /// before a window: a read that pins it down could rule out an order in
    /// which the key is first emptied and the write is placed again later.
    fn place_read_only(&mut self) -> Attempt {
        if matches!(self.state, Register::Before { .. }) {
            return Attempt::DoesNotFit;
        }
        let mut entry = self.entries.first();
        while entry != NIL && self.entries.is_call[entry as usize] {
            let op = self.entries.op[entry as usize];
            entry = self.entries.next[entry as usize];
            let action = self.ops[op as usize].action;
            if !action.is_read_only() {
                continue;
            }
            let Some(after) = action.step(self.state, &self.model) else {
                continue;
            };
            if after == self.state || matches!(action, Action::Get(Read::Found { .. })) {
                match self.try_place(op, true) {
                    Attempt::DoesNotFit => {}
                    placed_or_explored => return placed_or_explored,
                }
            }
        }
        Attempt::DoesNotFit
    }

    fn try_place(&mut self, op: u32, forced: bool) -> Attempt {
        if !self.classes.is_next(op) {
            return Attempt::DoesNotFit;
        }
        let action = self.ops[op as usize].action;
        let Some(after) = action.step(self.state, &self.model) else {
            return Attempt::DoesNotFit;
        };
        if self.ops[op as usize].ret.is_none()
            && (self.skips_unanswered_before(action, after) || !self.opens_a_way(op, after))
        {
            return Attempt::DoesNotFit;
        }
        self.mark(op, true);
        if !self.remember(after) {
            self.mark(op, false);
            return Attempt::Explored;
        }
        self.entries.lift(op);
        self.classes.placed(op, true);
        self.stack.push(Frame {
            op,
            before: self.state,
            forced,
        });
        self.state = after;
        if self.ops[op as usize].ret.is_some() {
            self.answered_left -= 1;
            let placed = self.answered_total - self.answered_left;
            if placed > self.placed_most {
                self.placed_most = placed;
                self.stuck_at = None;
            }
        }
        Attempt::Placed
    }

    /// True when the operation placed last has no answer either and `action`
    /// does as well without it: the pair would only narrow what can follow
    /// (a write or delete hides what came before it, except the version
    /// floor, which can only be higher). Without this, k such operations
    /// pending at once are tried in all 2^k subsets.
    fn skips_unanswered_before(&self, action: Action, after: Register) -> bool {
        let Some(previous) = self.stack.last() else {
            return false;
        };
        if self.ops[previous.op as usize].ret.is_some() {
            return false;
        }
        action
            .step(previous.before, &self.model)
            .is_some_and(|alone| alone.admits_all_of(after))
    }

    /// Whether placing the unanswered `op` (giving register `after`) lets
    /// some callable operation fit that gets nowhere without it. An answered
    /// write or delete that fits either way leads to the same register with
    /// fewer unanswered operations placed, which the memo would prune one
    /// step later; checking here saves entering the state at all. Without
    /// this, every unanswered write that never took effect is entered at
    /// every dead end.
    fn opens_a_way(&self, op: u32, after: Register) -> bool {
        let mut entry = self.entries.first();
        while entry != NIL && self.entries.is_call[entry as usize] {
            let other = self.entries.op[entry as usize];
            entry = self.entries.next[entry as usize];
            let action = self.ops[other as usize].action;
            if other == op {
                continue;
            }
            let Some(next) = action.step(after, &self.model) else {
                continue;
            };
            if action.is_read_only() {
                return true;
            }
            match action.step(self.state, &self.model) {
                None => return true,
                Some(alone)
                    if self.ops[other as usize].ret.is_none() && !alone.admits_all_of(next) =>
                {
                    return true
                }
                Some(_) => {}
            }
        }
        false
    }

    /// Undoes placements back to the latest one that has alternatives left;
    /// returns where to resume trying. None when there is none.
    fn backtrack(&mut self) -> Option<(u32, Phase)> {
        loop {
            let frame = self.stack.pop()?;
            self.mark(frame.op, false);
            self.entries.unlift(frame.op);
            self.classes.placed(frame.op, false);
            self.state = frame.before;
            if self.ops[frame.op as usize].ret.is_some() {
                self.answered_left += 1;
            }
            if !frame.forced {
                let phase = if self.ops[frame.op as usize].ret.is_some() {
                    Phase::Answered
                } else {
                    Phase::Unanswered
                };
                return Some((
                    self.entries.next[self.entries.call_of[frame.op as usize] as usize],
                    phase,
                ));
            }
        }
    }

    /// At the first dead end of the longest order, remembers which
    /// operation had to come next: the earliest-answered one left.
    fn note_dead_end(&mut self) {
        if self.answered_total - self.answered_left != self.placed_most || self.stuck_at.is_some() {
            return;
        }
        let mut entry = self.entries.first();
        while entry != NIL && self.entries.is_call[entry as usize] {
            entry = self.entries.next[entry as usize];
        }
        if entry != NIL {
            self.stuck_at = Some(self.ops[self.entries.op[entry as usize] as usize].record);
        }
    }

    fn mark(&mut self, op: u32, on: bool) {
        let bit = self.bit[op as usize];
        if self.ops[op as usize].ret.is_some() {
            self.answered.set(bit, on);
        } else {
            self.unanswered.set(bit, on);
        }
    }

    /// Records the state (current sets, register `state`) as explored;
    /// false if it, or the same with fewer unanswered operations placed,
    /// already was.
    fn remember(&mut self, state: Register) -> bool {
        let seen = self
            .memo
            .entry((self.answered.compact(), state))
            .or_default();
        if seen
            .iter()
            .any(|placed| Bitset::is_subset_of(placed, &self.unanswered.0))
        {
            return false;
        }
        seen.push(self.unanswered.0.clone().into_boxed_slice());
        true
    }
}
