//! `--hdr`: a latency histogram as HdrHistogram's percentile distribution
//! text (the `.hgrm` files of `HistogramLogProcessor` and wrk2), so that
//! HdrHistogram's plotter or hdr-plot can lay runs over each other.
//!
//! The hdrhistogram crate serializes only to the binary V2 log format, so
//! the text is written here, line for line as Java's
//! `outputPercentileDistribution(out, 5, 1000.0)` writes it (ticks included,
//! see [`percentile_ticks`]; a percentile whose 13th decimal is a 5 may end
//! one lower in the 12th, as Rust rounds that tie to even and Java up):
//!
//! ```text
//!        Value     Percentile TotalCount 1/(1-Percentile)
//!
//!        0.412 0.000000000000          1           1.00
//!        ...                                                  (one line per percentile tick)
//!       12.223 1.000000000000      34164
//! #[Mean    =        1.026, StdDeviation   =        0.781]
//! #[Max     =       12.223, Total count    =        34164]
//! #[Buckets =           16, SubBuckets     =         2048]
//! ```
//!
//! Values are in **milliseconds** (the histograms hold microseconds, divided
//! by [`VALUE_UNITS_PER_MS`]), with as many decimals as the histogram has
//! significant digits: 3, so to the microsecond. Percentile ticks: 5 per
//! half distance to 100 % (0 %, 10 %, ... 50 %, 55 %, ... 75 %, 77.5 %, ...),
//! the same as Java's default.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;

/// Histogram units (microseconds) per unit of the file (milliseconds).
pub(super) const VALUE_UNITS_PER_MS: f64 = 1_000.0;
/// Percentile ticks per half distance to 100 %.
const TICKS_PER_HALF_DISTANCE: u32 = 5;

/// The percentile distribution of `histogram` (microseconds), values in
/// milliseconds.
pub(super) fn percentile_distribution(histogram: &Histogram<u64>) -> String {
    let decimals = usize::from(histogram.sigfig());
    let ms = |us: f64| us / VALUE_UNITS_PER_MS;
    let mut out = String::new();
    let _ = write!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    for tick in percentile_ticks(histogram) {
        let value = ms(tick.value_us as f64);
        let quantile = tick.percentile / 100.0;
        let total_count = tick.total_count;
        // As Java: the last line has no 1/(1-Percentile), it would be infinite.
        if tick.percentile < 100.0 {
            let _ = writeln!(
                out,
                "{value:12.decimals$} {quantile:2.12} {total_count:10} {:14.2}",
                1.0 / (1.0 - quantile)
            );
        } else {
            let _ = writeln!(out, "{value:12.decimals$} {quantile:2.12} {total_count:10}");
        }
    }
    let _ = writeln!(
        out,
        "#[Mean    = {:12.decimals$}, StdDeviation   = {:12.decimals$}]",
        ms(histogram.mean()),
        ms(histogram.stdev())
    );
    let _ = writeln!(
        out,
        "#[Max     = {:12.decimals$}, Total count    = {:12}]",
        ms(histogram.max() as f64),
        histogram.len()
    );
    let _ = writeln!(
        out,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        histogram.buckets(),
        sub_bucket_count(histogram.sigfig())
    );
    out
}

/// One line of the distribution.
#[derive(Clone, Copy, Debug, PartialEq)]
struct PercentileTick {
    /// Highest value equivalent to the bucket the tick fell in.
    value_us: u64,
    /// The tick, in percent.
    percentile: f64,
    /// Values at or below `value_us`.
    total_count: u64,
}

/// The ticks of Java's `PercentileIterator`: from 0 %, in steps that halve
/// each time the distance to 100 % halves, a tick reported at the first
/// bucket whose cumulative percentile reaches it; after the last bucket's
/// first tick, one at 100 %.
///
/// Counted in percent, as Java counts them: the crate's own quantile
/// iterator counts in fractions, where 0.5 + 5 x 0.05 comes out above 0.75,
/// and so it reports a bucket that ends exactly at 75 % one bucket late.
fn percentile_ticks(histogram: &Histogram<u64>) -> Vec<PercentileTick> {
    let total = histogram.len();
    let mut ticks = Vec::new();
    let mut percentile = 0.0f64;
    let mut total_count = 0u64;
    for bucket in histogram.iter_recorded() {
        total_count += bucket.count_at_value();
        let reached = 100.0 * total_count as f64 / total as f64;
        while reached >= percentile {
            let value_us = bucket.value_iterated_to();
            ticks.push(PercentileTick {
                value_us,
                percentile,
                total_count,
            });
            if total_count == total {
                ticks.push(PercentileTick {
                    value_us,
                    percentile: 100.0,
                    total_count,
                });
                return ticks;
            }
            // Ticks per 100 % at this distance from it: 2 x ticks per half
            // distance, doubled for every halving so far.
            let halvings = ((100.0 / (100.0 - percentile)).ln() / 2f64.ln()) as u32;
            let ticks_per_whole = u64::from(TICKS_PER_HALF_DISTANCE) << (halvings + 1);
            percentile += 100.0 / ticks_per_whole as f64;
        }
    }
    ticks
}

