//! The peer handshake: the dialer's first frame is `Hello`; the listener
//! answers `HelloAck`, or `HelloReject{reason}` and closes the connection.
//! Both sides log a rejection with the values that disagree, so an operator
//! sees the misconfiguration on whichever node they look at.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use corekv_proto::peer::{peer_frame::Msg, Hello, HelloAck, HelloReject, PeerFrame};
use monoio::io::AsyncWriteRentExt;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;

use crate::frame::{decode_message, encode_frame_bytes, FrameError};
use crate::reader::FrameReader;
use crate::socket::{connect, SocketOptions};
use crate::tls::{plain, tls_connect, ReadHalf, TlsError, WriteHalf};

/// TLS for dialing a peer: the client config, read at every attempt so
/// that the next connection after a certificate reload uses the new one,
/// and the name the listener's certificate must carry
/// ([`crate::peer_server_name`]).
#[derive(Clone)]
pub struct PeerTls {
    /// The current client config (with this node's certificate).
    pub config: Arc<dyn Fn() -> Arc<ClientConfig> + Send + Sync>,
    /// The name the peer's certificate must carry.
    pub server_name: ServerName<'static>,
}

impl fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Why a peer handshake failed. Each variant names the remote address.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The TCP connection could not be established.
    #[error("{}", describe_connect_error(*peer, source))]
    Connect {
        /// The address dialed.
        peer: SocketAddr,
        /// What the kernel said.
        source: std::io::Error,
    },
    /// The TLS handshake failed.
    #[error("TLS with {peer}: {source}")]
    Tls {
        /// The remote address.
        peer: SocketAddr,
        /// What went wrong.
        source: TlsError,
    },
    /// Reading or writing the handshake frames failed.
    #[error("handshake with {peer}: socket error: {source}")]
    Io {
        /// The remote address.
        peer: SocketAddr,
        /// What the kernel said.
        source: std::io::Error,
    },
    /// The other side did not complete its part in time.
    #[error("handshake with {peer} timed out after {after:?}")]
    Timeout {
        /// The remote address.
        peer: SocketAddr,
        /// The handshake time limit.
        after: Duration,
    },
    /// The other side closed the connection before its handshake frame.
    #[error("handshake with {peer}: connection closed before the handshake completed")]
    Closed {
        /// The remote address.
        peer: SocketAddr,
    },
    /// The handshake frame was too large, truncated or undecodable.
    #[error("handshake with {peer}: {source}")]
    Frame {
        /// The remote address.
        peer: SocketAddr,
        /// The framing problem.
        source: FrameError,
    },
    /// A valid frame, but not the one the handshake expects at this point.
    #[error("handshake with {peer}: expected {expected}, got {got}")]
    Unexpected {
        /// The remote address.
        peer: SocketAddr,
        /// The message the protocol calls for.
        expected: &'static str,
        /// The message that arrived.
        got: &'static str,
    },
    /// The listener (or, on the listener side, our check) refused the Hello.
    #[error("handshake with {peer} rejected: {reason}")]
    Rejected {
        /// The remote address.
        peer: SocketAddr,
        /// What disagreed, with both values.
        reason: String,
        /// The dialer was removed from the group (see [`Refusal::removed`]).
        removed: bool,
    },
}

/// Why the listener refuses a Hello: what it tells the dialer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// What disagreed, with both values.
    pub reason: String,
    /// The dialer was a member of the shard's group and was removed: it
    /// should stop serving the shard rather than dial again.
    pub removed: bool,
}

fn describe_connect_error(peer: SocketAddr, error: &std::io::Error) -> String {
    match error.kind() {
        std::io::ErrorKind::ConnectionRefused => format!("connection refused by {peer}"),
        // `connect` already words its own timeout with the address and limit.
        std::io::ErrorKind::TimedOut => error.to_string(),
        _ => format!("connect to {peer} failed: {error}"),
    }
}

/// The name of a peer message, for errors and logs.
pub(crate) fn message_name(msg: &Option<Msg>) -> &'static str {
    match msg {
        None => "an empty PeerFrame",
        Some(Msg::Hello(_)) => "Hello",
        Some(Msg::HelloAck(_)) => "HelloAck",
        Some(Msg::HelloReject(_)) => "HelloReject",
        Some(Msg::Raft(_)) => "RaftBatch",
        Some(Msg::Forward(_)) => "Forward",
        Some(Msg::ForwardReply(_)) => "ForwardReply",
        Some(Msg::SnapshotChunk(_)) => "SnapshotChunk",
        Some(Msg::SnapshotAck(_)) => "SnapshotAck",
    }
}

fn peer_frame(msg: Msg) -> bytes::Bytes {
    encode_frame_bytes(&PeerFrame { msg: Some(msg) })
}

/// Runs `step` under the handshake time limit.
async fn within<T>(
    peer: SocketAddr,
    after: Duration,
    step: impl Future<Output = Result<T, HandshakeError>>,
) -> Result<T, HandshakeError> {
    monoio::time::timeout(after, step)
        .await
        .unwrap_or(Err(HandshakeError::Timeout { peer, after }))
}

