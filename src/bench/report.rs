//! What a run tells the operator: latency rows per operation type, the
//! cluster's CPU and leadership across the window, as a table or one JSON
//! object, and the progress line while it runs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::time::Duration;

use serde_json::{json, Value};

use super::host::{HostReading, HostReport};
use super::settings::Settings;
use super::stats::{OpStats, Stats, Tick};
use super::workload::OpKind;

/// What the prefill did.
pub(super) struct PrefillReport {
    pub(super) keys: u64,
    pub(super) seconds: f64,
    pub(super) errors: BTreeMap<String, u64>,
}

/// What the measured run gave.
pub(super) struct Measured {
    pub(super) stats: Stats,
    pub(super) elapsed: Duration,
    pub(super) before: ClusterSnapshot,
    pub(super) after: ClusterSnapshot,
}

/// Terms and leaders per shard, and CPU time per node, at one moment.
#[derive(Clone, Debug)]
pub(super) struct ClusterSnapshot {
    /// Per shard: the highest term any replica reports, and the leader that
    /// replica knows.
    pub(super) shards: Result<Vec<ShardTerm>, String>,
    /// Per --admin address, in order.
    pub(super) nodes: Vec<Result<AdminScrape, String>>,
    /// The load generator's own machine.
    pub(super) host: HostReading,
}

/// One shard's term and leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ShardTerm {
    /// Shard index.
    pub(super) shard: u32,
    /// Highest term reported by any replica.
    pub(super) term: u64,
    /// Leader known by the replica with that term (0 = none).
    pub(super) leader: u64,
}

/// What one node's /metrics said.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct AdminScrape {
    pub(super) cpu_seconds: f64,
    pub(super) leader_changes: Option<f64>,
    /// wal_bytes_written_total, snapshot_bytes_written_total and
    /// snapshots_written_total (absent from an older node).
    pub(super) disk: Option<DiskCounters>,
}

/// A node's counters of what it wrote to disk.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct DiskCounters {
    pub(super) wal_bytes: f64,
    pub(super) snapshot_bytes: f64,
    pub(super) snapshots: f64,
}

impl DiskCounters {
    /// The growth from `before` to `after`, summed over the nodes; None
    /// unless every node answered both times.
    fn growth(before: &ClusterSnapshot, after: &ClusterSnapshot) -> Option<DiskCounters> {
        if before.nodes.is_empty() {
            return None;
        }
        let mut sum = DiskCounters::default();
        for (b, a) in before.nodes.iter().zip(&after.nodes) {
            let (b, a) = (b.as_ref().ok()?.disk?, a.as_ref().ok()?.disk?);
            sum.wal_bytes += a.wal_bytes - b.wal_bytes;
            sum.snapshot_bytes += a.snapshot_bytes - b.snapshot_bytes;
            sum.snapshots += a.snapshots - b.snapshots;
        }
        Some(sum)
    }

    fn to_json(self) -> Value {
        json!({
            "wal_bytes": self.wal_bytes,
            "snapshot_bytes": self.snapshot_bytes,
            "snapshots": self.snapshots,
            "snapshot_to_log_ratio": self.ratio(),
        })
    }

    fn ratio(self) -> Option<f64> {
        (self.wal_bytes > 0.0).then(|| self.snapshot_bytes / self.wal_bytes)
    }
}

/// Latency summary of one operation type.
#[derive(Clone, Debug, PartialEq)]
struct OpRow {
    name: &'static str,
    count: u64,
    ops_per_s: f64,
    p50_us: u64,
    p90_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
    mean_us: f64,
    conflicts: u64,
    not_found: u64,
    errors: BTreeMap<String, u64>,
}

