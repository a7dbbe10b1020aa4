//! Reading a node's admin port from outside: HTTP through ureq (one agent
//! per thread, so repeated scrapes reuse their connection), and the
//! Prometheus text helpers, on prometheus-parse, that pick samples out of
//! `/metrics`. Shared by `corekv bench`, `corekv top` and the integration
//! tests.

use std::io::{self, Read};
use std::sync::Arc;
use std::time::Duration;

use corekv_transport::rustls::ClientConfig;

/// Connect, read and write timeout of one admin request.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// Largest admin answer body read. The admin server's answers are
/// far smaller; a longer one is refused rather than parsed half-read.
pub const MAX_RESPONSE_BYTES: u64 = 16 << 20;

/// Everything that can go wrong asking an admin port. Every message names
/// the admin address, and the path once a connection is up.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// The address is not `host:port` or its host does not resolve.
    #[error("cannot resolve admin address {addr}: {source}")]
    Resolve {
        /// The admin address as given.
        addr: String,
        /// What the resolver said.
        source: io::Error,
    },
    /// The address resolved to no socket address at all.
    #[error("admin address {addr} resolves to nothing")]
    NoAddress {
        /// The admin address as given.
        addr: String,
    },
    /// Nothing accepted the connection within [`TIMEOUT`].
    #[error("cannot connect to admin {addr}: {source}")]
    Connect {
        /// The admin address as given.
        addr: String,
        /// Why the connection failed.
        source: io::Error,
    },
    /// Sending the request or reading the answer failed or timed out.
    #[error("admin {addr}{path}: {source}")]
    Io {
        /// The admin address as given.
        addr: String,
        /// The path asked for.
        path: String,
        /// The socket error.
        source: io::Error,
    },
    /// The answer was longer than [`MAX_RESPONSE_BYTES`].
    #[error("admin {addr}{path}: answer longer than {max} bytes")]
    TooLarge {
        /// The admin address as given.
        addr: String,
        /// The path asked for.
        path: String,
        /// The bound that was hit.
        max: u64,
    },
    /// The answer is not UTF-8 text.
    #[error("admin {addr}{path}: answer is not UTF-8")]
    NotUtf8 {
        /// The admin address as given.
        addr: String,
        /// The path asked for.
        path: String,
    },
    /// The answer was not HTTP (a bad status line or head).
    #[error("admin {addr}{path}: not an HTTP answer: {reason}")]
    NotHttp {
        /// The admin address as given.
        addr: String,
        /// The path asked for.
        path: String,
        /// What the HTTP client found wrong.
        reason: String,
    },
    /// [`get`] was answered with something other than 200.
    #[error("admin {addr}{path} answered `{status_line}`")]
    NotOk {
        /// The admin address as given.
        addr: String,
        /// The path asked for.
        path: String,
        /// The first line of the answer, e.g. `HTTP/1.1 503 Service Unavailable`.
        status_line: String,
    },
}

/// The body of a 200 answer to `GET path` at the admin address `addr`
/// (`host:port`); any other status is [`ScrapeError::NotOk`].
pub fn get(addr: &str, path: &str) -> Result<String, ScrapeError> {
    let answer = exchange("GET", addr, path, MAX_RESPONSE_BYTES)?;
    if answer.status != 200 {
        return Err(ScrapeError::NotOk {
            addr: addr.to_string(),
            path: path.to_string(),
            status_line: answer.status_line,
        });
    }
    Ok(answer.body)
}

/// The status code and body of the answer to `method path` at the admin
/// address `addr` (`host:port`), whatever the status: `/health/ready`
/// answers 503 with its reason in the body.
pub fn request(method: &str, addr: &str, path: &str) -> Result<(u16, String), ScrapeError> {
    let answer = exchange(method, addr, path, MAX_RESPONSE_BYTES)?;
    Ok((answer.status, answer.body))
}

