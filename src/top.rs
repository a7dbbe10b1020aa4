//! `corekv top`: a live view of the cluster. Every interval it reads each
//! node's admin `/status` and `/metrics` (the nodes and their admin ports
//! come from the cluster's topology) and shows per node and shard the role,
//! term, leader, apply lag, requests and errors per second, p99 request
//! latency and p99 WAL fsync over the last interval. At a terminal it is a
//! full-screen table (ratatui) with leaders and problems highlighted, `q`
//! quits; otherwise it prints plain lines, so it can be logged or tested.

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use corekv_client::{block_on, Client, ClientOptions};

use crate::duration::parse_duration;
use crate::scrape::{self, histogram_quantile};

/// Options of `corekv top`.
#[derive(Args, Debug)]
pub struct TopArgs {
    /// Time between refreshes.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    interval: Duration,
    /// Stop after this many refreshes (default: until `q`, or for ever
    /// when stdout is not a terminal).
    #[arg(long)]
    iterations: Option<u64>,
}

/// A shard whose applied index trails its commit index by more than this
/// is shown as a problem (the readiness bound).
const LAG_PROBLEM: u64 = corekv_node::admin::READY_MAX_APPLY_LAG;

/// Refreshes between two reads of the topology (nodes come and go).
const TOPOLOGY_EVERY: u64 = 10;

/// One node to watch.
#[derive(Clone, Debug)]
struct Watched {
    id: u64,
    admin: Option<String>,
}

/// Cumulative counters of one shard of one node at one refresh.
#[derive(Clone, Debug, Default)]
struct Counters {
    requests: f64,
    errors: f64,
    request_buckets: Vec<(f64, f64)>,
    fsync_buckets: Vec<(f64, f64)>,
}

/// One row of the view.
#[derive(Clone, Debug, Default)]
struct Row {
    node: u64,
    shard: u64,
    role: String,
    term: u64,
    leader: u64,
    lag: u64,
    requests_per_second: Option<f64>,
    errors_per_second: Option<f64>,
    request_p99_ms: Option<f64>,
    fsync_p99_ms: Option<f64>,
    problem: Option<String>,
}

impl Row {
    fn is_leader(&self) -> bool {
        self.role == "leader"
    }

    fn cells(&self) -> [String; 10] {
        let rate = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        [
            self.node.to_string(),
            self.shard.to_string(),
            self.role.clone(),
            self.term.to_string(),
            self.leader.to_string(),
            self.lag.to_string(),
            rate(self.requests_per_second),
            rate(self.errors_per_second),
            ms(self.request_p99_ms),
            ms(self.fsync_p99_ms),
        ]
    }
}

const HEADERS: [&str; 10] = [
    "node", "shard", "role", "term", "leader", "lag", "req/s", "err/s", "p99 ms", "fsync ms",
];