impl OpRow {
    fn new(name: &'static str, stats: &OpStats, elapsed: Duration) -> OpRow {
        let h = &stats.latency_us;
        let quantile = |q: f64| {
            if h.is_empty() {
                0
            } else {
                h.value_at_quantile(q)
            }
        };
        OpRow {
            name,
            count: h.len(),
            ops_per_s: h.len() as f64 / elapsed.as_secs_f64().max(1e-9),
            p50_us: quantile(0.50),
            p90_us: quantile(0.90),
            p99_us: quantile(0.99),
            p999_us: quantile(0.999),
            max_us: if h.is_empty() { 0 } else { h.max() },
            mean_us: if h.is_empty() { 0.0 } else { h.mean() },
            conflicts: stats.conflicts,
            not_found: stats.not_found,
            errors: stats.errors.clone(),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "count": self.count,
            "ops_per_s": self.ops_per_s,
            "latency_us": {
                "p50": self.p50_us,
                "p90": self.p90_us,
                "p99": self.p99_us,
                "p999": self.p999_us,
                "max": self.max_us,
                "mean": self.mean_us,
            },
            "conflicts": self.conflicts,
            "not_found": self.not_found,
            "errors": self.errors,
        })
    }
}

/// CPU accounting across the measured window.
#[derive(Clone, Debug, PartialEq)]
struct CpuReport {
    /// Per --admin address: CPU seconds used in the window, or why unknown.
    nodes: Vec<(String, Result<f64, String>)>,
    cluster_cpu_s: f64,
    cpu_us_per_op: Option<f64>,
}

impl CpuReport {
    fn new(
        admin: &[String],
        before: &ClusterSnapshot,
        after: &ClusterSnapshot,
        ops: u64,
    ) -> Option<CpuReport> {
        if admin.is_empty() {
            return None;
        }
        let nodes: Vec<(String, Result<f64, String>)> = admin
            .iter()
            .zip(before.nodes.iter().zip(&after.nodes))
            .map(|(addr, (b, a))| {
                let used = match (b, a) {
                    (Ok(b), Ok(a)) => Ok(a.cpu_seconds - b.cpu_seconds),
                    (Err(e), _) | (_, Err(e)) => Err(e.clone()),
                };
                (addr.clone(), used)
            })
            .collect();
        let cluster_cpu_s: f64 = nodes.iter().filter_map(|(_, r)| r.as_ref().ok()).sum();
        let complete = nodes.iter().all(|(_, r)| r.is_ok());
        let cpu_us_per_op = (complete && ops > 0).then(|| cluster_cpu_s * 1e6 / ops as f64);
        Some(CpuReport {
            nodes,
            cluster_cpu_s,
            cpu_us_per_op,
        })
    }
}

/// Leadership movement across the measured window.
#[derive(Clone, Debug, PartialEq)]
struct LeadershipReport {
    before: Vec<ShardTerm>,
    after: Vec<ShardTerm>,
    term_changes: u64,
    shards_with_new_leader: u64,
    leader_changes_reported: Option<f64>,
    error: Option<String>,
}

impl LeadershipReport {
    fn new(before: &ClusterSnapshot, after: &ClusterSnapshot) -> LeadershipReport {
        let reported = before
            .nodes
            .iter()
            .zip(&after.nodes)
            .map(|(b, a)| match (b, a) {
                (Ok(b), Ok(a)) => Some(a.leader_changes? - b.leader_changes?),
                _ => None,
            })
            .sum::<Option<f64>>()
            .filter(|_| !before.nodes.is_empty());
        let (b, a) = match (&before.shards, &after.shards) {
            (Ok(b), Ok(a)) => (b.clone(), a.clone()),
            (Err(e), _) | (_, Err(e)) => {
                return LeadershipReport {
                    before: Vec::new(),
                    after: Vec::new(),
                    term_changes: 0,
                    shards_with_new_leader: 0,
                    leader_changes_reported: reported,
                    error: Some(format!("cannot read terms: {e}")),
                }
            }
        };
        let mut term_changes = 0;
        let mut shards_with_new_leader = 0;
        for later in &a {
            if let Some(earlier) = b.iter().find(|s| s.shard == later.shard) {
                term_changes += later.term.saturating_sub(earlier.term);
                if later.leader != earlier.leader || later.term != earlier.term {
                    shards_with_new_leader += 1;
                }
            }
        }
        LeadershipReport {
            before: b,
            after: a,
            term_changes,
            shards_with_new_leader,
            leader_changes_reported: reported,
            error: None,
        }
    }
}

