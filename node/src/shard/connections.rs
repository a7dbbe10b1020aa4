//! Connection tasks: listeners, client connections, inbound peer links and
//! their handshake, and the timer and cross-core tasks that feed the inbox.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use corekv_proto::client::{ErrorCode, Request, Response};
use corekv_proto::peer::{Hello, LinkKind, PeerFrame};
use corekv_transport::{
    accept_peer, configure_stream, decode_message, encode_frame_bytes, plain, spawn_writer,
    tls_accept, FrameError, FrameReader, FrameSender, ReadHalf, WriteHalf,
};
use monoio::net::TcpListener;

use crate::data_dir;
use crate::shared::{CrossCore, NodeShared};
use crate::snapshot_transfer;
use crate::state_machine;

use super::client_conn::ClientConn;
use super::inputs::{ConnId, Input, Local};
use super::members::PeerGate;
use super::peer_input::{inputs_of_frame, LinkEnds, Refusal};
use crate::log_limit::LogLimit;
use crate::metrics::ConnectionMetrics;

/// Room in a client connection's answer queue beyond one largest frame.
const MAX_CONN_QUEUE_EXTRA_BYTES: usize = 4 << 20;
/// Pause after a failed accept before trying again.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);
/// How long an inbound client or peer gets for its TLS handshake, and a
/// peer for its Hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) async fn tick(local: Rc<Local>, every: Duration) {
    let mut interval = monoio::time::interval(every);
    // After a long turn (a start-up replay, a stall) the ticks it missed
    // must not arrive as a burst: raft would count a whole election timeout
    // before it reads the leader's heartbeats waiting in the same inbox,
    // and campaign. One tick per turn, as Go's time.Ticker drops them for
    // etcd.
    interval.set_missed_tick_behavior(monoio::time::MissedTickBehavior::Skip);
    loop {
        interval.tick().await;
        local.inbox.push(Input::Tick);
    }
}

pub(super) async fn receive_cross_core(local: Rc<Local>, rx: flume::Receiver<CrossCore>) {
    loop {
        local.inbox.room().await;
        let Ok(message) = rx.recv_async().await else {
            break;
        };
        local.inbox.push(Input::CrossCore(message));
    }
}

/// The next accepted connection, with our socket options set. An accept
/// error (say, out of file descriptors) is logged and retried after a short
/// pause, so a persistent one cannot spin the shard thread.
async fn next_connection(
    listener: &TcpListener,
    local: &Local,
    node: &NodeShared,
) -> (monoio::net::TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((stream, remote)) => {
                if let Err(e) = configure_stream(&stream, &node.socket_options()) {
                    tracing::warn!(shard = local.shard, %remote, error = %e, "cannot set socket options");
                }
                return (stream, remote);
            }
            Err(e) => {
                tracing::warn!(shard = local.shard, error = %e, "accept failed");
                monoio::time::sleep(ACCEPT_RETRY).await;
            }
        }
    }
}

/// Bytes of answers queued for one client connection: room for the largest
/// frame plus what a full pipeline of ordinary answers takes. A client whose
/// answers pass it is not reading them and is cut off.
pub(super) fn conn_queue_bytes(max_frame_bytes: usize) -> usize {
    max_frame_bytes.saturating_add(MAX_CONN_QUEUE_EXTRA_BYTES)
}

/// One of the node's `max_client_connections` slots, given back on drop.
struct ConnectionSlot {
    node: Arc<NodeShared>,
}

impl ConnectionSlot {
    fn take(node: &Arc<NodeShared>) -> Option<ConnectionSlot> {
        let max = node.config.max_client_connections;
        let taken = node
            .client_connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        taken.then(|| ConnectionSlot { node: node.clone() })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.node.client_connections.fetch_sub(1, Ordering::AcqRel);
    }
}