/// A sample of `/metrics` as prometheus-parse reads it: a histogram's
/// buckets come as one sample named after the family, with
/// [`Value::Histogram`]; its `_sum` and `_count`, and a counter's `_total`,
/// come as written (untyped, since OpenMetrics declares a counter by its
/// family name).
pub use prometheus_parse::{Sample, SampleType, Value};

/// Every sample of Prometheus or OpenMetrics text; comments, blank and
/// malformed lines are skipped. Label values are read as corekv writes
/// them: without commas, quotes or escapes.
pub fn samples(text: &str) -> Vec<Sample> {
    let lines = text.lines().map(|line| Ok(line.to_owned()));
    // Only reading a line can fail, and these lines are in memory.
    prometheus_parse::Scrape::parse(lines)
        .map(|scrape| scrape.samples)
        .unwrap_or_default()
}

/// The number a plain sample holds; None for a histogram or a summary.
pub fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(*v),
        Value::Histogram(_) | Value::Summary(_) => None,
    }
}

/// A histogram sample's cumulative buckets as `(upper bound, count)`, the
/// shape [`histogram_quantile`] takes; empty for any other sample.
pub fn buckets(value: &Value) -> Vec<(f64, f64)> {
    match value {
        Value::Histogram(counts) => counts.iter().map(|c| (c.less_than, c.count)).collect(),
        _ => Vec::new(),
    }
}

/// Sum over all label sets of the plain samples named `name` in
/// Prometheus/OpenMetrics text; None when there is no such sample.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    samples(text)
        .iter()
        .filter(|sample| sample.metric == name)
        .filter_map(|sample| number(&sample.value))
        .reduce(|a, b| a + b)
}

/// The value of the one sample named and labelled as `name_and_labels`
/// (e.g. `raft_current_term{shard="0"}`, labels in any order); None when
/// there is no such sample.
pub fn metric_value(text: &str, name_and_labels: &str) -> Option<f64> {
    // The selector read as a sample line, so its labels compare as a set.
    let wanted = samples(&format!("{name_and_labels} 0")).pop()?;
    samples(text)
        .iter()
        .find(|sample| sample.metric == wanted.metric && *sample.labels == *wanted.labels)
        .and_then(|sample| number(&sample.value))
}

/// The metric families `text` declares in its `# TYPE` lines, as (family
/// name, type) in the order given, e.g. `("wal_fsync_seconds", Histogram)`.
pub fn metric_families(text: &str) -> Vec<(String, SampleType)> {
    text.lines()
        .filter_map(|line| match prometheus_parse::LineInfo::parse(line) {
            prometheus_parse::LineInfo::Type {
                metric_name,
                metric_alias,
                sample_type,
            } => Some((metric_alias.unwrap_or(metric_name), sample_type)),
            _ => None,
        })
        .collect()
}

/// True when Prometheus stores series named `name` from `text`: a plain
/// sample of that name is there, or a declared family is exposed under it
/// (a counter `f` as `f_total`, a histogram `f` as `f_bucket`, `f_sum` and
/// `f_count`, a summary as `f`, `f_sum`, `f_count`, anything else as `f`).
/// The families count because a label set created on first use (a peer, a
/// refusal reason) has no sample until then, yet a query of it is right.
pub fn exposes(text: &str, name: &str) -> bool {
    samples(text)
        .iter()
        .any(|sample| sample.metric == name && !matches!(sample.value, Value::Histogram(_)))
        || metric_families(text).iter().any(|(family, kind)| {
            let suffixes: &[&str] = match kind {
                SampleType::Counter => &["_total"],
                SampleType::Histogram => &["_bucket", "_sum", "_count"],
                SampleType::Summary => &["", "_sum", "_count"],
                _ => &[""],
            };
            name.strip_prefix(family.as_str())
                .is_some_and(|suffix| suffixes.contains(&suffix))
        })
}

