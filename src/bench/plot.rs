//! `--plot`: one SVG of a run, three charts stacked under a title naming
//! the workload and the date:
//!
//! 1. **Throughput**: completed operations per second over the measured
//!    window (and failed ones, when there were any);
//! 2. **Latency per second**: p50 and p99 of each second;
//! 3. **Latency by percentile**: the whole run's distribution per operation
//!    type, the x axis in "nines" as HdrHistogram plots it (0 %, 90 %,
//!    99 %, 99.9 %, ...: each step ten times closer to 100 %).
//!
//! SVG only, drawn by plotters without a font backend: text goes into the
//! file as `<text>` elements and the viewer renders it, so nothing here
//! needs a system font library.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::timeline::{BucketPoint, Timeline};

/// Chart titles, in order from the top.
pub(super) const THROUGHPUT_TITLE: &str = "Throughput";
pub(super) const LATENCY_PER_SECOND_TITLE: &str = "Latency per second";
pub(super) const PERCENTILE_TITLE: &str = "Latency by percentile";

const WIDTH_PX: u32 = 1000;
const HEIGHT_PX: u32 = 1200;
/// Height of the title lines above the charts.
const HEADER_PX: u32 = 64;
const FONT: &str = "sans-serif";
const TITLE_FONT_PX: u32 = 20;
const CAPTION_FONT_PX: u32 = 18;
/// Tick labels, axis names and legends (plotters' default 12 is small).
const LABEL_FONT_PX: u32 = 15;
/// Points drawn per "nine" of the percentile axis.
const POINTS_PER_NINE: u32 = 100;
/// The percentile axis ends between 99 % and 99.9999 %, at the nines the
/// run's operation count can tell apart.
const MIN_NINES: u32 = 2;
const MAX_NINES: u32 = 6;
/// Headroom above the highest point of a chart.
const HEADROOM: f64 = 1.1;

/// What the plot shows.
pub(super) struct PlotInput<'a> {
    /// First title line: the workload's shape (clients, pipeline, mix,
    /// value size).
    pub(super) title: String,
    /// Second title line: the rest of the settings.
    pub(super) details: String,
    /// When the run started (the date in the title).
    pub(super) started: SystemTime,
    /// Length of the measured window.
    pub(super) elapsed: Duration,
    pub(super) timeline: &'a Timeline,
    /// Latency (µs) of the whole run per operation type, named.
    pub(super) latencies: Vec<(&'a str, &'a Histogram<u64>)>,
}

/// The SVG document.
pub(super) fn render(input: &PlotInput) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH_PX, HEIGHT_PX)).into_drawing_area();
        root.fill(&WHITE)?;
        let (header, body) = root.split_vertically(HEADER_PX);
        let title_style = TextStyle::from((FONT, TITLE_FONT_PX).into_font()).color(&BLACK);
        let first = format!(
            "corekv bench, {}: {}",
            utc_minute(input.started),
            input.title
        );
        let second = format!(
            "{}, {:.1} s measured",
            input.details,
            input.elapsed.as_secs_f64()
        );
        header.draw_text(&first, &title_style, (12, 10))?;
        header.draw_text(&second, &title_style, (12, 36))?;
        let charts = body.split_evenly((3, 1));
        let points = input.timeline.points(input.elapsed);
        let elapsed_s = input.elapsed.as_secs_f64().max(1e-3);
        draw_throughput(&charts[0], &points, elapsed_s)?;
        draw_latency_per_second(&charts[1], &points, elapsed_s)?;
        draw_percentiles(&charts[2], &input.latencies)?;
        root.present()?;
    }
    Ok(svg)
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
/// The SVG backend writes into a String; its only error type is io::Error.
type DrawResult = Result<(), DrawingAreaErrorKind<std::io::Error>>;

fn draw_throughput(area: &Area<'_>, points: &[BucketPoint], elapsed_s: f64) -> DrawResult {
    let errors = points.iter().any(|p| p.errors_per_s > 0.0);
    let highest = points
        .iter()
        .map(|p| p.ops_per_s.max(p.errors_per_s))
        .fold(1.0, f64::max);
    let mut chart = new_chart(area, THROUGHPUT_TITLE, elapsed_s, highest)?;
    chart
        .configure_mesh()
        .label_style((FONT, LABEL_FONT_PX))
        .axis_desc_style((FONT, LABEL_FONT_PX))
        .x_desc("seconds into the measured window")
        .y_desc("operations/s")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    let mut series = vec![Series::new(
        "completed",
        BLUE,
        steps(points, |p| Some(p.ops_per_s)),
    )];
    if errors {
        series.push(Series::new(
            "failed",
            RED,
            steps(points, |p| Some(p.errors_per_s)),
        ));
    }
    draw_lines(&mut chart, series)?;
    legend(&mut chart, SeriesLabelPosition::LowerRight)
}