const MIB: f64 = (1u64 << 20) as f64;

/// Everything the run reports.
pub(super) struct Report {
    settings: Settings,
    prefill: Option<PrefillReport>,
    elapsed: Duration,
    rows: Vec<OpRow>,
    /// All operation types together.
    total: OpRow,
    cpu: Option<CpuReport>,
    leadership: LeadershipReport,
    /// What the nodes wrote to disk in the measured window (with --admin).
    disk: Option<DiskCounters>,
    /// The load generator's CPU and its machine's CPU pressure.
    host: HostReport,
}

impl Report {
    pub(super) fn new(
        settings: &Settings,
        prefill: Option<PrefillReport>,
        measured: &Measured,
    ) -> Report {
        let rows: Vec<OpRow> = settings
            .args
            .mix
            .kinds()
            .map(|k| OpRow::new(k.name(), &measured.stats.ops[k.index()], measured.elapsed))
            .collect();
        let total = OpRow::new("total", &measured.stats.total(), measured.elapsed);
        Report {
            settings: settings.clone(),
            prefill,
            elapsed: measured.elapsed,
            cpu: CpuReport::new(
                &settings.args.admin,
                &measured.before,
                &measured.after,
                total.count,
            ),
            leadership: LeadershipReport::new(&measured.before, &measured.after),
            disk: DiskCounters::growth(&measured.before, &measured.after),
            host: HostReport::new(&measured.before.host, &measured.after.host, total.count),
            rows,
            total,
        }
    }

    pub(super) fn to_json(&self) -> Value {
        let args = &self.settings.args;
        let ops: serde_json::Map<String, Value> = self
            .rows
            .iter()
            .map(|r| (r.name.to_string(), r.to_json()))
            .collect();
        let cpu = self.cpu.as_ref().map(|cpu| {
            let nodes: Vec<Value> = cpu
                .nodes
                .iter()
                .map(|(addr, used)| match used {
                    Ok(s) => json!({ "admin": addr, "cpu_s": s, "error": null }),
                    Err(e) => json!({ "admin": addr, "cpu_s": null, "error": e }),
                })
                .collect();
            json!({
                "nodes": nodes,
                "cluster_cpu_s": cpu.cluster_cpu_s,
                "cpu_us_per_op": cpu.cpu_us_per_op,
            })
        });
        let terms = |shards: &[ShardTerm]| -> Vec<Value> {
            shards
                .iter()
                .map(|s| json!({ "shard": s.shard, "term": s.term, "leader": s.leader }))
                .collect()
        };
        let l = &self.leadership;
        json!({
            "config": {
                "endpoints": self.settings.endpoints,
                "clients": args.clients,
                "threads": self.settings.threads,
                "pipeline": args.pipeline,
                "duration_s": self.settings.duration.map(|d| d.as_secs_f64()),
                "ops": args.ops,
                "warmup_s": args.warmup.as_secs_f64(),
                "key_size": args.key_size,
                "value_size": args.value_size,
                "keyspace": args.keyspace,
                "mix": {
                    "put": args.mix.weight(OpKind::Put),
                    "get": args.mix.weight(OpKind::Get),
                    "cas": args.mix.weight(OpKind::Cas),
                },
                "consistency": args.consistency.name(),
                "read_from": args.read_from.name(),
                "seed": self.settings.seed,
                "prefill": args.prefill,
                "plot": args.plot.as_ref().map(|p| p.display().to_string()),
                "hdr": args.hdr.as_ref().map(|p| p.display().to_string()),
            },
            "prefill": self.prefill.as_ref().map(|p| json!({
                "keys": p.keys,
                "seconds": p.seconds,
                "errors": p.errors,
            })),
            "elapsed_s": self.elapsed.as_secs_f64(),
            "total": self.total.to_json(),
            "ops": ops,
            "cpu": cpu,
            "disk": self.disk.map(DiskCounters::to_json),
            "load_generator": {
                "cpu_s": self.host.cpu_s,
                "cpu_us_per_op": self.host.cpu_us_per_op,
                "host_cpu_pressure": self.host.cpu_pressure,
            },
            "leadership": {
                "term_changes": l.term_changes,
                "shards_with_new_leader": l.shards_with_new_leader,
                "leader_changes_reported": l.leader_changes_reported,
                "before": terms(&l.before),
                "after": terms(&l.after),
                "error": l.error,
            },
        })
    }

