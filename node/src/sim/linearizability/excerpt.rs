//! Parts of a key's history to search, and how an excerpt is made short.
//! Every step keeps a part whose failure implies the whole's: a prefix
//! (answers after the cut forgotten), a window (operations invoked from some
//! point on, from any state the earlier ones could leave), and removing
//! operations that change nothing or that nothing observes.

use super::model::{Action, Claims, DeleteResult, KeyOp, Read};
use super::search::{search, SearchResult};
use super::Limits;

/// A part of a key's sub-history, to search.
#[derive(Clone, Debug)]
pub(super) struct Window {
    /// The operations, by invocation.
    pub(super) ops: Vec<KeyOp>,
    /// History index of the first operation of a window that starts
    /// mid-history; 0 for one that starts at the beginning, absent.
    pub(super) before: u32,
}

impl Window {
    pub(super) fn whole(ops: Vec<KeyOp>) -> Window {
        Window { ops, before: 0 }
    }

    pub(super) fn search(&self, claims: &Claims, max_steps: u64) -> SearchResult {
        search(&self.ops, self.before, claims, max_steps)
    }

    /// The operations invoked before event `cut`, answers after it
    /// forgotten. A prefix of a linearizable history is linearizable, with
    /// any pending operation taking effect or not.
    pub(super) fn prefix(&self, cut: u64) -> Window {
        let ops = self
            .ops
            .iter()
            .filter(|op| op.call < cut)
            .filter_map(|op| match op.ret {
                Some(ret) if ret <= cut => Some(*op),
                _ => op.unanswered(),
            })
            .collect();
        Window {
            ops,
            before: self.before,
        }
    }

    /// The operations from the `first`-th on, and those still running when
    /// it was invoked (answers forgotten: each may have taken effect before
    /// or after that point). Cut any linearization of the history at that
    /// point: what follows is a linearization of this window, starting from
    /// what the earlier operations left, which [`super::model::Register::Before`] allows.
    pub(super) fn suffix(&self, first: usize) -> Window {
        if first == 0 {
            return self.clone();
        }
        let start = self.ops[first];
        let ops = self
            .ops
            .iter()
            .enumerate()
            .filter_map(|(index, op)| match op.ret {
                _ if index >= first => Some(*op),
                Some(ret) if ret < start.call => None,
                _ => op.unanswered(),
            })
            .collect();
        Window {
            ops,
            before: start.record,
        }
    }

    fn without(&self, dropped: &[usize]) -> Window {
        let ops = self
            .ops
            .iter()
            .enumerate()
            .filter(|(index, _)| dropped.binary_search(index).is_err())
            .map(|(_, op)| *op)
            .collect();
        Window {
            ops,
            before: self.before,
        }
    }
}

/// Searches run to make an excerpt, within the limits.
pub(super) struct Trials<'a> {
    claims: &'a Claims,
    searches_left: u32,
    steps_per_search: u64,
}