fn draw_latency_per_second(area: &Area<'_>, points: &[BucketPoint], elapsed_s: f64) -> DrawResult {
    let ms = |us: Option<u64>| us.map(|us| us as f64 / 1_000.0);
    let highest = points
        .iter()
        .filter_map(|p| ms(p.p99_us))
        .fold(1e-3, f64::max);
    let mut chart = new_chart(area, LATENCY_PER_SECOND_TITLE, elapsed_s, highest)?;
    chart
        .configure_mesh()
        .label_style((FONT, LABEL_FONT_PX))
        .axis_desc_style((FONT, LABEL_FONT_PX))
        .x_desc("seconds into the measured window")
        .y_desc("latency, ms")
        .y_label_formatter(&|v| ms_label(*v, highest))
        .draw()?;
    let series = vec![
        Series::new("p50", BLUE, steps(points, |p| ms(p.p50_us))),
        Series::new("p99", RED, steps(points, |p| ms(p.p99_us))),
    ];
    draw_lines(&mut chart, series)?;
    legend(&mut chart, SeriesLabelPosition::UpperRight)
}

fn draw_percentiles(area: &Area<'_>, latencies: &[(&str, &Histogram<u64>)]) -> DrawResult {
    let count = latencies.iter().map(|(_, h)| h.len()).max().unwrap_or(0);
    let nines = nines_for(count);
    let highest = latencies
        .iter()
        .filter(|(_, h)| !h.is_empty())
        .map(|(_, h)| h.max() as f64 / 1_000.0)
        .fold(1e-3, f64::max);
    let mut chart = new_chart(area, PERCENTILE_TITLE, f64::from(nines), highest)?;
    chart
        .configure_mesh()
        .label_style((FONT, LABEL_FONT_PX))
        .axis_desc_style((FONT, LABEL_FONT_PX))
        .x_desc("percentile")
        .y_desc("latency, ms")
        .x_labels(nines as usize + 1)
        .x_label_formatter(&|x| percentile_label(*x))
        .y_label_formatter(&|v| ms_label(*v, highest))
        .draw()?;
    let series = latencies
        .iter()
        .filter(|(_, h)| !h.is_empty())
        .map(|(name, h)| Series::new(name, color_of(name), vec![percentile_curve(h, nines)]))
        .collect();
    draw_lines(&mut chart, series)?;
    legend(&mut chart, SeriesLabelPosition::UpperLeft)
}

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A chart on `area` from 0 to `x_max` and from 0 to a little above `highest`.
fn new_chart<'a, 'b>(
    area: &'a Area<'b>,
    caption: &str,
    x_max: f64,
    highest: f64,
) -> Result<Chart<'a, 'b>, DrawingAreaErrorKind<std::io::Error>> {
    ChartBuilder::on(area)
        .caption(caption, (FONT, CAPTION_FONT_PX))
        .margin(12)
        // Room for the last x label, centred on the right edge.
        .margin_right(36)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..x_max, 0.0..highest * HEADROOM)
}

/// One line of a chart, in one or more pieces.
struct Series<'a> {
    /// The legend's name for it.
    name: &'a str,
    color: RGBColor,
    segments: Vec<Vec<(f64, f64)>>,
}

