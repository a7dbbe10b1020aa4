//! The admin HTTP server: `/metrics`, `/status`, `/health/live`,
//! `/health/ready`.
//!
//! It runs on threads of its own with blocking std sockets, far from the
//! shard threads: a slow scraper can never delay a request. A fixed pool of
//! [`ADMIN_WORKERS`] threads accepts connections, each serving one
//! connection at a time with keep-alive (for [`KEEP_ALIVE_IDLE`] between
//! requests); a client that is slow to send or read holds one worker for at
//! most [`ADMIN_IO_TIMEOUT`] per step, and further connections wait in the
//! listen backlog, so the port's threads and memory are bounded whatever
//! clients do. Requests are parsed with httparse; nothing here takes a body.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use corekv_transport::rustls::{ServerConnection, StreamOwned};
use serde_json::json;

use corekv_proto::client::ShardStatus;

use crate::shared::NodeShared;

/// Connections the admin port serves at once; more wait to be accepted.
pub const ADMIN_WORKERS: usize = 4;
/// A connection that sends nothing (between requests or within one) or
/// does not take the answer for this long is closed.
pub const ADMIN_IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a kept-alive connection may wait for its next request: short,
/// so idle keep-alive clients do not hold the workers (Prometheus, which
/// scrapes every 15 s or so, simply reconnects).
pub const KEEP_ALIVE_IDLE: Duration = Duration::from_secs(1);
/// Largest request head (request line and headers) read.
const MAX_REQUEST_HEAD_BYTES: usize = 8 << 10;
/// Headers of one request looked at (more: 431).
const MAX_REQUEST_HEADERS: usize = 32;
/// Requests served on one connection before it is closed, so one client
/// cannot keep a worker for ever.
const MAX_REQUESTS_PER_CONNECTION: usize = 10_000;
/// Pause after a failed accept (out of descriptors) before the next.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);

/// A replica whose applied index trails its commit index by more than this
/// is not ready.
pub const READY_MAX_APPLY_LAG: u64 = 1000;

/// A follower whose applied index trails what the leader has shown it by
/// more than this is catching up (restarted, wiped, or cut off for a while)
/// and not ready. Looser than `READY_MAX_APPLY_LAG`: a healthy follower under
/// load trails the leader's log by the writes of one replication round and
/// fsync, thousands of entries when the disk is slow for a moment.
pub const READY_MAX_LEADER_LAG: u64 = 10_000;

/// Binds the admin port and serves it on [`ADMIN_WORKERS`] new threads.
pub fn start(node: Arc<NodeShared>) -> anyhow::Result<()> {
    let addr = format!("{}:{}", node.config.listen_host, node.config.admin_port);
    let listener = TcpListener::bind(&addr)
        .with_context(|| format!("cannot listen for admin HTTP on {addr}"))?;
    tracing::info!(%addr, "admin HTTP listening");
    for worker in 0..ADMIN_WORKERS {
        let listener = listener
            .try_clone()
            .context("cannot share the admin listener")?;
        let node = node.clone();
        std::thread::Builder::new()
            .name(format!("corekv-admin-{worker}"))
            .spawn(move || loop {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if let Err(e) = serve(stream, &node) {
                            tracing::debug!(error = %e, "admin connection ended");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        std::thread::sleep(ACCEPT_RETRY);
                    }
                }
            })
            .context("cannot start an admin thread")?;
    }
    Ok(())
}

/// One request as far as routing needs it.
struct Head {
    method: String,
    path: String,
    keep_alive: bool,
    /// Bytes of the head in the read buffer.
    len: usize,
}

