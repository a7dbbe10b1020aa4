//! The `corekv` command line: `run` and `dev` start nodes; `put`, `get`,
//! `del`, `cas`, `scan`, `status` and `member` are the client side.
//!
//! Exit codes of the client commands: 0 success; 1 a get that found nothing
//! or a VERSION_MISMATCH; 2 any other error (printed on stderr).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use corekv_proto::client::{Consistency, ErrorCode, Role};
use serde_json::json;

use corekv_client::{block_on, Client, ClientError, ClientOptions, ClientTls, ReadFrom};
use corekv_node::config::{Config, LogFormat, RunArgs};

use crate::duration::parse_duration;
pub use crate::read_from::ReadFromArg;

/// corekv: a Raft-replicated, shard-per-core key-value store.
#[derive(Parser, Debug)]
#[command(name = "corekv", version, about)]
pub struct Cli {
    /// Client endpoints (host:port of a node's client port), comma-separated.
    #[arg(
        long,
        global = true,
        env = "COREKV_ENDPOINTS",
        default_value = "127.0.0.1:7100",
        value_delimiter = ','
    )]
    endpoints: Vec<String>,
    /// Print JSON instead of human-readable output: one object (JSON lines
    /// from the `debug` commands).
    #[arg(long, global = true)]
    json: bool,
    /// How long a client command may take, retries included.
    #[arg(long, global = true, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(subcommand)]
    command: Command,
}

/// TLS for client commands, as etcdctl takes it.
#[derive(clap::Args, Debug)]
struct TlsArgs {
    /// CA certificate (PEM) that signs the nodes' certificates; connects
    /// with TLS
    #[arg(long, global = true, env = "COREKV_CACERT", value_name = "FILE")]
    cacert: Option<PathBuf>,
    /// Client certificate (PEM), for a cluster with client_auth = cert
    #[arg(long = "cert", global = true, env = "COREKV_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --cert
    #[arg(long = "key", global = true, env = "COREKV_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
}

