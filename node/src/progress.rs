//! Progress lines for work that can take seconds at size: loading or
//! verifying a snapshot, replaying the log at start-up, sending or receiving
//! a snapshot. An operator watching a 10 GB node restart sees it move
//! instead of a silent gap: one line every `PROGRESS_EVERY` while it runs,
//! one when it ends, none at all for work that is over sooner.

use std::time::{Duration, Instant};

/// Spacing of progress lines, and how long work runs before it gets any.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// What the counts are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Shown in MiB.
    Bytes,
    /// Log entries, shown as they are.
    Entries,
}

/// Tracks one long piece of work and logs how far it got.
#[derive(Debug)]
pub struct Progress {
    shard: u32,
    what: String,
    unit: Unit,
    total: u64,
    done: u64,
    started: Instant,
    next_line: Instant,
    logged: bool,
}

impl Progress {
    /// Work on `shard` of `total` units, named `what` in the lines
    /// ("loading snapshot", "replaying log", ...).
    pub fn new(shard: u32, what: impl Into<String>, unit: Unit, total: u64) -> Progress {
        let started = Instant::now();
        Progress {
            shard,
            what: what.into(),
            unit,
            total,
            done: 0,
            started,
            next_line: started + PROGRESS_EVERY,
            logged: false,
        }
    }

    /// `done` units of the total are done; logs when a line is due.
    pub fn update(&mut self, done: u64) {
        self.done = done;
        let now = Instant::now();
        if now < self.next_line {
            return;
        }
        self.next_line = now + PROGRESS_EVERY;
        self.logged = true;
        tracing::info!(
            shard = self.shard,
            done = %self.amount(done),
            total = %self.amount(self.total),
            percent = percent(done, self.total),
            elapsed_s = self.started.elapsed().as_secs(),
            "{}", self.what
        );
    }

    /// The work ended; says so if it was long enough to report progress.
    pub fn finish(&mut self) {
        if !self.logged && self.started.elapsed() < PROGRESS_EVERY {
            return;
        }
        self.logged = false;
        tracing::info!(
            shard = self.shard,
            total = %self.amount(self.done),
            elapsed_ms = self.started.elapsed().as_millis() as u64,
            "{}: done", self.what
        );
    }

    /// Whether a line has been logged (for tests).
    pub fn has_logged(&self) -> bool {
        self.logged
    }

    fn amount(&self, n: u64) -> String {
        match self.unit {
            Unit::Bytes => format!("{} MiB", n >> 20),
            Unit::Entries => format!("{n} entries"),
        }
    }
}

fn percent(done: u64, total: u64) -> u64 {
    if total == 0 {
        100
    } else {
        (done.min(total) as u128 * 100 / total as u128) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_work_logs_nothing_and_long_work_logs_at_each_interval() {
        let mut quick = Progress::new(0, "loading snapshot", Unit::Bytes, 100);
        quick.next_line = Instant::now() + Duration::from_secs(3600);
        quick.update(50);
        quick.update(100);
        assert!(!quick.has_logged());

        let mut long = Progress::new(0, "replaying log", Unit::Entries, 100);
        // As if the work had begun an interval ago.
        long.next_line = Instant::now() - Duration::from_millis(1);
        long.update(10);
        assert!(long.has_logged());
        let next = long.next_line;
        long.update(20);
        assert_eq!(long.next_line, next, "at most one line per interval");
        long.finish();
        assert!(!long.has_logged());
    }

    #[test]
    fn percent_is_bounded_and_total_zero_is_done() {
        assert_eq!(percent(5, 10), 50);
        assert_eq!(percent(15, 10), 100);
        assert_eq!(percent(0, 0), 100);
        assert_eq!(percent(u64::MAX, u64::MAX), 100);
    }
}