impl<'a> Trials<'a> {
    pub(super) fn new(claims: &'a Claims, limits: &Limits) -> Trials<'a> {
        Trials {
            claims,
            searches_left: limits.minimise_searches,
            steps_per_search: limits.steps_per_minimise_search,
        }
    }

    /// True when `window` is shown not to be linearizable; false when it
    /// is, or the budget ran out.
    pub(super) fn fails(&mut self, window: &Window) -> bool {
        if self.searches_left == 0 {
            return false;
        }
        self.searches_left -= 1;
        matches!(
            window.search(self.claims, self.steps_per_search),
            SearchResult::NotLinearizable(_)
        )
    }
}

/// The shortest failing window that ends where the search got stuck (or,
/// failing that, at the end): windows of 4, 8, 16, ... operations, then a
/// binary search between the last that passed and the first that failed.
pub(super) fn failing_window(
    whole: &Window,
    stuck_at: Option<u32>,
    trials: &mut Trials,
) -> Option<Window> {
    let stuck_end =
        stuck_at.and_then(|record| whole.ops.iter().find(|op| op.record == record)?.ret);
    let last_end = whole.ops.iter().filter_map(|op| op.ret).max();
    let mut ends: Vec<u64> = stuck_end.into_iter().chain(last_end).collect();
    ends.dedup();
    for end in ends {
        let prefix = whole.prefix(end);
        let count = prefix.ops.len();
        let mut passed = 0;
        let mut size = 4;
        loop {
            let size_now = size.min(count);
            if trials.fails(&prefix.suffix(count - size_now)) {
                let (mut low, mut high) = (passed + 1, size_now);
                while low < high {
                    let middle = (low + high) / 2;
                    if trials.fails(&prefix.suffix(count - middle)) {
                        high = middle;
                    } else {
                        low = middle + 1;
                    }
                }
                return Some(prefix.suffix(count - high));
            }
            if size_now == count || trials.searches_left == 0 {
                break;
            }
            passed = size_now;
            size *= 2;
        }
    }
    None
}

/// Prefix failure is monotone in the cut: binary search over the answer
/// events for the shortest failing prefix.
pub(super) fn shortest_failing_prefix(whole: &Window, trials: &mut Trials) -> Window {
    let mut cuts: Vec<u64> = whole.ops.iter().filter_map(|op| op.ret).collect();
    cuts.sort_unstable();
    let (mut low, mut high) = (0, cuts.len());
    let mut best = whole.clone();
    while low < high {
        let middle = (low + high) / 2;
        let candidate = whole.prefix(cuts[middle]);
        if trials.fails(&candidate) {
            high = middle;
            best = candidate;
        } else {
            low = middle + 1;
        }
    }
    best
}

/// Delta debugging over the operations that may be dropped, largest chunks
/// first.
pub(super) fn drop_unobserved(mut window: Window, trials: &mut Trials) -> Window {
    let mut chunk = usize::MAX;
    loop {
        let droppable = droppable(&window.ops, trials.claims);
        if droppable.is_empty() {
            return window;
        }
        chunk = chunk.min(droppable.len().div_ceil(2));
        let dropped = droppable.chunks(chunk).find_map(|group| {
            let candidate = window.without(group);
            trials.fails(&candidate).then_some(candidate)
        });
        match dropped {
            Some(candidate) => window = candidate,
            None if chunk == 1 || trials.searches_left == 0 => return window,
            None => chunk = chunk.div_ceil(2),
        }
    }
}

/// Indices (ascending) of operations whose removal cannot make a
/// linearizable history fail: read-only operations, and Put or Cas writes
/// that no remaining operation could have observed. A write is observed by
/// a later or concurrent operation that reads its value, names a version it
/// may have, or deletes what might be it (unless an answered write or
/// delete certainly came between the two). Left unobserved, a write is at
/// once replaced in any order, and the write that replaces it needs only
/// a version above an older, lower one. (Removing such writes in invocation
/// order keeps each one unobserved, so a whole group may go at once.)
/// Deletes stay: a version after a delete may be lower than before it.
fn droppable(ops: &[KeyOp], claims: &Claims) -> Vec<usize> {
    let observers = Observers::new(ops, claims);
    (0..ops.len())
        .filter(|&index| {
            ops[index].action.is_read_only()
                || (ops[index].action.write().is_some() && !observers.see(index))
        })
        .collect()
}

/// The key's operations without the unanswered Put and Cas writes that no
/// operation could observe (see [`droppable`]). Left in, each would be tried
/// at every dead end of the search, for nothing: a write that was never
/// applied is usually never observed.
pub(super) fn without_unobserved_unanswered(ops: Vec<KeyOp>, claims: &Claims) -> Vec<KeyOp> {
    let observers = Observers::new(&ops, claims);
    let keep: Vec<bool> = (0..ops.len())
        .map(|index| {
            ops[index].ret.is_some() || ops[index].action.write().is_none() || observers.see(index)
        })
        .collect();
    ops.into_iter()
        .zip(keep)
        .filter_map(|(op, keep)| keep.then_some(op))
        .collect()
}

/// Answers "could any operation observe this write?" for [`droppable`].
struct Observers<'a> {
    ops: &'a [KeyOp],
    claims: &'a Claims,
    /// Answered effects, (invoked, answered), by invocation.
    effects: Vec<(u64, u64)>,
    /// The earliest answer among `effects[i..]`.
    earliest_answer: Vec<u64>,
}

impl<'a> Observers<'a> {
    fn new(ops: &'a [KeyOp], claims: &'a Claims) -> Observers<'a> {
        let mut effects: Vec<(u64, u64)> = ops
            .iter()
            .filter(|op| op.action.is_definite_effect())
            .map(|op| (op.call, op.ret.expect("an effect is answered")))
            .collect();
        effects.sort_unstable();
        let mut earliest_answer = vec![u64::MAX; effects.len() + 1];
        for index in (0..effects.len()).rev() {
            earliest_answer[index] = earliest_answer[index + 1].min(effects[index].1);
        }
        Observers {
            ops,
            claims,
            effects,
            earliest_answer,
        }
    }

    /// An answered write or delete certainly came after `write` and before
    /// `reader`.
    fn overwritten_before(&self, write: &KeyOp, reader: &KeyOp) -> bool {
        write.ret.is_some_and(|ret| {
            let after = self.effects.partition_point(|(call, _)| *call <= ret);
            self.earliest_answer[after] < reader.call
        })
    }

    /// Whether another operation could observe the Put or Cas `ops[index]`.
    fn see(&self, index: usize) -> bool {
        let candidate = &self.ops[index];
        let Some((id, exact)) = candidate.action.write() else {
            return false;
        };
        let may_be = |version: u64| {
            version != 0
                && match exact {
                    Some(exact) => version == exact,
                    None => self.claims.allows(version, id),
                }
        };
        self.ops.iter().any(|other| {
            if other.record == candidate.record || other.precedes(candidate) {
                return false;
            }
            // A read of the value or version of a write that was certainly
            // overwritten is impossible, but the write explains the read, so
            // it stays.
            let reads_it =
                matches!(other.action, Action::Get(Read::Found { write, .. }) if write == id);
            let removes_it = matches!(
                other.action,
                Action::Delete {
                    result: Some(DeleteResult::Deleted { found: true }),
                    ..
                }
            ) && !self.overwritten_before(candidate, other);
            reads_it || removes_it || other.action.version_seen().is_some_and(may_be)
        })
    }
}
