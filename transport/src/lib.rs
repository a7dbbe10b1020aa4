//! corekv-transport: frames and connections.
//!
//! Owns the length-prefixed frame codec, socket options, outbound peer links
//! (reconnect, batching, bounded queues) and the peer handshake. It never
//! knows Raft state or the key-value semantics; it moves frames.
//!
//! Everything async here runs on a monoio runtime, one per shard thread;
//! the handles ([`FrameSender`], [`PeerLink`]) are `!Send` on purpose.
//!
//! - [`encode_frame`] / [`FrameDecoder`] / [`decode_message`]: the wire
//!   framing (4-byte big-endian length, then one prost message), sans-IO.
//! - [`FrameReader`]: frames from a socket; [`spawn_writer`] /
//!   [`FrameSender`]: a bounded queue drained in one vectored write per turn.
//! - [`connect`] / [`configure_stream`]: `TCP_NODELAY`, keepalive, timeouts.
//! - [`PeerLink`]: an outbound peer connection that handshakes and reconnects;
//!   [`accept_peer`] / [`connect_peer`]: the two sides of the handshake.
//! - [`tls_accept`] / [`tls_connect`]: TLS (rustls) under any of the above,
//!   as [`ReadHalf`] / [`WriteHalf`] that are plain or TLS alike; the
//!   configs are built from PEM files ([`server_config`], [`client_config`]).
//!   It never decides who may connect: the node checks a peer's identity.
//! - [`uring_builder`]: the io_uring setup of every runtime that does I/O.

mod frame;
mod handshake;
mod link;
mod reader;
mod ring;
mod socket;
mod tls;
mod wake;
mod writer;

pub use frame::{
    decode_message, encode_frame, encode_frame_bytes, FrameDecoder, FrameError,
    DEFAULT_MAX_FRAME_BYTES, FRAME_HEADER_LEN,
};
pub use handshake::{accept_peer, connect_peer, HandshakeError, PeerTls, Refusal};
pub use link::{LinkEvent, PeerLink, PeerLinkConfig};
pub use reader::FrameReader;
pub use ring::uring_builder;
/// The TLS library, for callers that hold its configs.
pub use rustls;
pub use socket::{configure_stream, connect, SocketOptions};
pub use tls::{
    certificate_names, client_config, load_certificates, load_private_key, looks_like_tls_record,
    peer_server_name, plain, server_config, server_name, tls_accept, tls_connect, Accepted,
    IdentityFiles, ReadHalf, TlsConfigError, TlsError, TlsMaterial, TlsReadHalf, TlsWriteHalf,
    WriteHalf,
};
pub use writer::{spawn_writer, FrameSender, SendError};