/// Sub-buckets per bucket of a histogram with `sigfig` significant digits:
/// the power of two that holds `2 * 10^sigfig` values at unit resolution
/// (the crate does not expose it; this is how it and Java size a histogram).
fn sub_bucket_count(sigfig: u8) -> u64 {
    let single_unit_values = 2 * 10u64.pow(u32::from(sigfig));
    single_unit_values.next_power_of_two()
}

/// The file of one operation type when the mix has several:
/// `lat.hgrm` becomes `lat.put.hgrm`, `lat` becomes `lat.put`.
pub(super) fn path_for_op(path: &Path, op: &str) -> PathBuf {
    let stem = path
        .file_stem()
        .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    let name = match path.extension() {
        Some(extension) => format!("{stem}.{op}.{}", extension.to_string_lossy()),
        None => format!("{stem}.{op}"),
    };
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram(values_us: &[u64]) -> Histogram<u64> {
        let mut h = Histogram::new_with_bounds(1, 60_000_000, 3).unwrap();
        for v in values_us {
            h.record(*v).unwrap();
        }
        h
    }

    #[test]
    fn a_known_histogram_gives_the_java_lines() {
        let h = histogram(&[1_000, 1_000, 2_000, 4_000]);
        let expected = "       Value     Percentile TotalCount 1/(1-Percentile)

       1.000 0.000000000000          2           1.00
       1.000 0.100000000000          2           1.11
       1.000 0.200000000000          2           1.25
       1.000 0.300000000000          2           1.43
       1.000 0.400000000000          2           1.67
       1.000 0.500000000000          2           2.00
       2.000 0.550000000000          3           2.22
       2.000 0.600000000000          3           2.50
       2.000 0.650000000000          3           2.86
       2.000 0.700000000000          3           3.33
       2.000 0.750000000000          3           4.00
       4.001 0.775000000000          4           4.44
       4.001 1.000000000000          4
#[Mean    =        2.000, StdDeviation   =        1.225]
#[Max     =        4.001, Total count    =            4]
#[Buckets =           16, SubBuckets     =         2048]
";
        assert_eq!(percentile_distribution(&h), expected);
    }

    #[test]
    fn percentiles_ascend_to_one_and_counts_to_the_total() {
        let values: Vec<u64> = (1..=10_000).map(|i| i * 7).collect();
        let h = histogram(&values);
        let text = percentile_distribution(&h);
        let rows: Vec<Vec<&str>> = text
            .lines()
            .skip(2)
            .take_while(|l| !l.starts_with('#'))
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert!(rows.len() > 50, "{text}");
        let quantiles: Vec<f64> = rows.iter().map(|r| r[1].parse().unwrap()).collect();
        assert!(quantiles.windows(2).all(|w| w[0] < w[1]), "{text}");
        assert_eq!(*quantiles.last().unwrap(), 1.0);
        let last = rows.last().unwrap();
        assert_eq!(last.len(), 3, "the last line has no 1/(1-Percentile)");
        assert_eq!(last[2], "10000");
        assert!(rows[..rows.len() - 1].iter().all(|r| r.len() == 4));
        assert!(text.contains("Total count    =        10000]"), "{text}");
    }

    #[test]
    fn an_empty_histogram_has_the_header_and_footer_only() {
        let text = percentile_distribution(&histogram(&[]));
        assert_eq!(text.lines().count(), 5, "{text}");
        assert!(text.contains("Total count    =            0]"), "{text}");
    }

    #[test]
    fn sub_buckets_match_the_crates_sizing() {
        assert_eq!(sub_bucket_count(3), 2048);
        assert_eq!(sub_bucket_count(2), 256);
        assert_eq!(sub_bucket_count(1), 32);
    }

    #[test]
    fn per_op_files_put_the_op_before_the_extension() {
        let op = |p: &str| path_for_op(Path::new(p), "put");
        assert_eq!(op("lat.hgrm"), PathBuf::from("lat.put.hgrm"));
        assert_eq!(op("runs.d/lat"), PathBuf::from("runs.d/lat.put"));
        assert_eq!(op("a/b.c.hgrm"), PathBuf::from("a/b.c.put.hgrm"));
    }
}