pub(super) async fn accept_clients(
    listener: TcpListener,
    local: Rc<Local>,
    node: Arc<NodeShared>,
    metrics: ConnectionMetrics,
) {
    let mut refused_log = LogLimit::default();
    let tls_log = Rc::new(RefCell::new(LogLimit::default()));
    loop {
        let (stream, remote) = next_connection(&listener, &local, &node).await;
        // The slot is taken before any TLS handshake, so handshakes in
        // progress count against max_client_connections too.
        let Some(slot) = ConnectionSlot::take(&node) else {
            let max = node.config.max_client_connections;
            metrics.rejected.inc();
            if let Some(suppressed) = refused_log.allow(Instant::now()) {
                tracing::warn!(shard = local.shard, %remote, max, suppressed, "client connection refused: max_client_connections reached");
            }
            // A TLS client gets no answer it could read before a
            // handshake, which a refused client is not worth: the
            // connection just closes.
            if node.tls.is_none() {
                let (_, write_half) = plain(stream);
                let sender =
                    spawn_writer(write_half, conn_queue_bytes(node.config.max_frame_bytes));
                let message = format!("too many client connections (max_client_connections {max}); try another node or later");
                let response = Response {
                    id: 0,
                    result: Some(state_machine::error(ErrorCode::Unavailable, &message)),
                };
                let _ = sender.send(encode_frame_bytes(&response));
                sender.close();
            }
            continue;
        };
        let Some(tls) = &node.tls else {
            start_client(plain(stream), remote, slot, &local, &metrics);
            continue;
        };
        let config = tls.current().clients.clone();
        let (local, metrics, tls_log) = (local.clone(), metrics.clone(), tls_log.clone());
        monoio::spawn(async move {
            match tls_accept(stream, config, HANDSHAKE_TIMEOUT).await {
                Ok(accepted) => start_client(
                    (accepted.read, accepted.write),
                    remote,
                    slot,
                    &local,
                    &metrics,
                ),
                Err(e) => {
                    metrics.tls_refused.inc();
                    if let Some(suppressed) = tls_log.borrow_mut().allow(Instant::now()) {
                        tracing::warn!(shard = local.shard, %remote, error = %e, suppressed, "client TLS handshake failed");
                    }
                }
            }
        });
    }
}

/// Serves a client connection whose handshake (if any) is done.
fn start_client(
    (read_half, write_half): (ReadHalf, WriteHalf),
    remote: SocketAddr,
    slot: ConnectionSlot,
    local: &Rc<Local>,
    metrics: &ConnectionMetrics,
) {
    let max_frame_bytes = slot.node.config.max_frame_bytes;
    let sender = spawn_writer(write_half, conn_queue_bytes(max_frame_bytes));
    let conn = local.next_conn.get();
    local.next_conn.set(conn + 1);
    let client = Rc::new(ClientConn::new(sender, Instant::now()));
    local.conns.borrow_mut().insert(conn, client.clone());
    metrics.open.inc();
    monoio::spawn(read_client(
        FrameReader::new(read_half, max_frame_bytes),
        conn,
        remote,
        client,
        local.clone(),
        (slot, metrics.clone()),
    ));
}

async fn read_client<R: monoio::io::AsyncReadRent>(
    mut reader: FrameReader<R>,
    conn: ConnId,
    remote: SocketAddr,
    client: Rc<ClientConn>,
    local: Rc<Local>,
    (slot, metrics): (ConnectionSlot, ConnectionMetrics),
) {
    let max_in_flight = slot.node.config.max_requests_in_flight_per_connection;
    // Reading stops while the connection has its fill of requests in
    // flight, and at once when it is cut off (the read in progress is
    // dropped with the connection).
    while client.room_to_read(max_in_flight).await {
        local.inbox.room().await;
        let next = monoio::select! {
            frame = reader.next_frame() => Some(frame),
            _ = client.cut_off_signal() => None,
        };
        let frame = match next {
            None | Some(Ok(None)) => break,
            Some(Ok(Some(frame))) => frame,
            Some(Err(e)) => {
                refuse_client(client.sender(), &e);
                tracing::info!(shard = local.shard, %remote, error = %e, "closing client connection");
                break;
            }
        };
        match decode_message::<Request>(frame) {
            Ok(request) => {
                client.request_read(local.clock.get());
                local.inbox.push(Input::Client { conn, request });
            }
            Err(e) => {
                refuse_client(client.sender(), &e);
                tracing::info!(shard = local.shard, %remote, error = %e, "closing client connection: undecodable request");
                break;
            }
        }
    }
    client.sender().close();
    metrics.open.dec();
    drop(slot);
    local.inbox.push(Input::ConnClosed(conn));
}

