//! Latency and throughput over the measured window, bucket by bucket, for
//! `--plot`: one small histogram per second of the run.
//!
//! An operation lands in the bucket of the moment it finished, so a
//! bucket's count is the throughput of that second. Buckets are one second
//! wide unless the run is longer than [`MAX_BUCKETS`] seconds; then they are
//! as wide as it takes to stay within it. With `--duration` the width is
//! known up front; with `--ops` it starts at one second and doubles (two
//! neighbours merged into one) whenever the run outgrows the bound, so a
//! timeline never holds more than [`MAX_BUCKETS`] histograms.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Most buckets a timeline holds: ten minutes at one second each, about
/// 6 MiB per thread at most.
pub(super) const MAX_BUCKETS: usize = 600;
/// Highest latency a bucket holds; as the run's histograms.
const BUCKET_LATENCY_MAX_US: u64 = 60_000_000;
/// 1 % resolution is plenty for a p50 or p99 line and keeps a bucket near
/// 10 KiB (against 140 KiB at the run histograms' 3 digits).
const BUCKET_SIGNIFICANT_DIGITS: u8 = 2;

/// What finished in one bucket.
#[derive(Clone, Debug)]
struct Bucket {
    /// Latency of the completed operations, microseconds. u32 counts: a
    /// bucket of one thread never sees four billion operations.
    latency_us: Histogram<u32>,
    /// Failed operations.
    errors: u64,
}

impl Bucket {
    fn new() -> Bucket {
        Bucket {
            latency_us: Histogram::new_with_bounds(
                1,
                BUCKET_LATENCY_MAX_US,
                BUCKET_SIGNIFICANT_DIGITS,
            )
            .expect("bucket histogram bounds are valid constants"),
            errors: 0,
        }
    }

    fn merge(&mut self, other: &Bucket) {
        self.latency_us
            .add(&other.latency_us)
            .expect("every bucket histogram is made by Bucket::new with the same bounds");
        self.errors += other.errors;
    }
}

/// The measured window cut into buckets of `width_s` seconds.
#[derive(Clone, Debug)]
pub(super) struct Timeline {
    /// Seconds per bucket, at least 1.
    width_s: u64,
    /// With --duration: the number of buckets the window fills; an
    /// operation finishing at the very end belongs to the last one.
    /// None with --ops, where the window's length is not known.
    bucket_limit: Option<usize>,
    /// Bucket `i` covers `[i * width_s, (i + 1) * width_s)` seconds into the
    /// window; made on first use, so the vector ends at the last bucket
    /// anything finished in.
    buckets: Vec<Bucket>,
}

/// One bucket as the plot draws it.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct BucketPoint {
    /// Seconds into the window where the bucket starts.
    pub(super) start_s: f64,
    /// Seconds the bucket covers; the last one may be cut by the window's end.
    pub(super) width_s: f64,
    /// Completed operations per second.
    pub(super) ops_per_s: f64,
    /// Failed operations per second.
    pub(super) errors_per_s: f64,
    /// None when nothing completed in the bucket.
    pub(super) p50_us: Option<u64>,
    pub(super) p99_us: Option<u64>,
}

impl Timeline {
    /// A timeline for a window of `duration`, or of unknown length (--ops).
    pub(super) fn new(duration: Option<Duration>) -> Timeline {
        let (width_s, bucket_limit) = match duration {
            Some(duration) => {
                // Whole seconds, rounded up: a 2.5 s window has 3 buckets.
                let seconds = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
                let seconds = seconds.max(1);
                let width_s = seconds.div_ceil(MAX_BUCKETS as u64);
                (width_s, Some(seconds.div_ceil(width_s) as usize))
            }
            None => (1, None),
        };
        Timeline {
            width_s,
            bucket_limit,
            buckets: Vec::new(),
        }
    }

    /// Records an operation that finished `offset` into the window: its
    /// latency if it completed, None if it failed.
    pub(super) fn record(&mut self, offset: Duration, completed_latency_us: Option<u64>) {
        let index = self.index_of(offset);
        if index >= self.buckets.len() {
            self.buckets.resize_with(index + 1, Bucket::new);
        }
        let bucket = &mut self.buckets[index];
        match completed_latency_us {
            Some(latency_us) => bucket.latency_us.saturating_record(latency_us.max(1)),
            None => bucket.errors += 1,
        }
    }

    /// The bucket for `offset`, coarsening the timeline first if the
    /// bucket would lie beyond the bound.
    fn index_of(&mut self, offset: Duration) -> usize {
        loop {
            let index = (offset.as_secs() / self.width_s) as usize;
            if let Some(limit) = self.bucket_limit {
                return index.min(limit - 1);
            }
            if index < MAX_BUCKETS {
                return index;
            }
            self.coarsen();
        }
    }

    /// Doubles the width: buckets 2i and 2i+1 become bucket i.
    fn coarsen(&mut self) {
        let mut merged = Vec::with_capacity(self.buckets.len().div_ceil(2));
        let mut old = std::mem::take(&mut self.buckets).into_iter();
        while let Some(mut first) = old.next() {
            if let Some(second) = old.next() {
                first.merge(&second);
            }
            merged.push(first);
        }
        self.buckets = merged;
        self.width_s *= 2;
        self.bucket_limit = self.bucket_limit.map(|limit| limit.div_ceil(2));
    }

