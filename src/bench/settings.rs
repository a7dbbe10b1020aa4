//! The command line of `corekv bench` and its validated form, the settings
//! every phase, worker and the report read. Kept apart from the run so the
//! report can describe the configuration without depending on the code that
//! runs it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use corekv_client::ClientOptions;
use corekv_proto::client::Consistency;

use super::timeline::Timeline;
use super::workload::{digits_needed, Mix};
use crate::duration::parse_duration;

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
    /// Which replica serves the gets: leader, follower (each client's gets
    /// go to the followers in turn) or nearest (the first of --endpoints).
    #[arg(long, value_enum, default_value_t = crate::read_from::ReadFromArg::Leader)]
    pub read_from: crate::read_from::ReadFromArg,
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
    /// Also draw the run as an SVG file: throughput, p50 and p99 per second,
    /// and the latency by percentile.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Also write the latency distribution in HdrHistogram's percentile text
    /// format (.hgrm, values in milliseconds); with several operation types,
    /// FILE holds them all and FILE with `.put`, `.get` or `.cas` before its
    /// extension each one.
    #[arg(long, value_name = "FILE")]
    pub hdr: Option<PathBuf>,
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
    pub(super) fn wire(self) -> Consistency {
        match self {
            BenchConsistency::Linearizable => Consistency::Linearizable,
            BenchConsistency::Lease => Consistency::Lease,
            BenchConsistency::Stale => Consistency::Stale,
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            BenchConsistency::Linearizable => "linearizable",
            BenchConsistency::Lease => "lease",
            BenchConsistency::Stale => "stale",
        }
    }
}

/// The validated settings of a run.
#[derive(Clone, Debug)]
pub(super) struct Settings {
    pub(super) args: BenchArgs,
    pub(super) endpoints: Vec<String>,
    /// TLS to the nodes, from --cacert/--cert/--key.
    pub(super) tls: Option<corekv_client::ClientTls>,
    pub(super) threads: usize,
    pub(super) seed: u64,
    pub(super) duration: Option<Duration>,
}

impl Settings {
    pub(super) fn new(
        args: BenchArgs,
        endpoints: Vec<String>,
        tls: Option<corekv_client::ClientTls>,
    ) -> anyhow::Result<Settings> {
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
            tls,
            threads,
            seed,
            duration,
        })
    }

    pub(super) fn client_options(&self) -> ClientOptions {
        ClientOptions {
            endpoints: self.endpoints.clone(),
            request_timeout: self.args.request_timeout,
            tls: self.tls.clone(),
            read_from: self.args.read_from.into(),
            ..Default::default()
        }
    }

    /// An empty timeline of the measured window when the run is plotted;
    /// without --plot nothing is recorded per second.
    pub(super) fn timeline(&self) -> Option<Timeline> {
        self.args
            .plot
            .as_ref()
            .map(|_| Timeline::new(self.duration))
    }

    /// Clients run by `thread`.
    pub(super) fn clients_of(&self, thread: usize) -> impl Iterator<Item = usize> {
        (thread..self.args.clients).step_by(self.threads)
    }
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
        Settings::new(args(extra), vec!["127.0.0.1:7100".to_string()], None)
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
    fn the_mix_flag_defaults_and_reports_parse_errors() {
        let default = Mix::parse("put=50,get=50,cas=0").unwrap();
        assert_eq!(args(&[]).mix, default, "the default mix");
        // clap reports Mix::parse's message for the flag.
        let flag = TestCli::try_parse_from(["bench", "--mix", "put=1,foo=2"]);
        let message = flag.err().expect("bad --mix is refused").to_string();
        assert!(message.contains("unknown operation `foo`"), "{message}");
    }
}