    pub(super) fn to_table(&self) -> String {
        let args = &self.settings.args;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} clients x {} in flight on {} threads, {} B keys, {} B values, {} keys, mix {}{}, seed {}",
            args.clients,
            args.pipeline,
            self.settings.threads,
            args.key_size,
            args.value_size,
            args.keyspace,
            args.mix,
            if args.mix.weight(OpKind::Get) > 0 {
                format!(
                    ", {} gets from the {}",
                    args.consistency.name(),
                    args.read_from.name()
                )
            } else {
                String::new()
            },
            self.settings.seed,
        );
        let _ = writeln!(
            out,
            "measured {:.2} s after {:.1} s warm-up",
            self.elapsed.as_secs_f64(),
            args.warmup.as_secs_f64()
        );
        out.push('\n');
        out.push_str(&format_rows(&self.rows, &self.total));
        let outcomes: Vec<String> = self
            .rows
            .iter()
            .flat_map(|r| {
                let conflicts =
                    (r.conflicts > 0).then(|| format!("{} conflicts: {}", r.name, r.conflicts));
                let absent =
                    (r.not_found > 0).then(|| format!("{} not found: {}", r.name, r.not_found));
                conflicts.into_iter().chain(absent)
            })
            .collect();
        if !outcomes.is_empty() {
            let _ = writeln!(out, "{}", outcomes.join(", "));
        }
        out.push('\n');
        if let Some(p) = &self.prefill {
            let errors: u64 = p.errors.values().sum();
            let _ = writeln!(
                out,
                "prefill: {} keys in {:.1} s, {} errors",
                p.keys, p.seconds, errors
            );
        }
        if let Some(cpu) = &self.cpu {
            let per_node: Vec<String> = cpu
                .nodes
                .iter()
                .map(|(addr, used)| match used {
                    Ok(s) => format!("{addr} {s:.2} s"),
                    Err(e) => format!("{addr} unknown ({e})"),
                })
                .collect();
            match cpu.cpu_us_per_op {
                Some(us) => {
                    let _ = writeln!(
                        out,
                        "cluster CPU: {:.2} s, {us:.1} µs per operation ({})",
                        cpu.cluster_cpu_s,
                        per_node.join(", ")
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "cluster CPU: per-operation figure unavailable ({})",
                        per_node.join(", ")
                    );
                }
            }
        }
        if let Some(disk) = self.disk {
            let _ = writeln!(
                out,
                "disk: {:.0} MiB to the WALs, {:.0} snapshots of {:.0} MiB in all{}",
                disk.wal_bytes / MIB,
                disk.snapshots,
                disk.snapshot_bytes / MIB,
                disk.ratio()
                    .map(|r| format!(" ({r:.2}x the log)"))
                    .unwrap_or_default()
            );
        }
        let host = &self.host;
        let _ = writeln!(
            out,
            "load generator: {:.2} s CPU{}{}",
            host.cpu_s,
            host.cpu_us_per_op
                .map(|us| format!(", {us:.1} µs per operation"))
                .unwrap_or_default(),
            host.cpu_pressure
                .map(|p| format!(
                    "; its machine's CPU pressure {:.0} % (the share of the window in which a runnable thread waited for a CPU)",
                    p * 100.0
                ))
                .unwrap_or_default()
        );
        let l = &self.leadership;
        match &l.error {
            Some(e) => {
                let _ = writeln!(out, "leadership: {e}");
            }
            None => {
                let _ = write!(
                    out,
                    "leadership: {} term changes, {} of {} shards changed leader",
                    l.term_changes,
                    l.shards_with_new_leader,
                    l.after.len()
                );
                if let Some(n) = l.leader_changes_reported {
                    let _ = write!(out, " (raft_leader_changes_total grew by {n:.0})");
                }
                out.push('\n');
            }
        }
        out
    }
}