/// Reads the next handshake frame and decodes it as a `PeerFrame`.
async fn read_peer_frame(
    peer: SocketAddr,
    reader: &mut FrameReader<ReadHalf>,
) -> Result<PeerFrame, HandshakeError> {
    let payload = match reader.next_frame().await {
        Ok(Some(payload)) => payload,
        Ok(None) => return Err(HandshakeError::Closed { peer }),
        Err(FrameError::Io(source)) => return Err(HandshakeError::Io { peer, source }),
        Err(source) => return Err(HandshakeError::Frame { peer, source }),
    };
    decode_message(payload).map_err(|source| HandshakeError::Frame { peer, source })
}

async fn write_frame(
    peer: SocketAddr,
    writer: &mut WriteHalf,
    frame: bytes::Bytes,
) -> Result<(), HandshakeError> {
    let (result, _) = writer.write_all(frame).await;
    result
        .map(|_| ())
        .map_err(|source| HandshakeError::Io { peer, source })
}

/// Listener side: reads the first frame within `handshake_timeout`, expects
/// a `Hello` and hands it to `check`.
///
/// - `check` returns `Err(refusal)`: `HelloReject` is sent, the
///   rejection is logged with the peer's values, the connection is closed and
///   [`HandshakeError::Rejected`] returned.
/// - `check` returns `Ok`: `HelloAck{node_id: my_node_id}` is sent and the
///   Hello is returned with a reader over the rest of the stream and the
///   write half.
///
/// The socket options and TLS are the caller's business: call
/// [`crate::configure_stream`] on the accepted stream, then
/// [`crate::tls_accept`] or [`crate::plain`], first.
pub async fn accept_peer(
    peer: SocketAddr,
    (read_half, mut write_half): (ReadHalf, WriteHalf),
    my_node_id: u64,
    max_frame_bytes: usize,
    handshake_timeout: Duration,
    check: impl FnOnce(&Hello) -> Result<(), Refusal>,
) -> Result<(Hello, FrameReader<ReadHalf>, WriteHalf), HandshakeError> {
    let mut reader = FrameReader::new(read_half, max_frame_bytes);
    let first = within(peer, handshake_timeout, read_peer_frame(peer, &mut reader)).await?;
    let hello = match first.msg {
        Some(Msg::Hello(hello)) => hello,
        other => {
            return Err(HandshakeError::Unexpected {
                peer,
                expected: "Hello",
                got: message_name(&other),
            })
        }
    };
    if let Err(Refusal { reason, removed }) = check(&hello) {
        tracing::warn!(
            %peer,
            peer_cluster_id = hello.cluster_id,
            peer_node_id = hello.node_id,
            peer_shard = hello.shard,
            peer_shards = hello.shards,
            peer_protocol_version = hello.protocol_version,
            %reason,
            "rejected peer handshake"
        );
        let reject = peer_frame(Msg::HelloReject(HelloReject {
            reason: reason.clone(),
            removed,
        }));
        // Best effort: the dialer learns why, unless it is already gone.
        // Dropping the halves afterwards closes the connection.
        let _ = within(
            peer,
            handshake_timeout,
            write_frame(peer, &mut write_half, reject),
        )
        .await;
        return Err(HandshakeError::Rejected {
            peer,
            reason,
            removed,
        });
    }
    let ack = peer_frame(Msg::HelloAck(HelloAck {
        node_id: my_node_id,
    }));
    within(
        peer,
        handshake_timeout,
        write_frame(peer, &mut write_half, ack),
    )
    .await?;
    tracing::debug!(%peer, peer_node_id = hello.node_id, shard = hello.shard, "accepted peer handshake");
    Ok((hello, reader, write_half))
}

/// Dialer side: connects to `addr` (configured with `opts`), runs the TLS
/// handshake when `tls` is set, sends `hello` and waits for the answer, all
/// within `opts.connect_timeout` per step. Returns the listener's
/// `HelloAck` with a reader and the write half; a `HelloReject` is
/// [`HandshakeError::Rejected`] with the listener's reason.
pub async fn connect_peer(
    addr: SocketAddr,
    hello: &Hello,
    opts: &SocketOptions,
    max_frame_bytes: usize,
    tls: Option<&PeerTls>,
) -> Result<(HelloAck, FrameReader<ReadHalf>, WriteHalf), HandshakeError> {
    let stream = connect(addr, opts)
        .await
        .map_err(|source| HandshakeError::Connect { peer: addr, source })?;
    let limit = opts.connect_timeout;
    let (read_half, mut write_half) = match tls {
        None => plain(stream),
        Some(tls) => tls_connect(stream, (tls.config)(), tls.server_name.clone(), limit)
            .await
            .map_err(|source| HandshakeError::Tls { peer: addr, source })?,
    };
    let mut reader = FrameReader::new(read_half, max_frame_bytes);
    let hello_frame = peer_frame(Msg::Hello(*hello));
    within(addr, limit, write_frame(addr, &mut write_half, hello_frame)).await?;
    let answer = within(addr, limit, read_peer_frame(addr, &mut reader)).await?;
    match answer.msg {
        Some(Msg::HelloAck(ack)) => Ok((ack, reader, write_half)),
        Some(Msg::HelloReject(reject)) => Err(HandshakeError::Rejected {
            peer: addr,
            reason: reject.reason,
            removed: reject.removed,
        }),
        other => Err(HandshakeError::Unexpected {
            peer: addr,
            expected: "HelloAck or HelloReject",
            got: message_name(&other),
        }),
    }
}