/// What reading the next request found.
enum Next {
    Request(Head),
    /// The client closed the connection between requests.
    Closed,
    /// A malformed or oversized request: answered, then the connection closes.
    Refused(&'static str, String),
}

/// Serves one connection, over TLS when the node runs it (the handshake
/// happens on the first read, under the same timeouts).
fn serve(stream: TcpStream, node: &NodeShared) -> std::io::Result<()> {
    stream.set_read_timeout(Some(ADMIN_IO_TIMEOUT))?;
    stream.set_write_timeout(Some(ADMIN_IO_TIMEOUT))?;
    let socket = stream.try_clone()?;
    let Some(tls) = &node.tls else {
        return serve_http(&socket, stream, node);
    };
    let conn = ServerConnection::new(tls.current().admin.clone()).map_err(std::io::Error::other)?;
    let mut stream = StreamOwned::new(conn, stream);
    let result = serve_http(&socket, &mut stream, node);
    if result.is_ok() {
        stream.conn.send_close_notify();
        let _ = stream.flush();
    }
    result
}

/// Serves the requests of one connection until it closes, asks to close,
/// errs or times out. `socket` is the TCP socket under `stream`, for its
/// timeouts.
fn serve_http(
    socket: &TcpStream,
    mut stream: impl Read + Write,
    node: &NodeShared,
) -> std::io::Result<()> {
    let mut buffer = Vec::with_capacity(1024);
    for served in 0..MAX_REQUESTS_PER_CONNECTION {
        let idle = if served == 0 {
            ADMIN_IO_TIMEOUT
        } else {
            KEEP_ALIVE_IDLE
        };
        let head = match next_request(socket, &mut stream, &mut buffer, idle)? {
            Next::Request(head) => head,
            Next::Closed => return Ok(()),
            Next::Refused(status, reason) => {
                return respond(&mut stream, status, TEXT, &reason, false, true);
            }
        };
        buffer.drain(..head.len);
        let path = head.path.split('?').next().unwrap_or("");
        let (status, content_type, body) = route(&head.method, path, node);
        let with_body = head.method != "HEAD";
        respond(
            &mut stream,
            status,
            content_type,
            &body,
            with_body,
            !head.keep_alive,
        )?;
        if !head.keep_alive {
            return Ok(());
        }
    }
    Ok(())
}

/// Reads until `buffer` holds a whole request head, waiting at most `idle`
/// for its first byte.
fn next_request(
    socket: &TcpStream,
    stream: &mut impl Read,
    buffer: &mut Vec<u8>,
    idle: Duration,
) -> std::io::Result<Next> {
    let mut chunk = [0u8; 1024];
    socket.set_read_timeout(Some(if buffer.is_empty() {
        idle
    } else {
        ADMIN_IO_TIMEOUT
    }))?;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_REQUEST_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(buffer) {
            Ok(httparse::Status::Complete(len)) => {
                let header = |name: &str| {
                    request
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
                };
                if header("content-length").is_some_and(|l| l.trim() != "0")
                    || header("transfer-encoding").is_some()
                {
                    return Ok(Next::Refused(
                        "400 Bad Request",
                        "requests to the admin port take no body\n".into(),
                    ));
                }
                let connection = header("connection").unwrap_or_default();
                // HTTP/1.1 keeps the connection unless told; 1.0 only if asked.
                let keep_alive = match request.version {
                    Some(1) => !connection.contains("close"),
                    _ => connection.contains("keep-alive"),
                };
                return Ok(Next::Request(Head {
                    method: request.method.unwrap_or("").to_string(),
                    path: request.path.unwrap_or("").to_string(),
                    keep_alive,
                    len,
                }));
            }
            Ok(httparse::Status::Partial) if buffer.len() >= MAX_REQUEST_HEAD_BYTES => {
                return Ok(Next::Refused(
                    "431 Request Header Fields Too Large",
                    format!("request head longer than {MAX_REQUEST_HEAD_BYTES} bytes\n"),
                ));
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => {
                return Ok(Next::Refused(
                    "431 Request Header Fields Too Large",
                    format!("more than {MAX_REQUEST_HEADERS} headers\n"),
                ));
            }
            Err(e) => {
                return Ok(Next::Refused(
                    "400 Bad Request",
                    format!("malformed request: {e}\n"),
                ));
            }
        }
        let n = match stream.read(&mut chunk) {
            // Nothing more asked within the idle time: done with this client.
            Err(e) if buffer.is_empty() && is_timeout(&e) => return Ok(Next::Closed),
            other => other?,
        };
        if n == 0 {
            return if buffer.is_empty() {
                Ok(Next::Closed)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
        if buffer.is_empty() {
            socket.set_read_timeout(Some(ADMIN_IO_TIMEOUT))?;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

fn is_timeout(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

fn respond(
    stream: &mut impl Write,
    status: &str,
    content_type: &str,
    body: &str,
    with_body: bool,
    close: bool,
) -> std::io::Result<()> {
    let connection = if close { "close" } else { "keep-alive" };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n",
        body.len()
    );
    let mut answer = head.into_bytes();
    if with_body {
        answer.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&answer)?;
    stream.flush()
}

const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";

fn route(method: &str, path: &str, node: &NodeShared) -> (&'static str, &'static str, String) {
    let known = ["/metrics", "/status", "/health/live", "/health/ready"];
    if !known.contains(&path) {
        return ("404 Not Found", TEXT, format!("no such path: {path}\n"));
    }
    if method != "GET" && method != "HEAD" {
        return (
            "405 Method Not Allowed",
            TEXT,
            format!("{method} is not allowed on {path}; use GET\n"),
        );
    }
    match path {
        "/metrics" => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            node.metrics.encode(),
        ),
        "/status" => ("200 OK", JSON, status_json(node).to_string()),
        "/health/live" => ("200 OK", JSON, json!({ "live": true }).to_string()),
        _ => match not_ready_reason(node) {
            None => ("200 OK", JSON, json!({ "ready": true }).to_string()),
            Some(reason) => (
                "503 Service Unavailable",
                JSON,
                json!({ "ready": false, "reason": reason }).to_string(),
            ),
        },
    }
}

/// This node in the JSON shape of `corekv status --json`.
pub fn status_json(node: &NodeShared) -> serde_json::Value {
    let status = node.status();
    let shards: Vec<_> = status.shards.iter().map(shard_status_json).collect();
    let me = node.config.me();
    json!({
        "node_id": node.config.node_id,
        "client_addr": format!("{}:{}", me.host, me.client_port),
        "shards": shards,
    })
}

/// One shard's status as `/status` and `corekv status --json` show it.
pub fn shard_status_json(s: &ShardStatus) -> serde_json::Value {
    let role = if s.removed {
        "removed"
    } else {
        corekv_proto::client::Role::from_wire(s.role).as_str()
    };
    let mut value = json!({
        "shard": s.shard,
        "role": role,
        "term": s.term,
        "leader_id": s.leader_id,
        "commit_index": s.commit_index,
        "applied_index": s.applied_index,
        "last_index": s.last_index,
        "state_machine_bytes": s.state_machine_bytes,
        "state_machine_keys": s.state_machine_keys,
        "leader_last_index": s.leader_last_index,
    });
    if let Some(m) = &s.membership {
        value["voters"] = json!(m.voters);
        value["learners"] = json!(m.learners);
        if !m.voters_outgoing.is_empty() {
            value["voters_outgoing"] = json!(m.voters_outgoing);
        }
    }
    if !s.disk_full.is_empty() {
        value["disk_full"] = json!(s.disk_full);
    }
    value
}

fn not_ready_reason(node: &NodeShared) -> Option<String> {
    let status = node.status();
    for s in &status.shards {
        if !s.disk_full.is_empty() {
            return Some(format!("shard {}: {}", s.shard, s.disk_full));
        }
        if s.removed {
            return Some(format!(
                "shard {}: this node was removed from the cluster",
                s.shard
            ));
        }
        let is_member = s.membership.as_ref().is_some_and(|m| {
            m.voters.contains(&status.node_id) || m.learners.contains(&status.node_id)
        });
        if !is_member {
            return Some(format!(
                "shard {}: this node is not a member yet (waiting to be added: corekv member add)",
                s.shard
            ));
        }
        if s.leader_id == 0 {
            return Some(format!("shard {} has no leader", s.shard));
        }
        if s.leader_last_index > s.applied_index + READY_MAX_LEADER_LAG {
            return Some(format!(
                "shard {} catching up: applied index {} of the leader's {}",
                s.shard, s.applied_index, s.leader_last_index
            ));
        }
        if s.commit_index > s.applied_index + READY_MAX_APPLY_LAG {
            return Some(format!(
                "shard {} applied index {} trails commit index {}",
                s.shard, s.applied_index, s.commit_index
            ));
        }
    }
    None
}