/// Runs `corekv top` against the cluster behind `endpoints`.
pub fn run(
    args: TopArgs,
    endpoints: Vec<String>,
    tls: Option<corekv_client::ClientTls>,
    timeout: Duration,
) -> ExitCode {
    let mut view = View {
        endpoints,
        tls,
        timeout,
        nodes: Vec::new(),
        previous: HashMap::new(),
        refreshes: 0,
    };
    if let Err(e) = view.discover() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let interactive = std::io::stdout().is_terminal() && args.iterations.is_none();
    let result = if interactive {
        tui::run(&mut view, args.interval)
    } else {
        plain(&mut view, &args)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Plain lines: a header with the time, then one line per node and shard.
fn plain(view: &mut View, args: &TopArgs) -> anyhow::Result<()> {
    let mut done = 0;
    loop {
        let started = Instant::now();
        let (rows, unreachable) = view.refresh();
        println!(
            "corekv top: {} nodes, refresh {}",
            view.nodes.len(),
            view.refreshes
        );
        println!("{}", HEADERS.map(|h| format!("{h:>10}")).join(""));
        for row in &rows {
            let mut line = row.cells().map(|c| format!("{c:>10}")).join("");
            if row.is_leader() {
                line.push_str("  LEADER");
            }
            if let Some(problem) = &row.problem {
                line.push_str("  ");
                line.push_str(problem);
            }
            println!("{line}");
        }
        for (node, reason) in &unreachable {
            println!("node {node}: {reason}");
        }
        done += 1;
        if args.iterations.is_some_and(|n| done >= n) {
            return Ok(());
        }
        std::thread::sleep(args.interval.saturating_sub(started.elapsed()));
    }
}

/// What `top` knows between refreshes.
struct View {
    endpoints: Vec<String>,
    tls: Option<corekv_client::ClientTls>,
    timeout: Duration,
    nodes: Vec<Watched>,
    /// Counters of the previous refresh by (node, shard), and when.
    previous: HashMap<(u64, u64), (Instant, Counters)>,
    refreshes: u64,
}

impl View {
    /// Reads the nodes and their admin ports from the cluster's topology.
    fn discover(&mut self) -> anyhow::Result<()> {
        let options = ClientOptions {
            endpoints: self.endpoints.clone(),
            request_timeout: self.timeout,
            tls: self.tls.clone(),
            ..Default::default()
        };
        let topology = block_on(async move {
            let client = Client::connect(options).await?;
            Ok::<_, corekv_client::ClientError>(client.topology())
        })?;
        self.nodes = topology
            .nodes
            .iter()
            .map(|n| Watched {
                id: n.node_id,
                admin: (n.admin_port != 0)
                    .then(|| corekv_node::config::host_port(&n.host, n.admin_port)),
            })
            .collect();
        Ok(())
    }

    /// One refresh: the rows, and the nodes that could not be read.
    fn refresh(&mut self) -> (Vec<Row>, Vec<(u64, String)>) {
        self.refreshes += 1;
        if self.refreshes % TOPOLOGY_EVERY == 0 {
            // Keep the old list if the cluster cannot be asked right now.
            let _ = self.discover();
        }
        let mut rows = Vec::new();
        let mut unreachable = Vec::new();
        for node in self.nodes.clone() {
            let Some(admin) = &node.admin else {
                unreachable.push((node.id, "admin port unknown".to_string()));
                continue;
            };
            match read_node(node.id, admin) {
                Ok(node_rows) => {
                    for (mut row, counters) in node_rows {
                        self.rates(&mut row, counters);
                        rows.push(row);
                    }
                }
                Err(reason) => unreachable.push((node.id, reason)),
            }
        }
        mark_leaderless(&mut rows);
        (rows, unreachable)
    }

    /// Fills the per-second figures of `row` from the counters of the
    /// refresh before.
    fn rates(&mut self, row: &mut Row, now: Counters) {
        let key = (row.node, row.shard);
        let at = Instant::now();
        if let Some((then, before)) = self.previous.get(&key) {
            let seconds = at.duration_since(*then).as_secs_f64().max(1e-3);
            let rate = |a: f64, b: f64| ((a - b).max(0.0)) / seconds;
            row.requests_per_second = Some(rate(now.requests, before.requests));
            let errors = rate(now.errors, before.errors);
            row.errors_per_second = Some(errors);
            if errors > 0.0 && row.problem.is_none() {
                row.problem = Some("ERRORS".into());
            }
            row.request_p99_ms = p99_ms(&now.request_buckets, &before.request_buckets);
            row.fsync_p99_ms = p99_ms(&now.fsync_buckets, &before.fsync_buckets);
        }
        self.previous.insert(key, (at, now));
    }
}

/// The p99 of what was observed between two cumulative bucket readings.
fn p99_ms(now: &[(f64, f64)], before: &[(f64, f64)]) -> Option<f64> {
    let delta: Vec<(f64, f64)> = now
        .iter()
        .map(|(bound, count)| {
            let earlier = before
                .iter()
                .find(|(b, _)| b == bound)
                .map_or(0.0, |(_, c)| *c);
            (*bound, (count - earlier).max(0.0))
        })
        .collect();
    histogram_quantile(0.99, &delta).map(|seconds| seconds * 1000.0)
}

/// A shard no node names a leader for is a problem on every row of it.
fn mark_leaderless(rows: &mut [Row]) {
    let mut led: HashMap<u64, bool> = HashMap::new();
    for row in rows.iter() {
        *led.entry(row.shard).or_default() |= row.leader != 0;
    }
    for row in rows.iter_mut() {
        if !led[&row.shard] && row.problem.is_none() {
            row.problem = Some("NO LEADER".into());
        }
    }
}

/// The rows of one node, with the counters its metrics hold now.
fn read_node(id: u64, admin: &str) -> Result<Vec<(Row, Counters)>, String> {
    let status = scrape::get(admin, "/status").map_err(|e| e.to_string())?;
    let metrics = scrape::get(admin, "/metrics").map_err(|e| e.to_string())?;
    let status: serde_json::Value =
        serde_json::from_str(&status).map_err(|e| format!("admin {admin}/status: {e}"))?;
    let mut counters: HashMap<u64, Counters> = HashMap::new();
    for sample in scrape::samples(&metrics) {
        let Some(shard) = sample
            .labels
            .get("shard")
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        let entry = counters.entry(shard).or_default();
        match sample.metric.as_str() {
            "client_requests_total" => {
                let count = scrape::number(&sample.value).unwrap_or(0.0);
                entry.requests += count;
                let status = sample.labels.get("status").unwrap_or("ok");
                if status != "ok" && status != "not_leader" {
                    entry.errors += count;
                }
            }
            "client_request_seconds" => add_buckets(&mut entry.request_buckets, &sample.value),
            "wal_fsync_seconds" => add_buckets(&mut entry.fsync_buckets, &sample.value),
            _ => {}
        }
    }
    let shards = status["shards"].as_array().cloned().unwrap_or_default();
    Ok(shards
        .iter()
        .map(|s| {
            let number = |key: &str| s[key].as_u64().unwrap_or(0);
            let shard = number("shard");
            let role = s["role"].as_str().unwrap_or("?").to_string();
            let lag = number("commit_index").saturating_sub(number("applied_index"));
            let problem = if role == "removed" {
                Some("REMOVED".to_string())
            } else if let Some(full) = s["disk_full"].as_str() {
                Some(format!("DISK FULL: {full}"))
            } else if lag > LAG_PROBLEM {
                Some("LAGGING".to_string())
            } else {
                None
            };
            let row = Row {
                node: id,
                shard,
                role,
                term: number("term"),
                leader: number("leader_id"),
                lag,
                problem,
                ..Default::default()
            };
            (row, counters.remove(&shard).unwrap_or_default())
        })
        .collect())
}

/// Adds a histogram's buckets (one label set of it: summed over ops) to
/// `buckets`.
fn add_buckets(buckets: &mut Vec<(f64, f64)>, histogram: &scrape::Value) {
    for (bound, count) in scrape::buckets(histogram) {
        match buckets.iter_mut().find(|(b, _)| *b == bound) {
            Some((_, sum)) => *sum += count,
            None => buckets.push((bound, count)),
        }
    }
}

/// The full-screen view.
mod tui {
    use std::time::{Duration, Instant};

    use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
    use ratatui::layout::{Constraint, Layout};
    use ratatui::style::{Color, Modifier, Style};
    use ratatui::text::Line;
    use ratatui::widgets::{Block, Paragraph, Row as TableRow, Table};
    use ratatui::DefaultTerminal;

    use super::{Row, View, HEADERS};

    /// Runs until `q`, Esc or Ctrl-C.
    pub(super) fn run(view: &mut View, interval: Duration) -> anyhow::Result<()> {
        let mut terminal = ratatui::init();
        let result = run_in(&mut terminal, view, interval);
        ratatui::restore();
        result
    }

    fn run_in(
        terminal: &mut DefaultTerminal,
        view: &mut View,
        interval: Duration,
    ) -> anyhow::Result<()> {
        loop {
            let (rows, unreachable) = view.refresh();
            let refreshed = Instant::now();
            terminal.draw(|frame| draw(frame, view, &rows, &unreachable))?;
            // Keys are read until the next refresh is due.
            while refreshed.elapsed() < interval {
                let wait = interval.saturating_sub(refreshed.elapsed());
                if event::poll(wait)? {
                    if let Event::Key(key) = event::read()? {
                        let ctrl_c = key.code == KeyCode::Char('c')
                            && key.modifiers.contains(KeyModifiers::CONTROL);
                        let quit = matches!(key.code, KeyCode::Char('q') | KeyCode::Esc);
                        if key.kind == KeyEventKind::Press && (quit || ctrl_c) {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }

    fn draw(
        frame: &mut ratatui::Frame<'_>,
        view: &View,
        rows: &[Row],
        unreachable: &[(u64, String)],
    ) {
        let [table_area, footer_area] =
            Layout::vertical([Constraint::Min(3), Constraint::Length(3)]).areas(frame.area());
        let header = TableRow::new(HEADERS).style(Style::new().add_modifier(Modifier::BOLD));
        let table_rows = rows.iter().map(|row| {
            let mut cells: Vec<String> = row.cells().to_vec();
            if let Some(problem) = &row.problem {
                cells.push(problem.clone());
            }
            let style = if row.problem.is_some() {
                Style::new().fg(Color::Red)
            } else if row.is_leader() {
                Style::new().fg(Color::Green).add_modifier(Modifier::BOLD)
            } else {
                Style::new()
            };
            TableRow::new(cells).style(style)
        });
        let mut widths = vec![Constraint::Length(10); HEADERS.len()];
        widths.push(Constraint::Min(10));
        let title = format!(
            " corekv top: {} nodes, refresh {} (q quits) ",
            view.nodes.len(),
            view.refreshes
        );
        let table = Table::new(table_rows, widths)
            .header(header)
            .block(Block::bordered().title(title));
        frame.render_widget(table, table_area);
        let footer: Vec<Line> = if unreachable.is_empty() {
            vec![Line::from("every node answered")]
        } else {
            unreachable
                .iter()
                .map(|(node, reason)| {
                    Line::styled(
                        format!("node {node}: {reason}"),
                        Style::new().fg(Color::Red),
                    )
                })
                .collect()
        };
        frame.render_widget(Paragraph::new(footer).block(Block::bordered()), footer_area);
    }
}
