//! `corekv bench`: a closed-loop load generator against a running cluster.
//!
//! # Model
//!
//! `--threads T` OS threads each run their own monoio runtime and their
//! share of the `--clients N` clients (client `c` runs on thread `c % T`).
//! Every client is its own [`Client`] with its own connections, as a real
//! application process would be, and keeps `--pipeline D` requests in
//! flight: D loops ("slots") per client, each issuing its next request only
//! when its previous one has completed (closed loop). The client library is
//! shard-aware, so every request goes straight to the leader of its shard.
//!
//! Each slot draws its operations from its own RNG, seeded from `--seed` and
//! the slot's number, so a run with the same seed, clients and pipeline
//! issues the same keys in the same order per slot. Keys are the key index
//! in `[0, keyspace)` as zero-padded decimal, exactly `--key-size` bytes.
//! Values are random bytes of `--value-size`, drawn from a small pool made
//! once per thread so that generating them costs nothing on the hot path.
//!
//! A CAS is a read-modify-write: a stale get of the key's version, then a
//! compare-and-swap at that version. Its latency covers both calls. A
//! VERSION_MISMATCH is an outcome ("conflict"), not an error: another
//! client won the race. A get of an absent key is an outcome ("not found").
//!
//! # Phases
//!
//! Optional prefill (every key of the keyspace written once), then warm-up
//! (`--warmup`, not recorded), then the measured window: `--duration`, or
//! until `--ops` operations have been issued. An operation is recorded when
//! it started inside the window and, with `--duration`, finished inside it.
//!
//! # Output
//!
//! Once a second a progress line on stderr. At the end a table per operation
//! type on stdout, or with `--json` one JSON object:
//!
//! ```text
//! {
//!   "config": { "endpoints": [..], "clients": 64, "threads": 2, "pipeline": 1,
//!               "duration_s": 20.0 | null, "ops": null | 100000, "warmup_s": 2.0,
//!               "key_size": 16, "value_size": 256, "keyspace": 100000,
//!               "mix": { "put": 50, "get": 50, "cas": 0 },
//!               "consistency": "linearizable", "read_from": "leader", "seed": 1, "prefill": false,
//!               "plot": null | "FILE.svg", "hdr": null | "FILE" },
//!   "prefill": null | { "keys": 100000, "seconds": 3.2, "errors": { "CODE": n } },
//!   "elapsed_s": 20.0,
//!   "total": { same shape as one entry of "ops", all operation types merged },
//!   "ops": { "put": { "count": n, "ops_per_s": x,
//!                     "latency_us": { "p50": n, "p90": n, "p99": n, "p999": n,
//!                                     "max": n, "mean": x },
//!                     "conflicts": n, "not_found": n, "errors": { "CODE": n } },
//!            "get": {..}, "cas": {..} },            // only the ops in the mix
//!   "cpu": null | { "nodes": [ { "admin": "host:port", "cpu_s": x | null,
//!                                "error": null | ".." } ],
//!                   "cluster_cpu_s": x, "cpu_us_per_op": x },
//!   "disk": null | { "wal_bytes": x, "snapshot_bytes": x, "snapshots": x,
//!                    "snapshot_to_log_ratio": x | null },
//!   "load_generator": { "cpu_s": x, "cpu_us_per_op": x | null,
//!                       "host_cpu_pressure": x | null },
//!   "leadership": { "term_changes": n, "shards_with_new_leader": n,
//!                   "leader_changes_reported": null | n,
//!                   "before": [ { "shard": 0, "term": 3, "leader": 1 } ],
//!                   "after": [..], "error": null | ".." }
//! }
//! ```
//!
//! `cpu` is present with `--admin`: the sum over the nodes of the growth of
//! `process_cpu_seconds_total` across the measured window, per measured
//! operation. `disk` (also with `--admin`) sums over the nodes the growth of
//! `wal_bytes_written_total`, `snapshot_bytes_written_total` and
//! `snapshots_written_total` across the window. `load_generator` is this
//! process's CPU time in the window, and `host_cpu_pressure` the share of
//! the window (from 0 to 1) in which some runnable thread of this machine
//! waited for a CPU (the growth of the "some" total of `/proc/pressure/cpu`;
//! null without PSI): high when the bench and the nodes share too few
//! cores. `leader_changes_reported` is the growth of
//! `raft_leader_changes_total` summed over the nodes (every replica counts
//! each change it sees). Error codes are the server's (`TIMEOUT`,
//! `UNAVAILABLE`, ...) or the client's own `CLIENT_TIMEOUT` (retries ran out
//! of time) and `NO_ENDPOINT`.
//!
//! Besides the report, `--plot FILE.svg` draws the run (throughput and
//! p50/p99 per second, latency by percentile; see `plot.rs`) and `--hdr FILE`
//! writes the latency distribution in HdrHistogram's percentile text format,
//! in milliseconds (see `hgrm.rs`), with one more file per operation type
//! when the mix has several. Both files are created before the run and
//! written after the report.
//!
//! The exit code is 0 when the run completed, errors or not (they are in the
//! report), and 2 when it could not run or its files could not be written.

