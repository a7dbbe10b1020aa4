//! The admin HTTP server: `/metrics`, `/status`, `/health/live`,
//! `/health/ready`.
//!
//! It runs on its own thread with blocking std sockets, far from the shard
//! threads: a slow scraper can never delay a request. Answers are small, so
//! it speaks just enough HTTP/1.1: one request per connection.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::json;

use corekv_proto::client::ShardStatus;

use crate::shared::NodeShared;

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
    tracing::info!(%addr, "admin HTTP listening");
    std::thread::Builder::new()
        .name("corekv-admin".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        if let Err(e) = serve(stream, &node) {
                            tracing::debug!(error = %e, "admin request failed");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "admin accept failed"),
                }
            }
        })
        .context("cannot start the admin thread")?;
    Ok(())
}

fn serve(stream: TcpStream, node: &NodeShared) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Skip headers; nothing here takes a body.
    let mut header = String::new();
    while reader.read_line(&mut header)? > 2 {
        header.clear();
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("").split('?').next().unwrap_or("");
    let (status, content_type, body) = route(method, path, node);
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}

fn route(method: &str, path: &str, node: &NodeShared) -> (&'static str, &'static str, String) {
    const JSON: &str = "application/json";
    const TEXT: &str = "text/plain; charset=utf-8";
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
