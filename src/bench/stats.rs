//! What the workers measure: latency histograms and outcome counts per
//! operation type, the per-second tick for the progress line, the timeline
//! for --plot, and how the threads' results merge into one.

use std::collections::BTreeMap;
use std::time::Instant;

use hdrhistogram::Histogram;

use super::timeline::Timeline;

/// Highest latency the histograms hold; slower operations count as this.
const LATENCY_MAX_US: u64 = 60_000_000;
/// Significant digits of the latency histograms (0.1 % resolution).
const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, LATENCY_SIGNIFICANT_DIGITS)
        .expect("latency histogram bounds are valid constants")
}

fn merge_histogram(into: &mut Histogram<u64>, from: &Histogram<u64>) {
    into.add(from)
        .expect("every latency histogram is made by new_histogram with the same bounds");
}

/// How one operation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Done as asked.
    Ok,
    /// A get of an absent key.
    NotFound,
    /// A CAS that lost: the version had moved (VERSION_MISMATCH).
    Conflict,
    /// Failed; the error code.
    Error(String),
}

/// Results of one operation type.
#[derive(Clone, Debug)]
pub(super) struct OpStats {
    /// Latency of every completed operation (errors excluded), microseconds.
    pub(super) latency_us: Histogram<u64>,
    /// Completed operations that were conflicts.
    pub(super) conflicts: u64,
    /// Completed gets of absent keys.
    pub(super) not_found: u64,
    /// Failed operations by error code.
    pub(super) errors: BTreeMap<String, u64>,
}

impl Default for OpStats {
    fn default() -> Self {
        OpStats {
            latency_us: new_histogram(),
            conflicts: 0,
            not_found: 0,
            errors: BTreeMap::new(),
        }
    }
}

impl OpStats {
    pub(super) fn record(&mut self, outcome: &Outcome, latency_us: u64) {
        match outcome {
            Outcome::Error(code) => {
                *self.errors.entry(code.clone()).or_default() += 1;
                return;
            }
            Outcome::Conflict => self.conflicts += 1,
            Outcome::NotFound => self.not_found += 1,
            Outcome::Ok => {}
        }
        self.latency_us.saturating_record(latency_us.max(1));
    }

    pub(super) fn merge(&mut self, other: &OpStats) {
        merge_histogram(&mut self.latency_us, &other.latency_us);
        self.conflicts += other.conflicts;
        self.not_found += other.not_found;
        for (code, n) in &other.errors {
            *self.errors.entry(code.clone()).or_default() += n;
        }
    }

    pub(super) fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// Results of one thread, or of all merged.
#[derive(Clone, Debug, Default)]
pub(super) struct Stats {
    /// Indexed by [`OpKind::index`](super::workload::OpKind::index).
    pub(super) ops: [OpStats; 3],
    /// When the last recorded operation finished.
    pub(super) last_finish: Option<Instant>,
    /// Every type's operations by the second they finished in (with --plot).
    pub(super) timeline: Option<Timeline>,
}

impl Stats {
    pub(super) fn new(timeline: Option<Timeline>) -> Stats {
        Stats {
            timeline,
            ..Stats::default()
        }
    }

    /// Every operation type's results together (a type not in the mix
    /// adds nothing).
    pub(super) fn total(&self) -> OpStats {
        let mut all = OpStats::default();
        for op in &self.ops {
            all.merge(op);
        }
        all
    }

    pub(super) fn merge(&mut self, other: &Stats) {
        for (mine, theirs) in self.ops.iter_mut().zip(&other.ops) {
            mine.merge(theirs);
        }
        self.last_finish = self.last_finish.max(other.last_finish);
        match (&mut self.timeline, &other.timeline) {
            (Some(mine), Some(theirs)) => mine.merge(theirs),
            (None, Some(theirs)) => self.timeline = Some(theirs.clone()),
            (_, None) => {}
        }
    }
}

/// What a thread reports once a second: everything since its last tick,
/// warm-up included.
pub(super) struct Tick {
    pub(super) latency_us: Histogram<u64>,
    pub(super) errors: u64,
}

impl Tick {
    pub(super) fn new() -> Tick {
        Tick {
            latency_us: new_histogram(),
            errors: 0,
        }
    }

    pub(super) fn record(&mut self, outcome: &Outcome, latency_us: u64) {
        match outcome {
            Outcome::Error(_) => self.errors += 1,
            _ => self.latency_us.saturating_record(latency_us.max(1)),
        }
    }

    pub(super) fn merge(&mut self, other: &Tick) {
        merge_histogram(&mut self.latency_us, &other.latency_us);
        self.errors += other.errors;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::workload::OpKind;

    #[test]
    fn stats_merge_adds_latencies_outcomes_and_errors() {
        let mut a = OpStats::default();
        a.record(&Outcome::Ok, 100);
        a.record(&Outcome::Conflict, 200);
        a.record(&Outcome::Error("TIMEOUT".into()), 5_000);
        let mut b = OpStats::default();
        b.record(&Outcome::Ok, 300);
        b.record(&Outcome::NotFound, 0);
        b.record(&Outcome::Error("TIMEOUT".into()), 1);
        b.record(&Outcome::Error("UNAVAILABLE".into()), 1);
        a.merge(&b);
        assert_eq!(a.latency_us.len(), 4, "errors are not latencies");
        assert_eq!((a.conflicts, a.not_found), (1, 1));
        assert_eq!(a.errors.get("TIMEOUT"), Some(&2));
        assert_eq!(a.errors.get("UNAVAILABLE"), Some(&1));
        assert_eq!(a.error_count(), 3);
        assert_eq!(a.latency_us.min(), 1, "a zero latency counts as 1 µs");

        let mut s = Stats::default();
        let mut t = Stats::default();
        t.ops[OpKind::Get.index()] = a;
        let now = Instant::now();
        t.last_finish = Some(now);
        s.merge(&t);
        assert_eq!(s.ops[OpKind::Get.index()].latency_us.len(), 4);
        assert_eq!(s.last_finish, Some(now));
    }
}
