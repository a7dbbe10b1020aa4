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
//!               "consistency": "linearizable", "seed": 1, "prefill": false },
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
//!   "leadership": { "term_changes": n, "shards_with_new_leader": n,
//!                   "leader_changes_reported": null | n,
//!                   "before": [ { "shard": 0, "term": 3, "leader": 1 } ],
//!                   "after": [..], "error": null | ".." }
//! }
//! ```
//!
//! `cpu` is present with `--admin`: the sum over the nodes of the growth of
//! `process_cpu_seconds_total` across the measured window, per measured
//! operation. `leader_changes_reported` is the growth of
//! `raft_leader_changes_total` summed over the nodes (every replica counts
//! each change it sees). Error codes are the server's (`TIMEOUT`,
//! `UNAVAILABLE`, ...) or the client's own `CLIENT_TIMEOUT` (retries ran out
//! of time) and `NO_ENDPOINT`.
//!
//! The exit code is 0 when the run completed, errors or not (they are in the
//! report), and 2 when it could not run.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Read, Write as _};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use corekv_proto::client::{Consistency, ErrorCode};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::{json, Value};

use crate::duration::parse_duration;
use corekv_client::{block_on, Client, ClientError, ClientOptions};

/// Highest latency the histograms hold; slower operations count as this.
const LATENCY_MAX_US: u64 = 60_000_000;
/// Significant digits of the latency histograms (0.1 % resolution).
const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;
/// Distinct random values per thread; puts pick one of them.
const VALUE_POOL_LEN: usize = 64;
/// A slot whose request failed waits this long before its next one, so a
/// dead cluster is not hammered in a tight loop.
const ERROR_PAUSE: Duration = Duration::from_millis(10);
/// How often threads report and the progress line is drawn.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// Connect, read and write timeout of one admin HTTP request.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest admin HTTP answer read.
const ADMIN_MAX_RESPONSE_BYTES: u64 = 16 << 20;
/// Upper bounds of the load shape, so a typo cannot exhaust memory or ports.
const MAX_CLIENTS: usize = 10_000;
const MAX_PIPELINE: usize = 4_096;
const MAX_THREADS: usize = 256;
const MAX_KEY_BYTES: usize = 4_096;
const MAX_VALUE_BYTES: usize = 8 << 20;
/// The measured window when neither --duration nor --ops is given.
const DEFAULT_DURATION: Duration = Duration::from_secs(30);

/// Options of `corekv bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Concurrent clients; each has its own connections.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Length of the measured window, after the warm-up (default 30s).
    #[arg(long, value_parser = parse_duration, conflicts_with = "ops")]
    pub duration: Option<Duration>,
    /// Measure this many operations instead of a time window.
    #[arg(long)]
    pub ops: Option<u64>,
    /// Key length in bytes (keys are zero-padded decimal indexes).
    #[arg(long, default_value_t = 16)]
    pub key_size: usize,
    /// Value length in bytes.
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// Number of distinct keys; each operation picks one uniformly.
    #[arg(long, default_value_t = 100_000)]
    pub keyspace: u64,
    /// Relative weights of the operations, e.g. put=50,get=50,cas=0.
    #[arg(long, default_value = "put=50,get=50,cas=0", value_parser = Mix::parse)]
    pub mix: Mix,
    /// Consistency of the gets.
    #[arg(long, value_enum, default_value_t = BenchConsistency::Linearizable)]
    pub consistency: BenchConsistency,
    /// Requests in flight per client.
    #[arg(long, default_value_t = 1)]
    pub pipeline: usize,
    /// Load generator threads, each with its own runtime (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Run this long before measuring; nothing of it is recorded.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Write every key of the keyspace once before the run.
    #[arg(long)]
    pub prefill: bool,
    /// Seed of the key, operation and value choices (default: from the clock;
    /// the report prints the one used).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Admin addresses (host:port) of every node, comma-separated: report the
    /// cluster's CPU time per operation and its leader changes.
    #[arg(long, value_delimiter = ',')]
    pub admin: Vec<String>,
    /// How long one operation may take, client retries included.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,
}