mod hgrm;
mod host;
mod outputs;
mod plot;
mod report;
mod settings;
mod stats;
mod timeline;
mod workload;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use corekv_client::{block_on, Client, ClientError, ClientOptions};
use corekv_proto::client::{Consistency, ErrorCode};

use crate::scrape;

use outputs::OutputFiles;
use report::{
    progress_line, AdminScrape, ClusterSnapshot, DiskCounters, Measured, PrefillReport, Progress,
    Report, ShardTerm,
};
use settings::Settings;
pub use settings::{BenchArgs, BenchConsistency};
use stats::{Outcome, Stats, Tick};
pub use workload::Mix;
use workload::{key_bytes, value_pool, OpKind, Workload};

/// A slot whose request failed waits this long before its next one, so a
/// dead cluster is not hammered in a tight loop.
const ERROR_PAUSE: Duration = Duration::from_millis(10);
/// How often threads report and the progress line is drawn.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// How long asking the nodes for their shard terms, before and after the
/// window, may take (client retries included).
const TERMS_TIMEOUT: Duration = Duration::from_secs(5);

/// Name of the error code of a failed call, as reported.
fn error_code_name(error: &ClientError) -> String {
    match error {
        ClientError::Server { code, .. } => code.as_str_name().to_string(),
        ClientError::Timeout { .. } => "CLIENT_TIMEOUT".to_string(),
        ClientError::OutcomeUnknown { .. } => "OUTCOME_UNKNOWN".to_string(),
        ClientError::NoEndpoint(_) => "NO_ENDPOINT".to_string(),
    }
}

/// What the worker threads are asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Job {
    /// Write every key once.
    Prefill,
    /// Warm up, then measure.
    Measure,
}

/// State shared by the main thread and the workers of one job.
struct Shared {
    settings: Settings,
    job: Job,
    /// Set when the run must end early (a thread could not connect).
    stop: AtomicBool,
    /// Measured operations issued so far (with --ops).
    issued: AtomicU64,
    /// Next key to prefill.
    prefill_next: AtomicU64,
    /// Keys prefilled so far (done or failed).
    prefill_done: AtomicU64,
    /// The first problem a thread met while setting up.
    setup_error: Mutex<Option<String>>,
    /// Every thread and the main thread meet here once connected...
    connected: Barrier,
    /// ...and here once the main thread has set `start`.
    go: Barrier,
    /// When the job started (the warm-up, for Measure).
    start: OnceLock<Instant>,
}

impl Shared {
    fn new(settings: Settings, job: Job) -> Arc<Shared> {
        let parties = settings.threads + 1;
        Arc::new(Shared {
            settings,
            job,
            stop: AtomicBool::new(false),
            issued: AtomicU64::new(0),
            prefill_next: AtomicU64::new(0),
            prefill_done: AtomicU64::new(0),
            setup_error: Mutex::new(None),
            connected: Barrier::new(parties),
            go: Barrier::new(parties),
            start: OnceLock::new(),
        })
    }

