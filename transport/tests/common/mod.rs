//! Helpers shared by the socket tests: a runtime per test, and waiting for a
//! condition with a generous deadline instead of sleeping a fixed time.
#![allow(dead_code)] // each test binary uses a different subset

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use corekv_proto::peer::{peer_frame::Msg, Hello, PeerFrame, RaftBatch};
use corekv_transport::encode_frame_bytes;

/// How long any test waits for something that should happen in milliseconds;
/// large because the machine running the tests may be busy.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Runs `test` on a fresh monoio runtime (io_uring where available, else
/// epoll), as a shard thread would.
pub fn run<F: Future>(test: F) -> F::Output {
    monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .expect("build monoio runtime")
        .block_on(test)
}

/// Waits until `condition` holds, checking every few milliseconds; panics
/// naming `what` after [`DEADLINE`].
pub async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        monoio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A listener on an ephemeral loopback port.
pub fn listen() -> (monoio::net::TcpListener, SocketAddr) {
    let listener = monoio::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("listener address");
    (listener, addr)
}

/// A Hello from node 1 of cluster 7 for shard 0.
pub fn hello(cluster_id: u64) -> Hello {
    Hello {
        cluster_id,
        node_id: 1,
        shard: 0,
        protocol_version: corekv_proto::PEER_PROTOCOL_VERSION,
        shards: 1,
        kind: 0,
    }
}

/// A RaftBatch frame carrying `seq` as its one message, so receivers can
/// check order.
pub fn numbered_frame(seq: u32) -> Bytes {
    encode_frame_bytes(&PeerFrame {
        msg: Some(Msg::Raft(RaftBatch {
            messages: vec![Bytes::from(seq.to_be_bytes().to_vec())],
        })),
    })
}

/// The sequence number in a frame made by [`numbered_frame`].
pub fn frame_number(payload: Bytes) -> u32 {
    let frame: PeerFrame = corekv_transport::decode_message(payload).expect("a PeerFrame");
    match frame.msg {
        Some(Msg::Raft(batch)) => u32::from_be_bytes(batch.messages[0][..].try_into().unwrap()),
        other => panic!("expected a RaftBatch, got {other:?}"),
    }
}