/// Tells a client why its connection is about to close.
fn refuse_client(sender: &FrameSender, error: &FrameError) {
    let code = match error {
        FrameError::FrameTooLarge { .. } => ErrorCode::TooLarge,
        _ => ErrorCode::InvalidArgument,
    };
    let response = Response {
        id: 0,
        result: Some(state_machine::error(code, &error.to_string())),
    };
    let _ = sender.send(encode_frame_bytes(&response));
}

pub(super) async fn accept_peers(listener: TcpListener, local: Rc<Local>, node: Arc<NodeShared>) {
    // Anyone who reaches the peer port can fail a handshake as often as
    // they connect: those warnings are limited like the clients' (a real
    // peer redials at most once a second per shard).
    let handshake_log = Rc::new(RefCell::new(LogLimit::default()));
    loop {
        let (stream, remote) = next_connection(&listener, &local, &node).await;
        monoio::spawn(serve_peer(
            stream,
            remote,
            local.clone(),
            node.clone(),
            handshake_log.clone(),
        ));
    }
}

async fn serve_peer(
    stream: monoio::net::TcpStream,
    remote: SocketAddr,
    local: Rc<Local>,
    node: Arc<NodeShared>,
    handshake_log: Rc<RefCell<LogLimit>>,
) {
    let config = &node.config;
    let shard = local.shard;
    let (halves, certificate) = match &node.tls {
        None => (plain(stream), None),
        Some(tls) => {
            let config = tls.current().peers.clone();
            match tls_accept(stream, config, HANDSHAKE_TIMEOUT).await {
                Ok(accepted) => ((accepted.read, accepted.write), accepted.peer_certificate),
                Err(e) => {
                    if let Some(suppressed) = handshake_log.borrow_mut().allow(Instant::now()) {
                        tracing::warn!(shard, %remote, error = %e, suppressed, "peer TLS handshake failed");
                    }
                    return;
                }
            }
        }
    };
    let check = |hello: &Hello| {
        let gate = local.gate.borrow();
        check_hello(hello, &node, shard, &gate)
            .and_then(|()| match &node.tls {
                None => Ok(()),
                Some(tls) => tls
                    .check_peer_identity(certificate.as_ref(), hello.node_id, &gate.members)
                    .map_err(|reason| HelloRefusal::Identity { reason }),
            })
            .map_err(|e| corekv_transport::Refusal {
                removed: matches!(e, HelloRefusal::Removed { .. }),
                reason: e.to_string(),
            })
    };
    // The write half stays alive while we read: dropping it would shut the
    // socket down for writing and the dialer would see a closed link.
    let (hello, mut reader, write_half) = match accept_peer(
        remote,
        halves,
        config.node_id,
        config.max_frame_bytes,
        HANDSHAKE_TIMEOUT,
        check,
    )
    .await
    {
        Ok(accepted) => accepted,
        Err(e) => {
            if let Some(suppressed) = handshake_log.borrow_mut().allow(Instant::now()) {
                tracing::warn!(shard, %remote, error = %e, suppressed, "peer handshake refused");
            }
            return;
        }
    };
    let peer = hello.node_id;
    if hello.kind == LinkKind::Snapshot as i32 {
        let dir = data_dir::snapshot_dir(&config.data_dir, shard);
        let link = snapshot_transfer::SnapshotLink {
            shard,
            peer,
            me: config.node_id,
        };
        match snapshot_transfer::receive(reader, write_half, link, dir, &local.helper).await {
            Ok(incoming) => local
                .inbox
                .push(Input::SnapshotReceived(Box::new(incoming))),
            Err(reason) => tracing::warn!(shard, peer, %reason, "snapshot from leader refused"),
        }
        return;
    }
    tracing::info!(shard, peer, %remote, "peer connected");
    let link = LinkEnds {
        peer,
        me: config.node_id,
    };
    let mut refused_log = LogLimit::default();
    loop {
        local.inbox.room().await;
        let frame = match reader.next_frame().await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(shard, peer, error = %e, "closing peer connection");
                break;
            }
        };
        // A member removed while its link was up is cut off: it dials again,
        // and the handshake tells it it was removed (it never hears of its
        // removal otherwise: the leader stops sending to it once applied).
        if local.gate.borrow().removed.contains(&peer) {
            tracing::info!(shard, peer, "closing the link of a removed member");
            break;
        }
        let frame = match decode_message::<PeerFrame>(frame) {
            Ok(frame) => frame,
            Err(e) => {
                tracing::warn!(shard, peer, error = %e, "closing peer connection: undecodable frame");
                break;
            }
        };
        let refused = |refusal: Refusal| {
            node.metrics
                .peer_message_refused(shard, peer, refusal.as_str());
            if let Some(suppressed) = refused_log.allow(Instant::now()) {
                tracing::warn!(
                    shard,
                    peer,
                    reason = refusal.as_str(),
                    suppressed,
                    "peer message refused"
                );
            }
        };
        for input in inputs_of_frame(frame, link, refused) {
            local.inbox.push(input);
        }
    }
    drop(write_half);
    tracing::info!(shard, peer, "peer disconnected");
}