    fn fail_setup(&self, error: String) {
        let mut slot = self.setup_error.lock().expect("setup_error lock poisoned");
        slot.get_or_insert(error);
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Starts the worker threads of a job and lets them go once all connected.
/// Returns the threads and the instant the job started.
fn start_workers(
    shared: &Arc<Shared>,
    ticks: &mpsc::Sender<Tick>,
) -> anyhow::Result<(Vec<std::thread::JoinHandle<Stats>>, Instant)> {
    let mut handles = Vec::new();
    for thread in 0..shared.settings.threads {
        let shared = shared.clone();
        let ticks = ticks.clone();
        let handle = std::thread::Builder::new()
            .name(format!("corekv-bench-{thread}"))
            .spawn(move || worker(shared, thread, ticks))
            .context("cannot start a bench thread")?;
        handles.push(handle);
    }
    shared.connected.wait();
    let start = Instant::now();
    shared
        .start
        .set(start)
        .expect("the job start is set once, by the main thread");
    shared.go.wait();
    let error = shared
        .setup_error
        .lock()
        .expect("setup_error lock poisoned")
        .clone();
    if let Some(error) = error {
        for handle in handles {
            let _ = handle.join();
        }
        bail!("{error}");
    }
    Ok((handles, start))
}

fn join_workers(handles: Vec<std::thread::JoinHandle<Stats>>) -> anyhow::Result<Stats> {
    let mut total = Stats::default();
    for handle in handles {
        match handle.join() {
            Ok(stats) => total.merge(&stats),
            Err(_) => bail!("a bench thread panicked; see its message above"),
        }
    }
    Ok(total)
}

/// Body of one worker thread. It always passes both barriers, even when it
/// cannot set up, so the main thread never waits forever.
fn worker(shared: Arc<Shared>, thread: usize, ticks: mpsc::Sender<Tick>) -> Stats {
    let runtime = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .uring_builder(corekv_transport::uring_builder())
        .enable_timer()
        .build();
    let mut runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            shared.fail_setup(format!(
                "bench thread {thread}: cannot build a runtime: {e}"
            ));
            shared.connected.wait();
            shared.go.wait();
            return Stats::default();
        }
    };
    runtime.block_on(worker_main(shared, thread, ticks))
}

async fn worker_main(shared: Arc<Shared>, thread: usize, ticks: mpsc::Sender<Tick>) -> Stats {
    let settings = &shared.settings;
    let mut clients = Vec::new();
    for c in settings.clients_of(thread) {
        match Client::connect(settings.client_options()).await {
            Ok(client) => clients.push((c, client)),
            Err(e) => {
                shared.fail_setup(format!("client {c} cannot connect: {e}"));
                break;
            }
        }
    }
    // Blocking here is fine: no request is in flight on this thread yet.
    shared.connected.wait();
    shared.go.wait();
    if shared.stop.load(Ordering::Relaxed) {
        return Stats::default();
    }
    let start = *shared.start.get().expect("start is set before `go`");
    let timeline = match shared.job {
        Job::Measure => settings.timeline(),
        Job::Prefill => None,
    };
    let stats = Rc::new(RefCell::new(Stats::new(timeline)));
    let tick = Rc::new(RefCell::new(Tick::new()));
    let values = Rc::new(value_pool(settings.seed, thread, settings.args.value_size));
    let finished = Rc::new(std::cell::Cell::new(false));
    monoio::spawn(report_ticks(tick.clone(), ticks.clone(), finished.clone()));
    let mut slots = Vec::new();
    for (c, client) in &clients {
        for d in 0..settings.args.pipeline {
            let slot = Slot {
                client: client.clone(),
                shared: shared.clone(),
                values: values.clone(),
                stats: stats.clone(),
                tick: tick.clone(),
                start,
            };
            let number = (*c * settings.args.pipeline + d) as u64;
            slots.push(match shared.job {
                Job::Prefill => monoio::spawn(slot.prefill()),
                Job::Measure => monoio::spawn(slot.measure(number)),
            });
        }
    }
    for slot in slots {
        slot.await;
    }
    finished.set(true);
    let last = std::mem::replace(&mut *tick.borrow_mut(), Tick::new());
    let _ = ticks.send(last);
    let result = stats.borrow().clone();
    result
}

/// Sends the thread's tick to the main thread once a second.
async fn report_ticks(
    tick: Rc<RefCell<Tick>>,
    ticks: mpsc::Sender<Tick>,
    finished: Rc<std::cell::Cell<bool>>,
) {
    loop {
        monoio::time::sleep(PROGRESS_INTERVAL).await;
        if finished.get() {
            return;
        }
        let report = std::mem::replace(&mut *tick.borrow_mut(), Tick::new());
        if ticks.send(report).is_err() {
            return;
        }
    }
}