/// Consistency of the benchmark's gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchConsistency {
    /// Raft ReadIndex on the leader.
    Linearizable,
    /// Leader lease.
    Lease,
    /// Any replica's local state.
    Stale,
}

impl BenchConsistency {
    fn wire(self) -> Consistency {
        match self {
            BenchConsistency::Linearizable => Consistency::Linearizable,
            BenchConsistency::Lease => Consistency::Lease,
            BenchConsistency::Stale => Consistency::Stale,
        }
    }

    fn name(self) -> &'static str {
        match self {
            BenchConsistency::Linearizable => "linearizable",
            BenchConsistency::Lease => "lease",
            BenchConsistency::Stale => "stale",
        }
    }
}

/// An operation type of the mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// Unconditional write.
    Put,
    /// Read at the chosen consistency.
    Get,
    /// Stale read of the version, then compare-and-swap at it.
    Cas,
}

impl OpKind {
    const ALL: [OpKind; 3] = [OpKind::Put, OpKind::Get, OpKind::Cas];

    fn name(self) -> &'static str {
        match self {
            OpKind::Put => "put",
            OpKind::Get => "get",
            OpKind::Cas => "cas",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Relative weights of put, get and cas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mix {
    weights: [u32; 3],
}

impl Mix {
    /// Parses `put=50,get=50,cas=0`. Names may be left out (weight 0), not
    /// repeated; at least one weight must be positive.
    pub fn parse(text: &str) -> Result<Mix, String> {
        let mut weights = [0u32; 3];
        let mut seen = [false; 3];
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = part.split_once('=').ok_or_else(|| {
                format!("`{part}` in --mix is not name=weight (e.g. put=50,get=50,cas=0)")
            })?;
            let name = name.trim();
            let kind = OpKind::ALL
                .into_iter()
                .find(|k| k.name() == name)
                .ok_or_else(|| {
                    format!("unknown operation `{name}` in --mix; use put, get or cas")
                })?;
            let weight: u32 = weight.trim().parse().map_err(|_| {
                format!(
                    "weight `{}` of {name} in --mix is not a whole number",
                    weight.trim()
                )
            })?;
            if seen[kind.index()] {
                return Err(format!("{name} appears twice in --mix"));
            }
            if weight > 1_000_000 {
                return Err(format!(
                    "weight {weight} of {name} in --mix is above 1000000"
                ));
            }
            seen[kind.index()] = true;
            weights[kind.index()] = weight;
        }
        if weights.iter().all(|w| *w == 0) {
            return Err(format!(
                "--mix `{text}` has no operation with a positive weight"
            ));
        }
        Ok(Mix { weights })
    }

    fn weight(&self, kind: OpKind) -> u32 {
        self.weights[kind.index()]
    }

    fn total(&self) -> u32 {
        self.weights.iter().sum()
    }

    /// The operation for `roll` in `[0, total)`.
    fn pick(&self, roll: u32) -> OpKind {
        let mut roll = roll;
        for kind in OpKind::ALL {
            let weight = self.weight(kind);
            if roll < weight {
                return kind;
            }
            roll -= weight;
        }
        panic!(
            "mix roll beyond the total weight {}: {:?}",
            self.total(),
            self
        );
    }

    fn kinds(&self) -> impl Iterator<Item = OpKind> + '_ {
        OpKind::ALL.into_iter().filter(|k| self.weight(*k) > 0)
    }
}

/// `key_size` bytes naming key `index`: zero-padded decimal.
///
/// # Panics
///
/// If the decimal form of `index` is longer than `key_size`;
/// [`Settings::new`] refuses such a keyspace.
pub fn key_bytes(index: u64, key_size: usize) -> Bytes {
    let key = format!("{index:0>key_size$}");
    assert_eq!(
        key.len(),
        key_size,
        "key index {index} does not fit in {key_size} bytes"
    );
    Bytes::from(key.into_bytes())
}

/// Number of decimal digits of the largest index of a keyspace.
fn digits_needed(keyspace: u64) -> usize {
    keyspace.saturating_sub(1).max(1).to_string().len()
}