/// The per-operation table, with a total row when more than one operation
/// type ran.
fn format_rows(rows: &[OpRow], total: &OpRow) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<6} {:>10} {:>10} {:>8} {:>8} {:>8} {:>9} {:>9}  errors",
        "op", "count", "ops/s", "p50_us", "p90_us", "p99_us", "p99.9_us", "max_us"
    );
    let total = (rows.len() > 1).then_some(total);
    for r in rows.iter().chain(total) {
        let errors = if r.errors.is_empty() {
            "0".to_string()
        } else {
            r.errors
                .iter()
                .map(|(code, n)| format!("{code}={n}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let _ = writeln!(
            out,
            "{:<6} {:>10} {:>10.0} {:>8} {:>8} {:>8} {:>9} {:>9}  {errors}",
            r.name, r.count, r.ops_per_s, r.p50_us, r.p90_us, r.p99_us, r.p999_us, r.max_us
        );
    }
    out
}

/// The progress line: drawn in place on a terminal, printed otherwise.
pub(super) struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    pub(super) fn new() -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {msg}")
                    .expect("the progress template is valid"),
            );
            bar
        });
        Progress { bar }
    }

    pub(super) fn show(&self, line: String) {
        match &self.bar {
            Some(bar) => bar.set_message(line),
            None => eprintln!("{line}"),
        }
    }

    pub(super) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// One progress line for the last second's `tick`.