/// The `q` quantile (0..=1) of a histogram given as its cumulative buckets
/// `(upper bound, count)`, by linear interpolation inside the bucket that
/// holds it, as Prometheus' `histogram_quantile` does; None without
/// observations. The `+Inf` bucket answers with the highest finite bound.
pub fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let mut buckets = buckets.to_vec();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(bound, count) in &buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower);
            }
            let inside = count - below;
            let fraction = if inside > 0.0 {
                (rank - below) / inside
            } else {
                1.0
            };
            return Some(lower + (bound - lower) * fraction);
        }
        (lower, below) = (bound, count);
    }
    Some(lower)
}

/// One answer.
struct Answer {
    status: u16,
    status_line: String,
    body: String,
}

/// TLS for every admin request of this process, once [`use_tls`] set it.
static TLS: std::sync::OnceLock<Arc<ClientConfig>> = std::sync::OnceLock::new();

/// Makes every later admin request of this process HTTPS, verifying the
/// node with `config` (the cluster's CA) and presenting its client
/// certificate, if any, for `admin_client_auth = cert`. Call it before the
/// first request; a second call changes nothing.
pub fn use_tls(config: Arc<ClientConfig>) {
    let _ = TLS.set(config);
}

thread_local! {
    /// Keeps connections alive between the requests of one thread (`corekv
    /// top` and bench scrape every node again and again).
    static AGENT: ureq::Agent = {
        let builder = ureq::AgentBuilder::new()
            .timeout_connect(TIMEOUT)
            .timeout_read(TIMEOUT)
            .timeout_write(TIMEOUT);
        match TLS.get() {
            Some(config) => builder.tls_config(config.clone()),
            None => builder,
        }
        .build()
    };
}

/// Sends one request and reads the answer to its end, at most
/// `max_response_bytes` of it, whatever its status.
fn exchange(
    method: &str,
    addr: &str,
    path: &str,
    max_response_bytes: u64,
) -> Result<Answer, ScrapeError> {
    let scheme = if TLS.get().is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{addr}{path}");
    let call = AGENT.with(|agent| agent.request(method, &url).call().map_err(Box::new));
    let response = match call {
        Ok(response) => response,
        Err(error) => match *error {
            ureq::Error::Status(_, response) => response,
            ureq::Error::Transport(transport) => {
                return Err(transport_error(addr, path, transport))
            }
        },
    };
    let status = response.status();
    let status_line = format!(
        "{} {status} {}",
        response.http_version(),
        response.status_text()
    );
    // One byte past the bound tells a full answer from a cut one.
    let mut raw = Vec::new();
    response
        .into_reader()
        .take(max_response_bytes + 1)
        .read_to_end(&mut raw)
        .map_err(|source| ScrapeError::Io {
            addr: addr.to_string(),
            path: path.to_string(),
            source,
        })?;
    if raw.len() as u64 > max_response_bytes {
        return Err(ScrapeError::TooLarge {
            addr: addr.to_string(),
            path: path.to_string(),
            max: max_response_bytes,
        });
    }
    let body = String::from_utf8(raw).map_err(|_| ScrapeError::NotUtf8 {
        addr: addr.to_string(),
        path: path.to_string(),
    })?;
    Ok(Answer {
        status,
        status_line,
        body,
    })
}

