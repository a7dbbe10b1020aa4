//! Rate limits for log lines that a peer or a client can trigger over and
//! over: the first one is logged, then at most one per interval, saying how
//! many were suppressed in between. A flood of bad input costs a few lines,
//! not a disk.

use std::time::{Duration, Instant};

/// Default spacing of repeated warnings of one kind.
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Decides whether one more occurrence of a repeating event is logged.
#[derive(Debug)]
pub struct LogLimit {
    interval: Duration,
    last_logged: Option<Instant>,
    suppressed: u64,
}

impl LogLimit {
    /// At most one line per `interval`.
    pub fn new(interval: Duration) -> LogLimit {
        LogLimit {
            interval,
            last_logged: None,
            suppressed: 0,
        }
    }

    /// Call once per occurrence: `Some(n)` means log this one, mentioning the
    /// `n` suppressed since the last line; `None` means stay quiet.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let due = self
            .last_logged
            .is_none_or(|last| now.duration_since(last) >= self.interval);
        if !due {
            self.suppressed += 1;
            return None;
        }
        self.last_logged = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

impl Default for LogLimit {
    fn default() -> Self {
        LogLimit::new(WARN_INTERVAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_logs_then_one_per_interval_with_the_suppressed_count() {
        let start = Instant::now();
        let mut limit = LogLimit::new(Duration::from_secs(10));
        assert_eq!(limit.allow(start), Some(0));
        for i in 1..=1000 {
            assert_eq!(limit.allow(start + Duration::from_millis(i)), None);
        }
        assert_eq!(limit.allow(start + Duration::from_secs(10)), Some(1000));
        assert_eq!(limit.allow(start + Duration::from_secs(11)), None);
        assert_eq!(limit.allow(start + Duration::from_secs(25)), Some(1));
    }
}