impl TlsArgs {
    /// The client's TLS, or `None` without --cacert.
    fn client_tls(&self) -> anyhow::Result<Option<ClientTls>> {
        let identity = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            (None, None) => None,
            (Some(_), None) => anyhow::bail!("--cert needs --key (or COREKV_KEY)"),
            (None, Some(_)) => anyhow::bail!("--key needs --cert (or COREKV_CERT)"),
        };
        let Some(ca) = &self.cacert else {
            if identity.is_some() {
                anyhow::bail!(
                    "--cert and --key need --cacert (or COREKV_CACERT): the CA that signs the nodes"
                );
            }
            return Ok(None);
        };
        Ok(Some(ClientTls::from_files(ca, identity)?))
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a node.
    Run(Box<RunArgs>),
    /// Start a local cluster for trying corekv out (one child process per node).
    Dev(crate::dev::DevArgs),
    /// Write a value.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Read a value (exit code 1 if the key does not exist).
    Get {
        /// The key.
        key: String,
        /// How fresh the answer must be.
        #[arg(long, value_enum, default_value_t = ConsistencyArg::Linearizable)]
        consistency: ConsistencyArg,
        /// Which replica serves it: the leader, a follower (linearizable
        /// reads still ask the leader for its commit index), or the first
        /// of --endpoints that is a member.
        #[arg(long, value_enum, default_value_t = ReadFromArg::Leader)]
        read_from: ReadFromArg,
    },
    /// Delete a key.
    Del {
        /// The key.
        key: String,
        /// Delete only if the key is at this version (exit code 1 otherwise).
        #[arg(long)]
        expect_version: Option<u64>,
    },
    /// Compare-and-swap: write only if the key is at the expected version
    /// (0 = the key must not exist); exit code 1 on a mismatch.
    Cas {
        /// The key.
        key: String,
        /// The version the key must have.
        #[arg(long)]
        expect_version: u64,
        /// The new value.
        value: String,
    },
    /// List keys in order.
    Scan {
        /// Only keys starting with this prefix.
        #[arg(long, conflicts_with_all = ["from", "to"])]
        prefix: Option<String>,
        /// First key (inclusive).
        #[arg(long)]
        from: Option<String>,
        /// Last key (exclusive).
        #[arg(long)]
        to: Option<String>,
        /// At most this many pairs.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// How fresh the answer must be.
        #[arg(long, value_enum, default_value_t = ConsistencyArg::Linearizable)]
        consistency: ConsistencyArg,
        /// Which replica serves it: the leader, a follower (linearizable
        /// reads still ask the leader for its commit index), or the first
        /// of --endpoints that is a member.
        #[arg(long, value_enum, default_value_t = ReadFromArg::Leader)]
        read_from: ReadFromArg,
    },
    /// Raft status of every shard of every node.
    Status,
    /// Move the leadership of a shard to another node (waits until it has moved).
    TransferLeader {
        /// The shard.
        #[arg(long)]
        shard: u32,
        /// Node id of the new leader.
        #[arg(long)]
        to: u64,
    },
    /// Closed-loop load generator against a running cluster.
    Bench(Box<crate::bench::BenchArgs>),
    /// Add, promote, remove and list the cluster's members.
    #[command(subcommand)]
    Member(crate::member::MemberCommand),
    /// A live view of every node and shard (from their admin ports).
    Top(crate::top::TopArgs),
    /// Read a stopped node's WAL or snapshot files (no connection; exit
    /// code 1 if they are corrupt).
    #[command(subcommand)]
    Debug(crate::debug::DebugCommand),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ConsistencyArg {
    Linearizable,
    Lease,
    Stale,
}

impl From<ConsistencyArg> for Consistency {
    fn from(c: ConsistencyArg) -> Self {
        match c {
            ConsistencyArg::Linearizable => Consistency::Linearizable,
            ConsistencyArg::Lease => Consistency::Lease,
            ConsistencyArg::Stale => Consistency::Stale,
        }
    }
}

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let tls = match cli.tls.client_tls() {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    if let Some(tls) = &tls {
        // `corekv top` and `bench --admin` read the admin ports over HTTPS.
        crate::scrape::use_tls(tls.rustls_config());
    }
    match cli.command {
        Command::Run(args) => run_node(&args),
        Command::Bench(args) => {
            init_logging(
                &std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
                false,
            );
            match crate::bench::run(*args, cli.endpoints, tls, cli.json) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Top(args) => {
            init_logging(
                &std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
                false,
            );
            crate::top::run(args, cli.endpoints, tls, cli.timeout)
        }
        Command::Debug(command) => crate::debug::run(command, cli.json),
        Command::Dev(args) => {
            init_logging("info", false);
            match crate::dev::run(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        command => {
            init_logging(
                &std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
                false,
            );
            let read_from = match &command {
                Command::Get { read_from, .. } | Command::Scan { read_from, .. } => {
                    (*read_from).into()
                }
                _ => ReadFrom::Leader,
            };
            let options = ClientOptions {
                endpoints: cli.endpoints.clone(),
                request_timeout: cli.timeout,
                tls,
                read_from,
                ..Default::default()
            };
            let json = cli.json;
            let timeout = cli.timeout;
            match block_on(client_command(command, options, json, timeout)) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

/// Says whether the heap gets transparent huge pages (see `malloc_conf` in
/// `main.rs`): jemalloc's setting, and the kernel's, which can refuse them
/// (`never`) whatever jemalloc asks.
fn log_heap_pages() {
    // SAFETY: `opt.thp` is one of jemalloc's string options.
    let jemalloc = match unsafe { tikv_jemalloc_ctl::raw::read_str(b"opt.thp\0") } {
        Ok(value) => String::from_utf8_lossy(value)
            .trim_end_matches('\0')
            .to_string(),
        Err(e) => format!("unknown ({e})"),
    };
    let kernel = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .ok()
        .and_then(|modes| {
            modes
                .split_whitespace()
                .find(|mode| mode.starts_with('['))
                .map(|mode| mode.trim_matches(['[', ']']).to_string())
        })
        .unwrap_or_else(|| "unavailable".to_string());
    tracing::info!(
        jemalloc = %jemalloc,
        kernel = %kernel,
        "heap transparent huge pages"
    );
}

fn run_node(args: &RunArgs) -> ExitCode {
    let config = match Config::load(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config.log_level, config.log_format == LogFormat::Json);
    log_heap_pages();
    let joining = match corekv_node::join::check(&config) {
        Ok(Some(topology)) => {
            let members: Vec<u64> = topology.nodes.iter().map(|n| n.node_id).collect();
            tracing::info!(
                cluster_id = topology.cluster_id,
                shards = topology.shards,
                ?members,
                "joining the cluster: this node waits until it is added (corekv member add)"
            );
            topology.nodes
        }
        Ok(None) => Vec::new(),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match corekv_node::run(config, joining) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The log's stderr, counting the lines it fails to write in
/// `log_write_errors_total` (tracing writes a line with one `write_all`,
/// which stops at the first error).
struct CountingStderr;

impl std::io::Write for CountingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stderr().write(buf).inspect_err(|_| {
            corekv_node::metrics::LOG_WRITE_ERRORS
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Sets up `tracing` with filter `level` (EnvFilter syntax). The node's
/// config already folds RUST_LOG into its `log_level`; client commands let
/// RUST_LOG override their quiet default.
pub fn init_logging(level: &str, json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal, never into log files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(|| CountingStderr)
        // A log line that cannot be written (the disk holding the log is
        // full) is dropped and counted. By default tracing reports it with
        // eprintln!, which panics when stderr fails too: one full disk
        // stopped a node.
        .log_internal_errors(false);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

fn fail(error: &ClientError) -> ExitCode {
    eprintln!("error: {error}");
    match error.code() {
        Some(ErrorCode::VersionMismatch) => ExitCode::from(1),
        _ => ExitCode::from(2),
    }
}

async fn client_command(
    command: Command,
    options: ClientOptions,
    json: bool,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let client = match Client::connect(options).await {
        Ok(client) => client,
        Err(e) => return Ok(fail(&e)),
    };
    let bytes = |s: String| Bytes::from(s.into_bytes());
    let code = match command {
        Command::Put { key, value } => match client.put(bytes(key), bytes(value)).await {
            Ok(version) => {
                print(
                    json,
                    json!({ "version": version }),
                    &format!("OK version={version}"),
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::Get {
            key, consistency, ..
        } => match client.get(bytes(key.clone()), consistency.into()).await {
            Ok(Some((value, version))) => {
                let text = String::from_utf8_lossy(&value).into_owned();
                print(
                    json,
                    json!({ "key": key, "value": text, "version": version, "found": true }),
                    &text,
                );
                ExitCode::SUCCESS
            }
            Ok(None) => {
                if json {
                    println!("{}", json!({ "key": key, "found": false }));
                }
                eprintln!("not found: {key}");
                ExitCode::from(1)
            }
            Err(e) => fail(&e),
        },
        Command::Del {
            key,
            expect_version,
        } => match client.delete(bytes(key), expect_version).await {
            Ok(deleted) => {
                print(
                    json,
                    json!({ "deleted": deleted }),
                    if deleted { "deleted" } else { "not found" },
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::Cas {
            key,
            expect_version,
            value,
        } => match client.cas(bytes(key), expect_version, bytes(value)).await {
            Ok(version) => {
                print(
                    json,
                    json!({ "version": version }),
                    &format!("OK version={version}"),
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                if let ClientError::Server {
                    code: ErrorCode::VersionMismatch,
                    current_version,
                    ..
                } = e
                {
                    if json {
                        println!(
                            "{}",
                            json!({ "error": "version mismatch", "current_version": current_version })
                        );
                    }
                }
                fail(&e)
            }
        },
        Command::Scan {
            prefix,
            from,
            to,
            limit,
            consistency,
            ..
        } => {
            let (start, end) = match prefix {
                Some(prefix) => {
                    let end = prefix_end(prefix.as_bytes());
                    (Bytes::from(prefix.into_bytes()), end)
                }
                None => (
                    from.map(bytes).unwrap_or_default(),
                    to.map(bytes).unwrap_or_default(),
                ),
            };
            match client.scan(start, end, limit, consistency.into()).await {
                Ok(result) => {
                    if json {
                        let pairs: Vec<_> = result
                            .pairs
                            .iter()
                            .map(|kv| {
                                json!({
                                    "key": String::from_utf8_lossy(&kv.key),
                                    "value": String::from_utf8_lossy(&kv.value),
                                    "version": kv.version,
                                })
                            })
                            .collect();
                        println!("{}", json!({ "pairs": pairs, "more": result.more }));
                    } else {
                        for kv in &result.pairs {
                            println!(
                                "{}\t{}",
                                String::from_utf8_lossy(&kv.key),
                                String::from_utf8_lossy(&kv.value)
                            );
                        }
                        if result.more {
                            eprintln!("(more: raise --limit to see further keys)");
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Command::Status => status(&client, json).await,
        Command::TransferLeader { shard, to } => transfer_leader(&client, shard, to, json).await,
        Command::Member(command) => crate::member::run(&client, command, json, timeout).await,
        Command::Run(_)
        | Command::Dev(_)
        | Command::Bench(_)
        | Command::Top(_)
        | Command::Debug(_) => {
            unreachable!("handled before connecting")
        }
    };
    Ok(code)
}

fn print(json: bool, value: serde_json::Value, text: &str) {
    if json {
        println!("{value}");
    } else {
        println!("{text}");
    }
}

/// The smallest key greater than every key with `prefix` (empty = no bound).
fn prefix_end(prefix: &[u8]) -> Bytes {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Bytes::from(end);
        }
    }
    Bytes::new()
}

async fn transfer_leader(client: &Client, shard: u32, to: u64, json: bool) -> ExitCode {
    if let Err(e) = client.transfer_leader(shard, to).await {
        return fail(&e);
    }
    // The transfer completes once the target has caught up and won its
    // election; watch the target's own status for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let target = client.node_addrs().into_iter().find(|(id, _)| *id == to);
    let Some((_, addr)) = target else {
        eprintln!("error: node {to} is not in the topology");
        return ExitCode::from(2);
    };
    let Ok(addr) = addr.parse() else {
        eprintln!("error: bad address {addr}");
        return ExitCode::from(2);
    };
    loop {
        if let Ok(status) = client.status_at(addr).await {
            if let Some(s) = status.shards.get(shard as usize) {
                if s.role == Role::Leader as i32 {
                    print(
                        json,
                        json!({ "shard": shard, "leader_id": to, "term": s.term }),
                        &format!("shard {shard}: node {to} leads (term {})", s.term),
                    );
                    return ExitCode::SUCCESS;
                }
            }
        }
        if std::time::Instant::now() > deadline {
            eprintln!("error: node {to} did not become leader of shard {shard} within 10s");
            return ExitCode::from(2);
        }
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Lag (entries the node has not applied behind the shard's newest commit)
/// above which `status` marks a replica as lagging.
const STATUS_LAG_MARK: u64 = 1000;

async fn status(client: &Client, json: bool) -> ExitCode {
    let mut answers = Vec::new();
    for (node_id, addr) in client.node_addrs() {
        let status = match addr.parse() {
            Ok(socket) => client.status_at(socket).await.map_err(|e| e.to_string()),
            Err(e) => Err(format!("bad address {addr}: {e}")),
        };
        answers.push((node_id, addr, status));
    }
    // The newest commit index any node reports, per shard: a replica is
    // lagging when its applied index trails it by much.
    let mut newest_commit: Vec<u64> = Vec::new();
    for (_, _, status) in &answers {
        for s in status.iter().flat_map(|st| st.shards.iter()) {
            let i = s.shard as usize;
            if newest_commit.len() <= i {
                newest_commit.resize(i + 1, 0);
            }
            newest_commit[i] = newest_commit[i].max(s.commit_index);
        }
    }
    let mut nodes = Vec::new();
    let mut rows = Vec::new();
    let mut any_error = false;
    for (node_id, addr, status) in answers {
        match status {
            Ok(status) => {
                let shards: Vec<_> = status
                    .shards
                    .iter()
                    .map(|s| {
                        let lag = newest_commit[s.shard as usize].saturating_sub(s.applied_index);
                        let mut marks = String::new();
                        if s.leader_id == 0 {
                            marks.push_str("  NO LEADER");
                        }
                        if lag > STATUS_LAG_MARK {
                            marks.push_str("  LAGGING");
                        }
                        if !s.disk_full.is_empty() {
                            marks.push_str("  DISK FULL: ");
                            marks.push_str(&s.disk_full);
                        }
                        rows.push(format!(
                            "{node_id:<5} {:<5} {:<13} {:<6} {:<6} {:<8} {:<8} {:<8} {:<10} {:<9.1}{marks}",
                            s.shard,
                            if s.removed {
                                "removed"
                            } else {
                                Role::from_wire(s.role).as_str()
                            },
                            s.term,
                            s.leader_id,
                            s.commit_index,
                            s.applied_index,
                            lag,
                            s.state_machine_keys,
                            s.state_machine_bytes as f64 / (1 << 20) as f64,
                        ));
                        corekv_node::admin::shard_status_json(s)
                    })
                    .collect();
                nodes.push(json!({ "node_id": node_id, "client_addr": addr, "shards": shards }));
            }
            Err(e) => {
                any_error = true;
                rows.push(format!("{node_id:<5} unreachable: {e}"));
                nodes.push(json!({ "node_id": node_id, "client_addr": addr, "error": e }));
            }
        }
    }
    if json {
        println!("{}", json!({ "nodes": nodes }));
    } else {
        println!(
            "{:<5} {:<5} {:<13} {:<6} {:<6} {:<8} {:<8} {:<8} {:<10} {:<9}",
            "node",
            "shard",
            "role",
            "term",
            "leader",
            "commit",
            "applied",
            "lag",
            "keys",
            "data_mib"
        );
        for row in rows {
            println!("{row}");
        }
    }
    if any_error {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}