/// One closed-loop request slot.
struct Slot {
    client: Client,
    shared: Arc<Shared>,
    values: Rc<Vec<Bytes>>,
    stats: Rc<RefCell<Stats>>,
    tick: Rc<RefCell<Tick>>,
    start: Instant,
}

impl Slot {
    async fn measure(self, number: u64) {
        let settings = &self.shared.settings;
        let args = &settings.args;
        let mut workload = Workload::new(settings.seed, number, args.mix, args.keyspace);
        let measure_start = self.start + args.warmup;
        let end = settings.duration.map(|d| measure_start + d);
        let consistency = args.consistency.wire();
        // An operation starts when the one before it finished: one clock
        // read per operation, not two (a VM's clock read showed as 3 % of a
        // pipelined bench's CPU).
        let mut previous_finish = None;
        loop {
            if self.shared.stop.load(Ordering::Relaxed) {
                return;
            }
            let began = previous_finish.take().unwrap_or_else(Instant::now);
            if end.is_some_and(|end| began >= end) {
                return;
            }
            let measured = began >= measure_start;
            if let (true, Some(limit)) = (measured, args.ops) {
                if self.shared.issued.fetch_add(1, Ordering::Relaxed) >= limit {
                    return;
                }
            }
            let op = workload.next_op();
            let key = key_bytes(op.key_index, args.key_size);
            let value = self.values[op.value_index].clone();
            let outcome = execute(&self.client, op.kind, key, value, consistency).await;
            let finished = Instant::now();
            let latency_us = (finished - began).as_micros() as u64;
            self.tick.borrow_mut().record(&outcome, latency_us);
            // Without an end (--ops) every measured operation counts.
            let finished_in_window = end.unwrap_or(finished) >= finished;
            if measured && finished_in_window {
                let mut stats = self.stats.borrow_mut();
                stats.ops[op.kind.index()].record(&outcome, latency_us);
                stats.last_finish = stats.last_finish.max(Some(finished));
                if let Some(timeline) = stats.timeline.as_mut() {
                    let offset = finished.saturating_duration_since(measure_start);
                    let completed_latency_us = match outcome {
                        Outcome::Error(_) => None,
                        _ => Some(latency_us),
                    };
                    timeline.record(offset, completed_latency_us);
                }
            }
            if matches!(outcome, Outcome::Error(_)) {
                monoio::time::sleep(ERROR_PAUSE).await;
            } else {
                previous_finish = Some(finished);
            }
        }
    }

    async fn prefill(self) {
        let args = &self.shared.settings.args;
        loop {
            let index = self.shared.prefill_next.fetch_add(1, Ordering::Relaxed);
            if index >= args.keyspace || self.shared.stop.load(Ordering::Relaxed) {
                return;
            }
            let key = key_bytes(index, args.key_size);
            let value = self.values[index as usize % self.values.len()].clone();
            let began = Instant::now();
            let outcome = match self.client.put(key, value).await {
                Ok(_) => Outcome::Ok,
                Err(e) => Outcome::Error(error_code_name(&e)),
            };
            let latency_us = began.elapsed().as_micros() as u64;
            self.tick.borrow_mut().record(&outcome, latency_us);
            self.stats.borrow_mut().ops[OpKind::Put.index()].record(&outcome, latency_us);
            self.shared.prefill_done.fetch_add(1, Ordering::Relaxed);
            if matches!(outcome, Outcome::Error(_)) {
                monoio::time::sleep(ERROR_PAUSE).await;
            }
        }
    }
}