    /// Adds another thread's timeline of the same window.
    ///
    /// # Panics
    ///
    /// If the widths cannot be made equal by doubling the narrower one;
    /// timelines of one run always can (they start at the same width).
    pub(super) fn merge(&mut self, other: &Timeline) {
        let mut other = other.clone();
        while self.width_s < other.width_s {
            self.coarsen();
        }
        while other.width_s < self.width_s {
            other.coarsen();
        }
        assert_eq!(
            self.width_s, other.width_s,
            "timelines of one run differ in bucket width: {} s and {} s",
            self.width_s, other.width_s
        );
        if other.buckets.len() > self.buckets.len() {
            self.buckets.resize_with(other.buckets.len(), Bucket::new);
        }
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            mine.merge(theirs);
        }
    }

    /// Every bucket of a window that lasted `elapsed`, empty ones included
    /// (a second in which nothing finished is a zero on the plot, not a gap).
    pub(super) fn points(&self, elapsed: Duration) -> Vec<BucketPoint> {
        let elapsed_s = elapsed.as_secs_f64();
        let width_s = self.width_s as f64;
        let count = ((elapsed_s / width_s).ceil() as usize).max(self.buckets.len());
        (0..count)
            .map(|i| {
                let start_s = i as f64 * width_s;
                // The last bucket ends with the window; never less than a
                // millisecond, so a rate stays finite.
                let width_s = (elapsed_s - start_s).clamp(1e-3, width_s);
                let (completed, errors, p50_us, p99_us) = match self.buckets.get(i) {
                    Some(b) if !b.latency_us.is_empty() => (
                        b.latency_us.len(),
                        b.errors,
                        Some(b.latency_us.value_at_quantile(0.50)),
                        Some(b.latency_us.value_at_quantile(0.99)),
                    ),
                    Some(b) => (0, b.errors, None, None),
                    None => (0, 0, None, None),
                };
                BucketPoint {
                    start_s,
                    width_s,
                    ops_per_s: completed as f64 / width_s,
                    errors_per_s: errors as f64 / width_s,
                    p50_us,
                    p99_us,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn operations_land_in_the_second_they_finished() {
        let mut t = Timeline::new(Some(Duration::from_secs(3)));
        t.record(ms(0), Some(100));
        t.record(ms(999), Some(200));
        t.record(ms(1_000), Some(250));
        t.record(ms(2_500), None);
        // Finishing exactly at the end of the window is inside it.
        t.record(ms(3_000), Some(50));
        let points = t.points(Duration::from_secs(3));
        assert_eq!(points.len(), 3);
        assert_eq!(points[0].ops_per_s, 2.0);
        assert_eq!(points[0].p50_us, Some(100));
        assert_eq!(points[0].p99_us, Some(200));
        assert_eq!((points[1].ops_per_s, points[1].p50_us), (1.0, Some(250)));
        assert_eq!(points[2].ops_per_s, 1.0, "errors are not throughput");
        assert_eq!(points[2].errors_per_s, 1.0);
        assert_eq!(points[2].start_s, 2.0);
    }

    #[test]
    fn quiet_seconds_are_zeros_and_the_last_bucket_is_cut_by_the_window() {
        let mut t = Timeline::new(Some(ms(2_500)));
        t.record(ms(100), Some(10));
        t.record(ms(2_400), Some(10));
        let points = t.points(ms(2_500));
        assert_eq!(points.len(), 3);
        assert_eq!((points[1].ops_per_s, points[1].p50_us), (0.0, None));
        assert_eq!(points[2].width_s, 0.5);
        assert_eq!(points[2].ops_per_s, 2.0, "one op in half a second");
        // A window with nothing recorded after its first second still has
        // all its buckets.
        let mut quiet = Timeline::new(Some(Duration::from_secs(4)));
        quiet.record(ms(10), Some(10));
        assert_eq!(quiet.points(Duration::from_secs(4)).len(), 4);
    }

    #[test]
    fn a_long_window_gets_wider_buckets_within_the_bound() {
        let t = Timeline::new(Some(Duration::from_secs(MAX_BUCKETS as u64)));
        assert_eq!((t.width_s, t.bucket_limit), (1, Some(MAX_BUCKETS)));
        let mut t = Timeline::new(Some(Duration::from_secs(1_801)));
        assert_eq!((t.width_s, t.bucket_limit), (4, Some(451)));
        t.record(Duration::from_secs(1_801), Some(1));
        assert_eq!(t.buckets.len(), 451);
    }

    #[test]
    fn an_open_ended_run_doubles_its_buckets_instead_of_growing_past_the_bound() {
        let mut t = Timeline::new(None);
        for second in 0..(MAX_BUCKETS as u64 + 1) {
            t.record(Duration::from_secs(second), Some(second + 1));
        }
        assert_eq!(t.width_s, 2);
        assert_eq!(t.buckets.len(), MAX_BUCKETS / 2 + 1);
        assert!(t
            .buckets
            .iter()
            .take(MAX_BUCKETS / 2)
            .all(|b| b.latency_us.len() == 2));
        assert_eq!(t.buckets[MAX_BUCKETS / 2].latency_us.len(), 1);
        let total: u64 = t.buckets.iter().map(|b| b.latency_us.len()).sum();
        assert_eq!(total, MAX_BUCKETS as u64 + 1, "coarsening loses nothing");
    }

    #[test]
    fn merging_threads_adds_bucket_by_bucket_at_the_coarser_width() {
        let mut a = Timeline::new(None);
        a.record(ms(500), Some(10));
        a.record(ms(1_500), Some(20));
        let mut b = Timeline::new(None);
        b.record(ms(1_200), None);
        b.record(ms(3_300), Some(40));
        b.coarsen();
        a.merge(&b);
        assert_eq!(a.width_s, 2);
        let points = a.points(ms(4_000));
        assert_eq!(points.len(), 2);
        assert_eq!(points[0].ops_per_s, 1.0, "two ops in two seconds");
        assert_eq!(points[0].errors_per_s, 0.5);
        assert_eq!(points[1].ops_per_s, 0.5);
        assert_eq!(points[1].p99_us, Some(40));
    }
}
