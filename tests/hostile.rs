//! Hostile input against real nodes: whatever a peer or a client sends, the
//! node keeps serving everyone else, says what it refused, and does not
//! flood its log.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::Bytes;
use common::{wait_for, Cluster, DEADLINE};
use corekv::scrape;
use corekv_proto::peer::{peer_frame, Forward, Hello, LinkKind, PeerFrame, RaftBatch};
use prost::Message as _;
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};

/// A peer link opened by hand: the handshake done as node `as_node`.
struct ForgedPeer {
    stream: TcpStream,
}

impl ForgedPeer {
    fn connect(port: u16, as_node: u64, shards: u32) -> ForgedPeer {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to peer port");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut peer = ForgedPeer { stream };
        peer.send(&PeerFrame {
            msg: Some(peer_frame::Msg::Hello(Hello {
                cluster_id: 7,
                node_id: as_node,
                shard: 0,
                protocol_version: corekv_proto::PEER_PROTOCOL_VERSION,
                shards,
                kind: LinkKind::Raft as i32,
            })),
        });
        let mut len = [0u8; 4];
        peer.stream.read_exact(&mut len).expect("hello answer");
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        peer.stream.read_exact(&mut body).unwrap();
        let answer = PeerFrame::decode(&body[..]).unwrap();
        assert!(
            matches!(answer.msg, Some(peer_frame::Msg::HelloAck(_))),
            "handshake as node {as_node} refused: {answer:?}"
        );
        peer
    }

    fn send(&mut self, frame: &PeerFrame) {
        let body = frame.encode_to_vec();
        let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&body);
        self.stream.write_all(&bytes).expect("send peer frame");
    }

    fn send_raft(&mut self, messages: Vec<Bytes>) {
        self.send(&PeerFrame {
            msg: Some(peer_frame::Msg::Raft(RaftBatch { messages })),
        });
    }
}

fn raft_message(kind: MessageType, from: u64, to: u64, term: u64) -> Bytes {
    let mut m = Message::default();
    m.set_msg_type(kind);
    m.from = from;
    m.to = to;
    m.term = term;
    if kind == MessageType::MsgSnapshot {
        m.mut_snapshot().mut_metadata().index = 1_000_000;
        m.mut_snapshot().mut_metadata().term = term;
    }
    Bytes::from(m.write_to_bytes().unwrap())
}

/// Node 3 of a 3-node cluster is down; we dial node 1's peer port as node 3
/// (a member, so the handshake succeeds) and send what no correct node
/// sends: a MsgSnapshot outside the snapshot path (it used to reach a panic),
/// messages claiming another sender or receiver, local-only kinds, garbage,
/// and a forward on behalf of node 2. Node 1 drops and counts each, logs a
/// bounded number of lines, and the cluster keeps serving.
#[test]
fn forged_messages_on_a_valid_peer_link_are_dropped_counted_and_logged_sparingly() {
    let mut cluster = Cluster::configure(3, 1, "");
    cluster.node(1).start();
    cluster.node(2).start();
    wait_for("a leader among nodes 1 and 2", DEADLINE, || {
        (1..=2)
            .filter_map(|id| cluster.status(id))
            .find(|s| s.shards[0].leader_id != 0)
    });

    let mut forged = ForgedPeer::connect(cluster.nodes[0].peer_port, 3, 1);
    let rounds = 500;
    for _ in 0..rounds {
        forged.send_raft(vec![
            raft_message(MessageType::MsgSnapshot, 3, 1, 1_000),
            raft_message(MessageType::MsgHeartbeat, 2, 1, 1_000),
            raft_message(MessageType::MsgAppend, 3, 2, 1_000),
            raft_message(MessageType::MsgHup, 3, 1, 1_000),
            Bytes::from_static(&[0xff; 7]),
        ]);
        forged.send(&PeerFrame {
            msg: Some(peer_frame::Msg::Forward(Forward {
                origin_node: 2,
                request: Some(Default::default()),
            })),
        });
    }

    let admin = cluster.nodes[0].admin_addr();
    let refused = |reason: &str| {
        let text = scrape::get(&admin, "/metrics").ok()?;
        scrape::metric_value(
            &text,
            &format!("peer_messages_refused_total{{shard=\"0\",peer=\"3\",reason=\"{reason}\"}}"),
        )
    };
    wait_for("every forged message counted", DEADLINE, || {
        let all = [
            "wrong_type",
            "wrong_from",
            "wrong_to",
            "undecodable",
            "wrong_origin",
        ]
        .map(|reason| refused(reason).unwrap_or(0.0));
        (all == [
            2.0 * rounds as f64,
            rounds as f64,
            rounds as f64,
            rounds as f64,
            rounds as f64,
        ])
        .then_some(())
    });

    assert!(
        cluster.node(1).is_running(),
        "node 1 stopped:\n{}",
        cluster.nodes[0].log()
    );
    let (code, out, err) = cluster.cli(&["put", "still", "serving"]);
    assert_eq!(code, 0, "the cluster stopped serving: {out} {err}");
    let lines = cluster.nodes[0]
        .log()
        .lines()
        .filter(|l| l.contains("peer message refused"))
        .count();
    assert!(
        (1..=3).contains(&lines),
        "{} refusals must make a few rate-limited log lines, not {lines}",
        6 * rounds
    );
}