async fn execute(
    client: &Client,
    kind: OpKind,
    key: Bytes,
    value: Bytes,
    consistency: Consistency,
) -> Outcome {
    let failed = |e: ClientError| Outcome::Error(error_code_name(&e));
    match kind {
        OpKind::Put => client
            .put(key, value)
            .await
            .map_or_else(failed, |_| Outcome::Ok),
        OpKind::Get => match client.get(key, consistency).await {
            Ok(Some(_)) => Outcome::Ok,
            Ok(None) => Outcome::NotFound,
            Err(e) => failed(e),
        },
        OpKind::Cas => {
            // A stale read is enough: a CAS at an outdated version is exactly
            // the conflict the benchmark wants to count.
            let version = match client.get(key.clone(), Consistency::Stale).await {
                Ok(Some((_, version))) => version,
                Ok(None) => 0,
                Err(e) => return failed(e),
            };
            match client.cas(key, version, value).await {
                Ok(_) => Outcome::Ok,
                Err(ClientError::Server {
                    code: ErrorCode::VersionMismatch,
                    ..
                }) => Outcome::Conflict,
                Err(e) => failed(e),
            }
        }
    }
}

/// Runs `corekv bench`.
pub fn run(
    args: BenchArgs,
    endpoints: Vec<String>,
    tls: Option<corekv_client::ClientTls>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let settings = Settings::new(args, endpoints, tls)?;
    let files = OutputFiles::create(&settings)?;
    let prefill = if settings.args.prefill {
        Some(run_prefill(&settings)?)
    } else {
        None
    };
    let started = SystemTime::now();
    let measured = run_measure(&settings)?;
    let report = Report::new(&settings, prefill, &measured);
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
    files.write(&settings, &measured, started)?;
    Ok(ExitCode::SUCCESS)
}

fn run_prefill(settings: &Settings) -> anyhow::Result<PrefillReport> {
    let keyspace = settings.args.keyspace;
    let shared = Shared::new(settings.clone(), Job::Prefill);
    // Prefill shows its own bar; the per-second latency ticks are not needed.
    let (ticks, _unused) = mpsc::channel();
    let (handles, start) = start_workers(&shared, &ticks)?;
    drop(ticks);
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(keyspace);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "prefill [{bar:40}] {pos}/{len} keys  {per_sec}  eta {eta}",
            )
            .expect("the prefill template is valid"),
        );
        bar
    });
    let mut last_print = Instant::now();
    while !handles.iter().all(|h| h.is_finished()) {
        std::thread::sleep(Duration::from_millis(100));
        let done = shared.prefill_done.load(Ordering::Relaxed);
        match &bar {
            Some(bar) => bar.set_position(done),
            None if last_print.elapsed() >= PROGRESS_INTERVAL => {
                eprintln!("prefill {done}/{keyspace} keys");
                last_print = Instant::now();
            }
            None => {}
        }
    }
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let stats = join_workers(handles)?;
    let put = &stats.ops[OpKind::Put.index()];
    let report = PrefillReport {
        keys: keyspace,
        seconds: start.elapsed().as_secs_f64(),
        errors: put.errors.clone(),
    };
    eprintln!(
        "prefilled {} keys in {:.1} s, {} errors",
        report.keys,
        report.seconds,
        put.error_count()
    );
    Ok(report)
}