pub(super) fn progress_line(
    label: &str,
    elapsed: Duration,
    tick: &Tick,
    window: Duration,
) -> String {
    let seconds = window.as_secs_f64().max(1e-3);
    let (p50, p99) = if tick.latency_us.is_empty() {
        (0, 0)
    } else {
        (
            tick.latency_us.value_at_quantile(0.50),
            tick.latency_us.value_at_quantile(0.99),
        )
    };
    format!(
        "{label:<7} {:>5.0}s  {:>9.0} ops/s  p50 {:>7} µs  p99 {:>7} µs  errors {}",
        elapsed.as_secs_f64(),
        tick.latency_us.len() as f64 / seconds,
        p50,
        p99,
        tick.errors
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::stats::Outcome;

    #[test]
    fn rows_report_quantiles_and_rates() {
        let mut stats = OpStats::default();
        for us in 1..=1000 {
            stats.record(&Outcome::Ok, us);
        }
        stats.record(&Outcome::Error("TIMEOUT".into()), 1);
        let row = OpRow::new("put", &stats, Duration::from_secs(2));
        assert_eq!(row.count, 1000);
        assert!((row.ops_per_s - 500.0).abs() < 1e-9);
        assert_eq!(row.p50_us, 500);
        assert_eq!(row.p90_us, 900);
        assert_eq!(row.p99_us, 990);
        assert_eq!(row.p999_us, 999);
        assert_eq!(row.max_us, 1000);
        assert_eq!(row.errors.values().sum::<u64>(), 1);
        let json = row.to_json();
        assert_eq!(json["latency_us"]["p99"], 990);
        assert_eq!(json["errors"]["TIMEOUT"], 1);

        let empty = OpRow::new("cas", &OpStats::default(), Duration::from_secs(1));
        assert_eq!((empty.count, empty.p50_us, empty.max_us), (0, 0, 0));
    }

    #[test]
    fn table_has_one_line_per_op_and_a_total_only_for_several() {
        let mut put = OpStats::default();
        put.record(&Outcome::Ok, 1200);
        put.record(&Outcome::Error("UNAVAILABLE".into()), 1);
        let mut get = OpStats::default();
        get.record(&Outcome::Ok, 300);
        let elapsed = Duration::from_secs(1);
        let rows = vec![
            OpRow::new("put", &put, elapsed),
            OpRow::new("get", &get, elapsed),
        ];
        let mut all = put.clone();
        all.merge(&get);
        let total = OpRow::new("total", &all, elapsed);
        let table = format_rows(&rows, &total);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].starts_with("op") && lines[0].contains("p99.9_us"));
        assert!(lines[1].starts_with("put") && lines[1].ends_with("UNAVAILABLE=1"));
        assert!(lines[1].contains(" 1200 "), "{}", lines[1]);
        assert!(lines[2].starts_with("get") && lines[2].ends_with("  0"));
        assert!(lines[3].starts_with("total") && lines[3].ends_with("UNAVAILABLE=1"));
        let single = format_rows(&rows[..1], &rows[0]);
        assert_eq!(single.lines().count(), 2, "{single}");
    }

    /// `terms` holds one `(shard, term, leader)` per shard, in shard order.
    fn snapshot(terms: &[(u32, u64, u64)], cpu: &[f64]) -> ClusterSnapshot {
        let shards = terms
            .iter()
            .map(|&(shard, term, leader)| ShardTerm {
                shard,
                term,
                leader,
            })
            .collect();
        ClusterSnapshot {
            shards: Ok(shards),
            nodes: cpu
                .iter()
                .map(|s| {
                    Ok(AdminScrape {
                        cpu_seconds: *s,
                        leader_changes: Some(1.0),
                        disk: Some(DiskCounters {
                            wal_bytes: *s * 100.0,
                            snapshot_bytes: *s * 10.0,
                            snapshots: *s,
                        }),
                    })
                })
                .collect(),
            host: HostReading::now(),
        }
    }

    #[test]
    fn leadership_and_cpu_compare_before_and_after() {
        let before = snapshot(&[(0, 2, 1), (1, 5, 2)], &[1.0, 2.0]);
        let after = snapshot(&[(0, 2, 1), (1, 7, 3)], &[2.0, 4.0]);
        let l = LeadershipReport::new(&before, &after);
        assert_eq!((l.term_changes, l.shards_with_new_leader), (2, 1));
        let disk = DiskCounters::growth(&before, &after).unwrap();
        assert_eq!(
            (disk.wal_bytes, disk.snapshot_bytes, disk.snapshots),
            (300.0, 30.0, 3.0)
        );
        assert_eq!(disk.ratio(), Some(0.1));
        assert_eq!(l.leader_changes_reported, Some(0.0));
        assert_eq!(l.error, None);

        let admin = vec!["a:1".to_string(), "b:2".to_string()];
        let cpu = CpuReport::new(&admin, &before, &after, 1_000_000).unwrap();
        assert!((cpu.cluster_cpu_s - 3.0).abs() < 1e-9);
        assert!((cpu.cpu_us_per_op.unwrap() - 3.0).abs() < 1e-9);
        assert!(CpuReport::new(&[], &before, &after, 1).is_none());

        let mut broken = after.clone();
        broken.nodes[1] = Err("b:2 refused".into());
        broken.shards = Err("no node answered".into());
        let cpu = CpuReport::new(&admin, &before, &broken, 10).unwrap();
        assert_eq!(
            cpu.cpu_us_per_op, None,
            "a missing node makes the total unknown"
        );
        let l = LeadershipReport::new(&before, &broken);
        assert!(l.error.unwrap().contains("no node answered"));
    }

    #[test]
    fn progress_line_shows_rate_quantiles_and_errors() {
        let mut tick = Tick::new();
        for us in 1..=100 {
            tick.record(&Outcome::Ok, us);
        }
        tick.record(&Outcome::Error("TIMEOUT".into()), 9);
        let line = progress_line("run", Duration::from_secs(3), &tick, Duration::from_secs(1));
        assert!(line.contains("3s"), "{line}");
        assert!(line.contains("100 ops/s"), "{line}");
        assert!(line.contains("p50      50 µs"), "{line}");
        assert!(line.contains("p99      99 µs"), "{line}");
        assert!(line.ends_with("errors 1"), "{line}");
    }
}