/// SplitMix64: spreads consecutive slot numbers into unrelated seeds.
fn mix_seed(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// One operation a slot is about to issue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedOp {
    /// What to do.
    pub kind: OpKind,
    /// Index of the key in the keyspace.
    pub key_index: u64,
    /// Index of the value in the thread's value pool.
    pub value_index: usize,
}

/// The deterministic operation stream of one slot.
pub struct Workload {
    rng: StdRng,
    mix: Mix,
    keyspace: u64,
}

impl Workload {
    /// The stream of slot `slot` under `seed`.
    pub fn new(seed: u64, slot: u64, mix: Mix, keyspace: u64) -> Workload {
        Workload {
            rng: StdRng::seed_from_u64(mix_seed(seed ^ mix_seed(slot))),
            mix,
            keyspace,
        }
    }

    /// The next operation.
    pub fn next_op(&mut self) -> PlannedOp {
        let kind = self.mix.pick(self.rng.gen_range(0..self.mix.total()));
        PlannedOp {
            kind,
            key_index: self.rng.gen_range(0..self.keyspace),
            value_index: self.rng.gen_range(0..VALUE_POOL_LEN),
        }
    }
}

/// Random values of `value_size` bytes, shared by the slots of one thread.
fn value_pool(seed: u64, thread: usize, value_size: usize) -> Vec<Bytes> {
    let mut rng = StdRng::seed_from_u64(mix_seed(!seed ^ mix_seed(thread as u64)));
    (0..VALUE_POOL_LEN)
        .map(|_| {
            let mut value = vec![0u8; value_size];
            rng.fill_bytes(&mut value);
            Bytes::from(value)
        })
        .collect()
}

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
pub enum Outcome {
    /// Done as asked.
    Ok,
    /// A get of an absent key.
    NotFound,
    /// A CAS that lost: the version had moved (VERSION_MISMATCH).
    Conflict,
    /// Failed; the error code.
    Error(String),
}

/// Name of the error code of a failed call, as reported.
fn error_code_name(error: &ClientError) -> String {
    match error {
        ClientError::Server { code, .. } => code.as_str_name().to_string(),
        ClientError::Timeout { .. } => "CLIENT_TIMEOUT".to_string(),
        ClientError::NoEndpoint(_) => "NO_ENDPOINT".to_string(),
    }
}

/// Results of one operation type.
#[derive(Clone, Debug)]
pub struct OpStats {
    /// Latency of every completed operation (errors excluded), microseconds.
    pub latency_us: Histogram<u64>,
    /// Completed operations that were conflicts.
    pub conflicts: u64,
    /// Completed gets of absent keys.
    pub not_found: u64,
    /// Failed operations by error code.
    pub errors: BTreeMap<String, u64>,
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
    fn record(&mut self, outcome: &Outcome, latency_us: u64) {
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

    fn merge(&mut self, other: &OpStats) {
        merge_histogram(&mut self.latency_us, &other.latency_us);
        self.conflicts += other.conflicts;
        self.not_found += other.not_found;
        for (code, n) in &other.errors {
            *self.errors.entry(code.clone()).or_default() += n;
        }
    }

    fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// Results of one thread, or of all merged.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Indexed by [`OpKind::index`].
    pub ops: [OpStats; 3],
    /// When the last recorded operation finished.
    pub last_finish: Option<Instant>,
}

impl Stats {
    fn merge(&mut self, other: &Stats) {
        for (mine, theirs) in self.ops.iter_mut().zip(&other.ops) {
            mine.merge(theirs);
        }
        self.last_finish = self.last_finish.max(other.last_finish);
    }
}

/// What a thread reports once a second: everything since its last tick,
/// warm-up included.
struct Tick {
    latency_us: Histogram<u64>,
    errors: u64,
}

impl Tick {
    fn new() -> Tick {
        Tick {
            latency_us: new_histogram(),
            errors: 0,
        }
    }

    fn record(&mut self, outcome: &Outcome, latency_us: u64) {
        match outcome {
            Outcome::Error(_) => self.errors += 1,
            _ => self.latency_us.saturating_record(latency_us.max(1)),
        }
    }