/// ureq's transport failure as one of ours, naming the address.
fn transport_error(addr: &str, path: &str, transport: ureq::Transport) -> ScrapeError {
    let reason = transport.to_string();
    let as_io = || io::Error::other(reason.clone());
    match transport.kind() {
        ureq::ErrorKind::Dns | ureq::ErrorKind::InvalidUrl => ScrapeError::Resolve {
            addr: addr.to_string(),
            source: as_io(),
        },
        ureq::ErrorKind::ConnectionFailed => ScrapeError::Connect {
            addr: addr.to_string(),
            source: as_io(),
        },
        ureq::ErrorKind::BadStatus | ureq::ErrorKind::BadHeader => ScrapeError::NotHttp {
            addr: addr.to_string(),
            path: path.to_string(),
            reason,
        },
        _ => ScrapeError::Io {
            addr: addr.to_string(),
            path: path.to_string(),
            source: as_io(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write as _};
    use std::net::TcpListener;

    /// Serves `answer` to one connection on a free local port, after
    /// reading the request head; returns `host:port`.
    fn serve_once(answer: &'static str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap() > 2 {
                line.clear();
            }
            // The client may hang up first when the answer is too long.
            let _ = (&stream).write_all(answer.as_bytes());
        });
        addr
    }

    #[test]
    fn get_returns_the_body_of_a_200_and_names_any_other_status() {
        let addr = serve_once("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello");
        assert_eq!(get(&addr, "/metrics").unwrap(), "hello");

        let addr = serve_once("HTTP/1.1 503 Service Unavailable\r\n\r\n{\"ready\":false}");
        let error = get(&addr, "/health/ready").unwrap_err().to_string();
        assert_eq!(
            error,
            format!("admin {addr}/health/ready answered `HTTP/1.1 503 Service Unavailable`")
        );
    }

    #[test]
    fn request_returns_status_and_body_whatever_the_status() {
        let addr = serve_once("HTTP/1.1 503 Service Unavailable\r\n\r\n{\"ready\":false}");
        let (status, body) = request("GET", &addr, "/health/ready").unwrap();
        assert_eq!((status, body.as_str()), (503, "{\"ready\":false}"));

        let addr = serve_once("garbage\r\n\r\n");
        let error = request("GET", &addr, "/").unwrap_err();
        assert!(matches!(error, ScrapeError::NotHttp { .. }), "{error}");
    }

    #[test]
    fn an_answer_past_the_bound_is_refused_not_cut() {
        let answer = "HTTP/1.1 200 OK\r\n\r\n0123456789";
        let addr = serve_once(answer);
        let limit = "0123456789".len() as u64 - 1;
        let error = exchange("GET", &addr, "/metrics", limit)
            .err()
            .expect("one byte over the bound is refused");
        assert_eq!(
            error.to_string(),
            format!("admin {addr}/metrics: answer longer than {limit} bytes")
        );
        let addr = serve_once(answer);
        let full = exchange("GET", &addr, "/metrics", limit + 1).unwrap();
        assert_eq!(full.body, "0123456789", "exactly the bound is read whole");
    }

    #[test]
    fn a_closed_port_is_a_connect_error_naming_the_address() {
        let addr = {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().to_string()
        };
        let error = get(&addr, "/metrics").unwrap_err().to_string();
        assert!(
            error.starts_with(&format!("cannot connect to admin {addr}: ")),
            "{error}"
        );
    }

    #[test]
    fn samples_parse_names_labels_values_and_histograms() {
        let text = "# TYPE x counter\n\
                    up 1\n\
                    x_total{shard=\"0\",op=\"put\"} 12 1700000000\n\
                    # TYPE h histogram\n\
                    h_bucket{shard=\"1\",le=\"0.5\"} 1\n\
                    h_bucket{shard=\"1\",le=\"+Inf\"} 3.5\n\
                    h_sum{shard=\"1\"} 2\n\
                    broken{shard=\"0\" 1\n\
                    # EOF\n";
        let all = samples(text);
        assert_eq!(all.len(), 4, "{all:?}");
        assert_eq!(
            (all[0].metric.as_str(), number(&all[0].value)),
            ("up", Some(1.0))
        );
        assert_eq!(all[1].metric, "x_total");
        assert_eq!(all[1].labels.get("op"), Some("put"));
        assert_eq!(number(&all[1].value), Some(12.0));
        assert_eq!(
            (all[2].metric.as_str(), number(&all[2].value)),
            ("h_sum", Some(2.0))
        );
        assert_eq!(all[3].metric, "h");
        assert_eq!(all[3].labels.get("shard"), Some("1"));
        assert_eq!(buckets(&all[3].value), [(0.5, 1.0), (f64::INFINITY, 3.5)]);
        assert_eq!(number(&all[3].value), None);
    }

    #[test]
    fn histogram_quantile_interpolates_inside_the_bucket() {
        let buckets = [
            (0.001, 50.0),
            (0.002, 90.0),
            (0.004, 100.0),
            (f64::INFINITY, 100.0),
        ];
        assert_eq!(histogram_quantile(0.5, &buckets), Some(0.001));
        let p70 = histogram_quantile(0.7, &buckets).unwrap();
        assert!((p70 - 0.0015).abs() < 1e-9, "{p70}");
        let p99 = histogram_quantile(0.99, &buckets).unwrap();
        assert!((p99 - 0.0038).abs() < 1e-9, "{p99}");
        assert_eq!(
            histogram_quantile(0.5, &[(1.0, 0.0), (f64::INFINITY, 0.0)]),
            None
        );
        // Past the last finite bound: that bound, as Prometheus answers.
        assert_eq!(
            histogram_quantile(0.99, &[(1.0, 1.0), (f64::INFINITY, 10.0)]),
            Some(1.0)
        );
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
    fn exposes_knows_samples_and_the_series_names_of_declared_families() {
        let text = "# TYPE raft_leader_changes counter\n\
                    raft_leader_changes_total{shard=\"0\"} 2\n\
                    # TYPE peer_messages_refused counter\n\
                    # TYPE wal_fsync_seconds histogram\n\
                    wal_fsync_seconds_bucket{le=\"+Inf\",shard=\"0\"} 1\n\
                    # TYPE wal_segments gauge\n\
                    # TYPE process_cpu_seconds_total counter\n\
                    process_cpu_seconds_total 1.5\n\
                    # EOF\n";
        assert_eq!(
            metric_families(text),
            [
                ("raft_leader_changes".to_string(), SampleType::Counter),
                ("peer_messages_refused".to_string(), SampleType::Counter),
                ("wal_fsync_seconds".to_string(), SampleType::Histogram),
                ("wal_segments".to_string(), SampleType::Gauge),
                ("process_cpu_seconds_total".to_string(), SampleType::Counter),
            ]
        );
        for name in [
            "raft_leader_changes_total",
            "peer_messages_refused_total",
            "wal_fsync_seconds_bucket",
            "wal_fsync_seconds_count",
            "wal_segments",
            "process_cpu_seconds_total",
        ] {
            assert!(exposes(text, name), "{name} is exposed");
        }
        for name in [
            "raft_leader_changes",
            "raft_leader_change_total",
            "peer_messages_refused_count",
            "wal_fsync_seconds",
            "wal_segments_total",
            "process_cpu_seconds",
        ] {
            assert!(!exposes(text, name), "{name} is not exposed");
        }
    }

    #[test]
    fn metric_value_reads_one_exact_sample() {
        let text = "raft_current_term{shard=\"1\"} 4\n\
                    raft_current_term{shard=\"10\"} 9\n\
                    raft_node_state{shard=\"1\"} 2 1700000000\n\
                    wal_segments 3\n\
                    wal_segments_total 8\n";
        assert_eq!(
            metric_value(text, "raft_current_term{shard=\"1\"}"),
            Some(4.0)
        );
        assert_eq!(
            metric_value(text, "raft_current_term{shard=\"10\"}"),
            Some(9.0)
        );
        assert_eq!(
            metric_value(text, "raft_node_state{shard=\"1\"}"),
            Some(2.0),
            "the value, not the timestamp after it"
        );
        assert_eq!(metric_value(text, "wal_segments"), Some(3.0));
        assert_eq!(
            metric_value(text, "raft_current_term"),
            None,
            "labels differ"
        );
        assert_eq!(metric_value(text, "raft_current_term{shard=\"2\"}"), None);
        let text = "client_requests_total{shard=\"0\",op=\"put\",status=\"ok\"} 7\n";
        assert_eq!(
            metric_value(
                text,
                "client_requests_total{status=\"ok\",op=\"put\",shard=\"0\"}"
            ),
            Some(7.0),
            "labels in another order"
        );
    }
}