impl<'a> Series<'a> {
    fn new(name: &'a str, color: RGBColor, segments: Vec<Vec<(f64, f64)>>) -> Series<'a> {
        Series {
            name,
            color,
            segments,
        }
    }
}

/// Draws each series with a legend entry.
fn draw_lines(chart: &mut Chart<'_, '_>, series: Vec<Series>) -> DrawResult {
    for Series {
        name,
        color,
        segments,
    } in series
    {
        let style = color.stroke_width(2);
        let mut drawn = None;
        for segment in segments {
            drawn = Some(chart.draw_series(LineSeries::new(segment, style))?);
        }
        if let Some(drawn) = drawn {
            drawn
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
    }
    Ok(())
}

fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>, position: SeriesLabelPosition) -> DrawResult {
    chart
        .configure_series_labels()
        .position(position)
        .label_font((FONT, LABEL_FONT_PX))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
}

/// A step line through the buckets: flat across each bucket, broken where
/// `value` has nothing (a second without a completed operation has no
/// latency).
fn steps(
    points: &[BucketPoint],
    value: impl Fn(&BucketPoint) -> Option<f64>,
) -> Vec<Vec<(f64, f64)>> {
    let mut segments = Vec::new();
    let mut current = Vec::new();
    for p in points {
        match value(p) {
            Some(v) => {
                current.push((p.start_s, v));
                current.push((p.start_s + p.width_s, v));
            }
            None if !current.is_empty() => segments.push(std::mem::take(&mut current)),
            None => {}
        }
    }
    if !current.is_empty() {
        segments.push(current);
    }
    segments
}

/// How many nines the percentile axis shows for `count` operations: as
/// many as the count resolves (1,000 operations: 99.9 %), within bounds.
fn nines_for(count: u64) -> u32 {
    let resolved = (count.max(1) as f64).log10().ceil() as u32;
    resolved.clamp(MIN_NINES, MAX_NINES)
}

/// The latency curve of `histogram` in ms against nines: x is
/// `log10(1 / (1 - quantile))`.
fn percentile_curve(histogram: &Histogram<u64>, nines: u32) -> Vec<(f64, f64)> {
    (0..=nines * POINTS_PER_NINE)
        .map(|step| {
            let x = f64::from(step) / f64::from(POINTS_PER_NINE);
            let quantile = 1.0 - 10f64.powf(-x);
            (x, histogram.value_at_quantile(quantile) as f64 / 1_000.0)
        })
        .collect()
}

/// `x` nines as a percentile: 0 -> "0%", 1 -> "90%", 3 -> "99.9%".
fn percentile_label(x: f64) -> String {
    let percent = 100.0 * (1.0 - 10f64.powf(-x));
    let decimals = (x.ceil() as usize).saturating_sub(2);
    format!("{percent:.decimals$}%")
}

/// A latency tick in ms, with decimals enough for the chart's range.
fn ms_label(value: f64, highest: f64) -> String {
    let decimals = match highest {
        h if h < 1.0 => 2,
        h if h < 10.0 => 1,
        _ => 0,
    };
    format!("{value:.decimals$}")
}

fn color_of(op: &str) -> RGBColor {
    match op {
        "put" => BLUE,
        "get" => RGBColor(0, 150, 0),
        "cas" => MAGENTA,
        _ => BLACK,
    }
}

/// `time` as `YYYY-MM-DD HH:MM UTC` (the crate has no calendar dependency
/// for this one line).
fn utc_minute(time: SystemTime) -> String {
    let seconds = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (year, month, day) = civil_from_days((seconds / 86_400) as i64);
    let minute_of_day = (seconds % 86_400) / 60;
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        minute_of_day / 60,
        minute_of_day % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_calendar_minutes() {
        let at = |s: u64| utc_minute(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01 00:00 UTC");
        assert_eq!(at(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(at(1_700_000_000), "2023-11-14 22:13 UTC");
        assert_eq!(at(4_107_542_399), "2100-02-28 23:59 UTC");
    }

    #[test]
    fn the_percentile_axis_reads_in_nines() {
        assert_eq!(percentile_label(0.0), "0%");
        assert_eq!(percentile_label(1.0), "90%");
        assert_eq!(percentile_label(2.0), "99%");
        assert_eq!(percentile_label(3.0), "99.9%");
        assert_eq!(percentile_label(5.0), "99.999%");
        assert_eq!(nines_for(0), MIN_NINES);
        assert_eq!(nines_for(1_000), 3);
        assert_eq!(nines_for(1_001), 4);
        assert_eq!(nines_for(u64::MAX), MAX_NINES);
    }

    #[test]
    fn steps_break_where_a_bucket_has_no_value() {
        let point = |start_s: f64, p50_us: Option<u64>| BucketPoint {
            start_s,
            width_s: 1.0,
            ops_per_s: 0.0,
            errors_per_s: 0.0,
            p50_us,
            p99_us: p50_us,
        };
        let points = [point(0.0, Some(1)), point(1.0, None), point(2.0, Some(3))];
        let segments = steps(&points, |p| p.p50_us.map(|v| v as f64));
        assert_eq!(
            segments,
            vec![vec![(0.0, 1.0), (1.0, 1.0)], vec![(2.0, 3.0), (3.0, 3.0)]]
        );
    }

    #[test]
    fn a_run_renders_as_one_svg_with_every_chart_and_its_title() {
        let mut timeline = Timeline::new(Some(Duration::from_secs(3)));
        let mut put = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for i in 0..3_000u64 {
            let latency_us = 200 + i % 700;
            timeline.record(Duration::from_millis(i), Some(latency_us));
            put.record(latency_us).unwrap();
        }
        timeline.record(Duration::from_millis(10), None);
        let input = PlotInput {
            title: "2 clients x 1 in flight, mix put=100".to_string(),
            details: "16 B keys".to_string(),
            started: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            elapsed: Duration::from_secs(3),
            timeline: &timeline,
            latencies: vec![("put", &put)],
        };
        let svg = render(&input).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100]);
        assert!(svg.trim_end().ends_with("</svg>"));
        for text in [
            THROUGHPUT_TITLE,
            LATENCY_PER_SECOND_TITLE,
            PERCENTILE_TITLE,
            "corekv bench, 2023-11-14 22:13 UTC: 2 clients x 1 in flight, mix put=100",
            "16 B keys, 3.0 s measured",
            "99.9%",
            "\np99\n",
            "\nfailed\n",
        ] {
            assert!(svg.contains(text), "no {text} in the plot");
        }
    }
}