    fn merge(&mut self, other: &Tick) {
        merge_histogram(&mut self.latency_us, &other.latency_us);
        self.errors += other.errors;
    }
}

/// The validated settings of a run.
#[derive(Clone, Debug)]
struct Settings {
    args: BenchArgs,
    endpoints: Vec<String>,
    threads: usize,
    seed: u64,
    duration: Option<Duration>,
}

impl Settings {
    fn new(args: BenchArgs, endpoints: Vec<String>) -> anyhow::Result<Settings> {
        if args.clients == 0 || args.clients > MAX_CLIENTS {
            bail!(
                "--clients must be between 1 and {MAX_CLIENTS}, not {}",
                args.clients
            );
        }
        if args.pipeline == 0 || args.pipeline > MAX_PIPELINE {
            bail!(
                "--pipeline must be between 1 and {MAX_PIPELINE}, not {}",
                args.pipeline
            );
        }
        if args.key_size == 0 || args.key_size > MAX_KEY_BYTES {
            bail!(
                "--key-size must be between 1 and {MAX_KEY_BYTES}, not {}",
                args.key_size
            );
        }
        if args.value_size > MAX_VALUE_BYTES {
            bail!(
                "--value-size must be at most {MAX_VALUE_BYTES}, not {}",
                args.value_size
            );
        }
        if args.keyspace == 0 {
            bail!("--keyspace must be at least 1");
        }
        let digits = digits_needed(args.keyspace);
        if digits > args.key_size {
            bail!(
                "--key-size {} cannot name {} distinct keys: keys are decimal indexes, which needs {digits} bytes",
                args.key_size,
                args.keyspace
            );
        }
        if args.ops == Some(0) {
            bail!("--ops must be at least 1");
        }
        if endpoints.is_empty() {
            bail!("no --endpoints given");
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = args.threads.unwrap_or(cores);
        if threads == 0 || threads > MAX_THREADS {
            bail!("--threads must be between 1 and {MAX_THREADS}, not {threads}");
        }
        // A thread without a client would only add a runtime to wait for.
        let threads = threads.min(args.clients);
        let seed = args.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
        let duration = match args.ops {
            Some(_) => None,
            None => Some(args.duration.unwrap_or(DEFAULT_DURATION)),
        };
        Ok(Settings {
            args,
            endpoints,
            threads,
            seed,
            duration,
        })
    }

    fn client_options(&self) -> ClientOptions {
        ClientOptions {
            endpoints: self.endpoints.clone(),
            request_timeout: self.args.request_timeout,
            ..Default::default()
        }
    }

    /// Clients run by `thread`.
    fn clients_of(&self, thread: usize) -> impl Iterator<Item = usize> {
        (thread..self.args.clients).step_by(self.threads)
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
    let stats = Rc::new(RefCell::new(Stats::default()));
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
        loop {
            if self.shared.stop.load(Ordering::Relaxed) {
                return;
            }
            let began = Instant::now();
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
            }
            if matches!(outcome, Outcome::Error(_)) {
                monoio::time::sleep(ERROR_PAUSE).await;
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

/// The progress line: drawn in place on a terminal, printed otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new() -> Progress {
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

    fn show(&self, line: String) {
        match &self.bar {
            Some(bar) => bar.set_message(line),
            None => eprintln!("{line}"),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// One progress line for the last second's `tick`.
fn progress_line(label: &str, elapsed: Duration, tick: &Tick, window: Duration) -> String {
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

/// Runs `corekv bench`.
pub fn run(args: BenchArgs, endpoints: Vec<String>, json: bool) -> anyhow::Result<ExitCode> {
    let settings = Settings::new(args, endpoints)?;
    let prefill = if settings.args.prefill {
        Some(run_prefill(&settings)?)
    } else {
        None
    };
    let measured = run_measure(&settings)?;
    let report = Report::new(&settings, prefill, measured);
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
    Ok(ExitCode::SUCCESS)
}

/// What the prefill did.
struct PrefillReport {
    keys: u64,
    seconds: f64,
    errors: BTreeMap<String, u64>,
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

/// What the measured run gave.
struct Measured {
    stats: Stats,
    elapsed: Duration,
    before: ClusterSnapshot,
    after: ClusterSnapshot,
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
            before = Some(ClusterSnapshot::take(settings));
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
    let after = ClusterSnapshot::take(settings);
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

/// Terms and leaders per shard, and CPU time per node, at one moment.
#[derive(Clone, Debug)]
struct ClusterSnapshot {
    /// Per shard: the highest term any replica reports, and the leader that
    /// replica knows.
    shards: Result<Vec<ShardTerm>, String>,
    /// Per --admin address, in order.
    nodes: Vec<Result<AdminScrape, String>>,
}

/// One shard's term and leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardTerm {
    /// Shard index.
    pub shard: u32,
    /// Highest term reported by any replica.
    pub term: u64,
    /// Leader known by the replica with that term (0 = none).
    pub leader: u64,
}

/// What one node's /metrics said.
#[derive(Clone, Copy, Debug, PartialEq)]
struct AdminScrape {
    cpu_seconds: f64,
    leader_changes: Option<f64>,
}

impl ClusterSnapshot {
    fn take(settings: &Settings) -> ClusterSnapshot {
        let nodes = settings
            .args
            .admin
            .iter()
            .map(|addr| scrape_admin(addr))
            .collect();
        ClusterSnapshot {
            shards: shard_terms(settings),
            nodes,
        }
    }
}

/// Terms of every shard, asked of every node through the client protocol
/// (works without --admin).
fn shard_terms(settings: &Settings) -> Result<Vec<ShardTerm>, String> {
    let options = ClientOptions {
        request_timeout: ADMIN_TIMEOUT,
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
    let body = http_get(addr, "/metrics")?;
    let cpu_seconds = metric_sum(&body, "process_cpu_seconds_total")
        .ok_or_else(|| format!("{addr}/metrics has no process_cpu_seconds_total"))?;
    Ok(AdminScrape {
        cpu_seconds,
        leader_changes: metric_sum(&body, "raft_leader_changes_total"),
    })
}

/// A plain HTTP/1.1 GET; the body of a 200 answer.
fn http_get(addr: &str, path: &str) -> Result<String, String> {
    let socket = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve admin address {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("admin address {addr} resolves to nothing"))?;
    let mut stream = TcpStream::connect_timeout(&socket, ADMIN_TIMEOUT)
        .map_err(|e| format!("cannot connect to admin {addr}: {e}"))?;
    let io = |e: std::io::Error| format!("admin {addr}{path}: {e}");
    stream.set_read_timeout(Some(ADMIN_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(ADMIN_TIMEOUT)).map_err(io)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(io)?;
    let mut answer = String::new();
    stream
        .take(ADMIN_MAX_RESPONSE_BYTES)
        .read_to_string(&mut answer)
        .map_err(io)?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("admin {addr}{path}: answer without a header end"))?;
    let status_line = head.lines().next().unwrap_or_default();
    if status_line.split_whitespace().nth(1) != Some("200") {
        return Err(format!("admin {addr}{path} answered `{status_line}`"));
    }
    Ok(body.to_string())
}

/// Sum over all label sets of metric `name` in Prometheus/OpenMetrics text;
/// None when no sample of it is there.
fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        // The value follows the labels; a timestamp would come after it.
        let after_labels = match rest.rfind('}') {
            Some(i) => &rest[i + 1..],
            None => rest,
        };
        if let Some(value) = after_labels
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *sum.get_or_insert(0.0) += value;
        }
    }
    sum
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

/// Everything the run reports.
struct Report {
    settings: Settings,
    prefill: Option<PrefillReport>,
    elapsed: Duration,
    rows: Vec<OpRow>,
    /// All operation types together.
    total: OpRow,
    cpu: Option<CpuReport>,
    leadership: LeadershipReport,
}

impl Report {
    fn new(settings: &Settings, prefill: Option<PrefillReport>, measured: Measured) -> Report {
        let rows: Vec<OpRow> = settings
            .args
            .mix
            .kinds()
            .map(|k| OpRow::new(k.name(), &measured.stats.ops[k.index()], measured.elapsed))
            .collect();
        let mut all = OpStats::default();
        for kind in settings.args.mix.kinds() {
            all.merge(&measured.stats.ops[kind.index()]);
        }
        let total = OpRow::new("total", &all, measured.elapsed);
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
            rows,
            total,
        }
    }

    fn to_json(&self) -> Value {
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
                "seed": self.settings.seed,
                "prefill": args.prefill,
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

    fn to_table(&self) -> String {
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
            self.mix_text(),
            if args.mix.weight(OpKind::Get) > 0 {
                format!(", {} gets", args.consistency.name())
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

    fn mix_text(&self) -> String {
        let mix = &self.settings.args.mix;
        OpKind::ALL
            .iter()
            .map(|k| format!("{}={}", k.name(), mix.weight(*k)))
            .collect::<Vec<_>>()
            .join(",")
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct TestCli {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn args(extra: &[&str]) -> BenchArgs {
        let mut argv = vec!["bench"];
        argv.extend_from_slice(extra);
        TestCli::try_parse_from(argv)
            .expect("valid bench flags")
            .args
    }

    fn settings(extra: &[&str]) -> anyhow::Result<Settings> {
        Settings::new(args(extra), vec!["127.0.0.1:7100".to_string()])
    }

    #[test]
    fn mix_parses_weights_and_leaves_missing_ops_at_zero() {
        let mix = Mix::parse("put=50,get=50,cas=0").unwrap();
        assert_eq!(mix.weights, [50, 50, 0]);
        let mix = Mix::parse(" get = 3 ").unwrap();
        assert_eq!(mix.weights, [0, 3, 0]);
        assert_eq!(mix.kinds().collect::<Vec<_>>(), vec![OpKind::Get]);
        assert_eq!(args(&[]).mix.weights, [50, 50, 0], "the default mix");
    }

    #[test]
    fn mix_errors_name_the_problem() {
        let error = |text: &str| Mix::parse(text).unwrap_err();
        assert!(error("put").contains("not name=weight"), "{}", error("put"));
        assert!(error("del=5").contains("unknown operation `del`"));
        assert!(error("put=half").contains("not a whole number"));
        assert!(error("put=-1").contains("not a whole number"));
        assert!(error("put=1,put=2").contains("put appears twice"));
        assert!(error("put=0,get=0").contains("no operation with a positive weight"));
        assert!(error("").contains("no operation with a positive weight"));
        assert!(error("put=2000000").contains("above 1000000"));
        // clap reports the same message for the flag.
        let flag = TestCli::try_parse_from(["bench", "--mix", "put=1,foo=2"]);
        let message = flag.err().expect("bad --mix is refused").to_string();
        assert!(message.contains("unknown operation `foo`"), "{message}");
    }

    #[test]
    fn mix_pick_follows_the_weights_exactly() {
        let mix = Mix::parse("put=2,get=3,cas=5").unwrap();
        let picks: Vec<OpKind> = (0..mix.total()).map(|roll| mix.pick(roll)).collect();
        let count = |k: OpKind| picks.iter().filter(|p| **p == k).count();
        assert_eq!(
            (count(OpKind::Put), count(OpKind::Get), count(OpKind::Cas)),
            (2, 3, 5)
        );
    }

    #[test]
    fn keys_are_fixed_size_zero_padded_indexes() {
        assert_eq!(&key_bytes(42, 16)[..], b"0000000000000042");
        assert_eq!(&key_bytes(99_999, 5)[..], b"99999");
        assert_eq!(digits_needed(100_000), 5);
        assert_eq!(digits_needed(1), 1);
        assert_eq!(digits_needed(10), 1);
        assert_eq!(digits_needed(11), 2);
    }

    #[test]
    fn a_key_size_too_small_for_the_keyspace_is_refused() {
        let error = settings(&["--key-size", "4", "--keyspace", "100000"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("needs 5 bytes"), "{error}");
        assert!(settings(&["--key-size", "5", "--keyspace", "100000"]).is_ok());
    }

    #[test]
    fn settings_bound_the_load_shape() {
        assert!(settings(&["--clients", "0"]).is_err());
        assert!(settings(&["--pipeline", "0"]).is_err());
        assert!(settings(&["--ops", "0"]).is_err());
        assert!(settings(&["--keyspace", "0"]).is_err());
        let s = settings(&["--clients", "3", "--threads", "8"]).unwrap();
        assert_eq!(s.threads, 3, "no thread without a client");
        assert_eq!(s.duration, Some(DEFAULT_DURATION));
        let s = settings(&["--ops", "100"]).unwrap();
        assert_eq!(s.duration, None);
        assert!(TestCli::try_parse_from(["bench", "--ops", "5", "--duration", "1s"]).is_err());
    }

    #[test]
    fn clients_are_spread_over_threads_without_gaps() {
        let s = settings(&["--clients", "7", "--threads", "3"]).unwrap();
        let mut all: Vec<usize> = (0..3).flat_map(|t| s.clients_of(t)).collect();
        assert_eq!(s.clients_of(0).collect::<Vec<_>>(), vec![0, 3, 6]);
        all.sort_unstable();
        assert_eq!(all, (0..7).collect::<Vec<_>>());
    }

    #[test]
    fn workloads_are_deterministic_per_seed_and_slot() {
        let mix = Mix::parse("put=1,get=1,cas=1").unwrap();
        let ops = |seed, slot| {
            let mut w = Workload::new(seed, slot, mix, 1000);
            (0..200).map(|_| w.next_op()).collect::<Vec<_>>()
        };
        assert_eq!(ops(7, 3), ops(7, 3));
        assert_ne!(ops(7, 3), ops(7, 4), "slots differ");
        assert_ne!(ops(7, 3), ops(8, 3), "seeds differ");
        for op in ops(7, 3) {
            assert!(op.key_index < 1000);
            assert!(op.value_index < VALUE_POOL_LEN);
        }
        let kinds: Vec<OpKind> = ops(7, 3).iter().map(|o| o.kind).collect();
        for kind in OpKind::ALL {
            assert!(kinds.contains(&kind), "{kind:?} never drawn");
        }
        let puts_only = Mix::parse("put=1").unwrap();
        let mut w = Workload::new(1, 1, puts_only, 10);
        assert!((0..100).all(|_| w.next_op().kind == OpKind::Put));
    }

    #[test]
    fn value_pool_is_deterministic_and_sized() {
        let pool = value_pool(5, 0, 256);
        assert_eq!(pool.len(), VALUE_POOL_LEN);
        assert!(pool.iter().all(|v| v.len() == 256));
        assert_eq!(pool, value_pool(5, 0, 256));
        assert_ne!(pool, value_pool(5, 1, 256));
    }

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

    #[test]
    fn metric_sum_reads_plain_and_labelled_samples() {
        let text = "# HELP process_cpu_seconds_total Total CPU.\n\
                    # TYPE process_cpu_seconds_total counter\n\
                    process_cpu_seconds_total 12.5\n\
                    process_cpu_seconds_total_other 99\n\
                    raft_leader_changes_total{shard=\"0\"} 2\n\
                    raft_leader_changes_total{shard=\"1\"} 3 1700000000\n\
                    # EOF\n";
        assert_eq!(metric_sum(text, "process_cpu_seconds_total"), Some(12.5));
        assert_eq!(metric_sum(text, "raft_leader_changes_total"), Some(5.0));
        assert_eq!(metric_sum(text, "raft_current_term"), None);
    }

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

    fn snapshot(terms: &[(u32, u64, u64)], cpu: &[f64]) -> ClusterSnapshot {
        ClusterSnapshot {
            shards: Ok(reduce_terms(terms)),
            nodes: cpu
                .iter()
                .map(|s| {
                    Ok(AdminScrape {
                        cpu_seconds: *s,
                        leader_changes: Some(1.0),
                    })
                })
                .collect(),
        }
    }

    #[test]
    fn leadership_and_cpu_compare_before_and_after() {
        let before = snapshot(&[(0, 2, 1), (1, 5, 2)], &[1.0, 2.0]);
        let after = snapshot(&[(0, 2, 1), (1, 7, 3)], &[2.0, 4.0]);
        let l = LeadershipReport::new(&before, &after);
        assert_eq!((l.term_changes, l.shards_with_new_leader), (2, 1));
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
