//! The admin HTTP server: `/metrics`, `/status`, `/health/live`,
//! `/health/ready`.
//!
//! hyper (HTTP/1.1 with keep-alive) on a tokio current-thread runtime, on
//! one thread of its own: never on a shard thread, whose I/O is monoio, so a
//! slow scraper can never delay a request. Each connection is a task, so
//! concurrent scrapes do not wait for each other. At most
//! [`MAX_ADMIN_CONNECTIONS`] are served at once (more wait in the listen
//! backlog); a client that is slow to send its request head is cut off after
//! [`ADMIN_IO_TIMEOUT`], and any connection is closed after
//! [`ADMIN_CONNECTION_LIFETIME`], so one that never reads its answer holds
//! its slot for a bounded time. Nothing here takes a body.

use std::convert::Infallible;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;

use corekv_proto::client::ShardStatus;

use crate::log_limit::{LogLimit, WARN_INTERVAL};
use crate::shared::NodeShared;

/// Connections the admin port serves at once; more wait to be accepted.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;
/// A client that takes longer than this to send a request head (or to
/// finish the TLS handshake) is cut off; so is a kept-alive connection idle
/// that long between requests.
pub const ADMIN_IO_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a connection is served: then it is closed once the answer in
/// flight is sent (or after [`ADMIN_IO_TIMEOUT`] more, if its client does not
/// read it). Prometheus and `corekv top` simply reconnect.
pub const ADMIN_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Largest request head (request line and headers) read; hyper's minimum.
const MAX_REQUEST_HEAD_BYTES: usize = 8 << 10;
/// Headers of one request looked at (more: 431).
const MAX_REQUEST_HEADERS: usize = 32;
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

/// Binds the admin port and serves it on a new thread.
pub fn start(node: Arc<NodeShared>) -> anyhow::Result<()> {
    let addr = format!("{}:{}", node.config.listen_host, node.config.admin_port);
    let listener = TcpListener::bind(&addr)
        .with_context(|| format!("cannot listen for admin HTTP on {addr}"))?;
    listener
        .set_nonblocking(true)
        .context("cannot make the admin listener non-blocking")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .context("cannot start the admin HTTP runtime")?;
    tracing::info!(%addr, "admin HTTP listening");
    std::thread::Builder::new()
        .name("corekv-admin".into())
        .spawn(move || runtime.block_on(serve_port(listener, node)))
        .context("cannot start the admin thread")?;
    Ok(())
}

/// Accepts connections for ever, each served by a task of its own while a
/// slot is free.
async fn serve_port(listener: TcpListener, node: Arc<NodeShared>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(error = %e, "admin HTTP cannot serve its listener");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    let mut accept_warnings = LogLimit::new(WARN_INTERVAL);
    loop {
        // Never closed, so acquiring only ever waits for a slot.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                if let Some(suppressed) = accept_warnings.allow(Instant::now()) {
                    tracing::warn!(error = %e, suppressed, "admin accept failed");
                }
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        let node = node.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = serve_connection(stream, node).await {
                tracing::debug!(error = %e, "admin connection ended");
            }
        });
    }
}

/// Serves one connection, over TLS when the node runs it.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    node: Arc<NodeShared>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let Some(tls) = &node.tls else {
        return serve_http(stream, node).await;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.current().admin.clone());
    let stream = tokio::time::timeout(ADMIN_IO_TIMEOUT, acceptor.accept(stream))
        .await
        .map_err(|_| "TLS handshake timed out")??;
    serve_http(stream, node).await
}

/// Serves the requests of one connection until it closes, errs, idles or
/// reaches [`ADMIN_CONNECTION_LIFETIME`].
async fn serve_http(
    io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    node: Arc<NodeShared>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let service = hyper::service::service_fn(move |request| {
        let answer = answer(&request, &node);
        async move { Ok::<_, Infallible>(answer) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(ADMIN_IO_TIMEOUT)
        .max_buf_size(MAX_REQUEST_HEAD_BYTES)
        .max_headers(MAX_REQUEST_HEADERS)
        .serve_connection(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    if let Ok(served) = tokio::time::timeout(ADMIN_CONNECTION_LIFETIME, connection.as_mut()).await {
        return Ok(served?);
    }
    connection.as_mut().graceful_shutdown();
    // A client that does not take the answer in flight is dropped.
    match tokio::time::timeout(ADMIN_IO_TIMEOUT, connection).await {
        Ok(served) => Ok(served?),
        Err(_) => Err("closed at the end of its lifetime with an answer unread".into()),
    }
}

/// The answer to one request.
fn answer(request: &Request<Incoming>, node: &NodeShared) -> Response<Full<Bytes>> {
    let headers = request.headers();
    let has_body = headers
        .get(CONTENT_LENGTH)
        .is_some_and(|length| length.as_bytes().trim_ascii() != b"0")
        || headers.contains_key(TRANSFER_ENCODING);
    let (status, content_type, body) = if has_body {
        (
            StatusCode::BAD_REQUEST,
            TEXT,
            "requests to the admin port take no body\n".to_string(),
        )
    } else {
        route(request.method(), request.uri().path(), node)
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if has_body {
        // The body is not read, so the connection cannot go on.
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";

fn route(method: &Method, path: &str, node: &NodeShared) -> (StatusCode, &'static str, String) {
    let known = ["/metrics", "/status", "/health/live", "/health/ready"];
    if !known.contains(&path) {
        return (
            StatusCode::NOT_FOUND,
            TEXT,
            format!("no such path: {path}\n"),
        );
    }
    if method != Method::GET && method != Method::HEAD {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            format!("{method} is not allowed on {path}; use GET\n"),
        );
    }
    match path {
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            node.metrics.encode(),
        ),
        "/status" => (StatusCode::OK, JSON, status_json(node).to_string()),
        "/health/live" => (StatusCode::OK, JSON, json!({ "live": true }).to_string()),
        _ => match not_ready_reason(node) {
            None => (StatusCode::OK, JSON, json!({ "ready": true }).to_string()),
            Some(reason) => (
                StatusCode::SERVICE_UNAVAILABLE,
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