fn run_measure(settings: &Settings) -> anyhow::Result<Measured> {
    let shared = Shared::new(settings.clone(), Job::Measure);
    let (ticks, tick_rx) = mpsc::channel::<Tick>();
    let (handles, start) = start_workers(&shared, &ticks)?;
    drop(ticks);
    let measure_start = start + settings.args.warmup;
    let progress = Progress::new();
    let mut before: Option<ClusterSnapshot> = None;
    let mut window = Tick::new();
    // Threads report one second after `start` and every second after; the
    // main thread closes its windows a quarter second later, so each window
    // holds one report per thread.
    let mut window_start = start + PROGRESS_INTERVAL / 4;
    loop {
        let now = Instant::now();
        if before.is_none() && now >= measure_start {
            before = Some(snapshot_cluster(settings));
        }
        let mut wake = window_start + PROGRESS_INTERVAL;
        if before.is_none() {
            // Wake at the start of the window to read the cluster then.
            wake = wake.min(measure_start);
        }
        match tick_rx.recv_timeout(wake.saturating_duration_since(Instant::now())) {
            Ok(tick) => window.merge(&tick),
            Err(mpsc::RecvTimeoutError::Timeout)
                if Instant::now() < window_start + PROGRESS_INTERVAL => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                let label = if now < measure_start { "warmup" } else { "run" };
                let line = progress_line(label, now - start, &window, now - window_start);
                progress.show(line);
                window = Tick::new();
                window_start = now;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        // The end of the threads, not of the channel, ends the run: a
        // runtime may keep its tick task (and its sender) until it drops.
        if handles.iter().all(|h| h.is_finished()) {
            break;
        }
    }
    progress.finish();
    let stats = join_workers(handles)?;
    let after = snapshot_cluster(settings);
    // Only threads that all ended before the window opened leave no first
    // snapshot; then nothing was measured and the window is empty.
    let before = before.unwrap_or_else(|| after.clone());
    let elapsed = match settings.duration {
        Some(duration) => duration,
        None => stats.last_finish.map_or(Duration::ZERO, |f| {
            f.saturating_duration_since(measure_start)
        }),
    };
    Ok(Measured {
        stats,
        elapsed,
        before,
        after,
    })
}

/// Terms, leaders and CPU time of the cluster, and the bench's own
/// machine, now.
fn snapshot_cluster(settings: &Settings) -> ClusterSnapshot {
    let host = host::HostReading::now();
    let nodes = settings
        .args
        .admin
        .iter()
        .map(|addr| scrape_admin(addr))
        .collect();
    ClusterSnapshot {
        shards: shard_terms(settings),
        nodes,
        host,
    }
}

/// Terms of every shard, asked of every node through the client protocol
/// (works without --admin).
fn shard_terms(settings: &Settings) -> Result<Vec<ShardTerm>, String> {
    let options = ClientOptions {
        request_timeout: TERMS_TIMEOUT,
        ..settings.client_options()
    };
    block_on(async move {
        let client = Client::connect(options).await.map_err(|e| e.to_string())?;
        let mut replicas = Vec::new();
        for (node_id, addr) in client.node_addrs() {
            let socket = addr
                .parse()
                .map_err(|e| format!("node {node_id}: bad address {addr}: {e}"))?;
            let status = client
                .status_at(socket)
                .await
                .map_err(|e| format!("node {node_id} ({addr}): {e}"))?;
            replicas.extend(status.shards.iter().map(|s| (s.shard, s.term, s.leader_id)));
        }
        Ok(reduce_terms(&replicas))
    })
}

/// Per shard, the highest term among `(shard, term, leader)` replica
/// reports and the leader known at it, in shard order.
fn reduce_terms(replicas: &[(u32, u64, u64)]) -> Vec<ShardTerm> {
    let mut shards: BTreeMap<u32, ShardTerm> = BTreeMap::new();
    for &(shard, term, leader) in replicas {
        let entry = shards.entry(shard).or_insert(ShardTerm {
            shard,
            term,
            leader,
        });
        if term > entry.term || (term == entry.term && entry.leader == 0) {
            *entry = ShardTerm {
                shard,
                term,
                leader,
            };
        }
    }
    shards.into_values().collect()
}

/// Reads /metrics of the admin server at `addr`.
fn scrape_admin(addr: &str) -> Result<AdminScrape, String> {
    let body = scrape::get(addr, "/metrics").map_err(|e| e.to_string())?;
    let cpu_seconds = scrape::metric_sum(&body, "process_cpu_seconds_total")
        .ok_or_else(|| format!("{addr}/metrics has no process_cpu_seconds_total"))?;
    let sum = |name| scrape::metric_sum(&body, name);
    let disk = match (
        sum("wal_bytes_written_total"),
        sum("snapshot_bytes_written_total"),
        sum("snapshots_written_total"),
    ) {
        (Some(wal_bytes), Some(snapshot_bytes), Some(snapshots)) => Some(DiskCounters {
            wal_bytes,
            snapshot_bytes,
            snapshots,
        }),
        _ => None,
    };
    Ok(AdminScrape {
        cpu_seconds,
        leader_changes: sum("raft_leader_changes_total"),
        disk,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terms_take_the_highest_term_of_each_shard() {
        let replicas = [(0, 3, 1), (0, 4, 0), (0, 4, 2), (1, 2, 3), (1, 2, 3)];
        let shards = reduce_terms(&replicas);
        assert_eq!(
            shards,
            vec![
                ShardTerm {
                    shard: 0,
                    term: 4,
                    leader: 2
                },
                ShardTerm {
                    shard: 1,
                    term: 2,
                    leader: 3
                },
            ]
        );
    }
}