/// Why an inbound peer's Hello is refused; sent back to the peer and logged
/// on both sides.
#[derive(Debug, thiserror::Error)]
enum HelloRefusal {
    #[error("cluster id mismatch: mine {mine}, yours {yours}")]
    ClusterId { mine: u64, yours: u64 },
    #[error("shard count mismatch: mine {mine}, yours {yours}")]
    ShardCount { mine: u32, yours: u32 },
    #[error("wrong shard: this port serves shard {mine}, you asked for {yours}")]
    WrongShard { mine: u32, yours: u32 },
    #[error("protocol version mismatch: mine {mine}, yours {yours}")]
    ProtocolVersion { mine: u32, yours: u32 },
    #[error("unknown node id {id}: members of this shard are {members:?}")]
    UnknownNode { id: u64, members: Vec<u64> },
    #[error("node {id} was removed from shard {shard}")]
    Removed { id: u64, shard: u32 },
    #[error("node id {id} is this node's own id")]
    OwnId { id: u64 },
    #[error("certificate refused: {reason}")]
    Identity { reason: String },
}

fn check_hello(
    hello: &Hello,
    node: &NodeShared,
    shard: u32,
    gate: &PeerGate,
) -> Result<(), HelloRefusal> {
    let config = &node.config;
    if hello.cluster_id != config.cluster_id {
        return Err(HelloRefusal::ClusterId {
            mine: config.cluster_id,
            yours: hello.cluster_id,
        });
    }
    if hello.shards != config.shards {
        return Err(HelloRefusal::ShardCount {
            mine: config.shards,
            yours: hello.shards,
        });
    }
    if hello.shard != shard {
        return Err(HelloRefusal::WrongShard {
            mine: shard,
            yours: hello.shard,
        });
    }
    if hello.protocol_version != corekv_proto::PEER_PROTOCOL_VERSION {
        return Err(HelloRefusal::ProtocolVersion {
            mine: corekv_proto::PEER_PROTOCOL_VERSION,
            yours: hello.protocol_version,
        });
    }
    let id = hello.node_id;
    if id == config.node_id {
        return Err(HelloRefusal::OwnId { id });
    }
    if gate.removed.contains(&id) {
        return Err(HelloRefusal::Removed { id, shard });
    }
    // A node that knows no members yet joined and waits for the leader
    // that adds it: that leader is not a member it knows of.
    if !gate.members.is_empty() && !gate.members.contains(&id) {
        return Err(HelloRefusal::UnknownNode {
            id,
            members: gate.members.clone(),
        });
    }
    Ok(())
}
