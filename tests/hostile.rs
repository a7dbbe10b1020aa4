//! Hostile input against real nodes: whatever a peer or a client sends, the
//! node keeps serving everyone else, says what it refused, and does not
//! flood its log.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::Bytes;
use common::{wait_for, Cluster, RawClient, DEADLINE};
use corekv::scrape;
use corekv_proto::client::{request::Op, response, Consistency, ErrorCode, Get, Put, Request};
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
        let bytes = corekv_transport::encode_frame_bytes(frame);
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

#[test]
fn a_flood_of_bad_handshakes_on_the_peer_port_is_logged_sparingly() {
    let mut cluster = Cluster::configure(1, 1, "");
    cluster.node(1).start();
    wait_for("node 1 leads", DEADLINE, || {
        cluster
            .status(1)
            .filter(|s| s.shards[0].leader_id == 1)
            .map(|_| ())
    });
    let attempts = 200;
    for _ in 0..attempts {
        let mut stream =
            TcpStream::connect(("127.0.0.1", cluster.nodes[0].peer_port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        // Not a hello: a length prefix past any frame bound (or a TLS
        // record the server cannot parse).
        stream.write_all(&[0xff; 16]).unwrap();
        let mut rest = Vec::new();
        // The node closes the connection once it refused it; waiting for
        // that means every attempt was handled before the log is read.
        stream
            .read_to_end(&mut rest)
            .expect("the node closes a refused peer connection");
    }
    let (code, out, err) = cluster.cli(&["put", "still", "serving"]);
    assert_eq!(code, 0, "the node stopped serving: {out} {err}");
    let lines = cluster.nodes[0]
        .log()
        .lines()
        .filter(|l| l.contains("peer handshake refused") || l.contains("peer TLS handshake failed"))
        .count();
    assert!(
        (1..=3).contains(&lines),
        "{attempts} bad handshakes must make a few rate-limited log lines, not {lines}"
    );
}

fn get_request(id: u64, key: &str) -> Request {
    Request {
        id,
        no_forward: false,
        op: Some(Op::Get(Get {
            key: Bytes::copy_from_slice(key.as_bytes()),
            consistency: Consistency::Stale as i32,
            local: false,
        })),
        ..Default::default()
    }
}

fn node_metric(cluster: &Cluster, name_and_labels: &str) -> Option<f64> {
    let text = scrape::get(&cluster.nodes[0].admin_addr(), "/metrics").ok()?;
    scrape::metric_value(&text, name_and_labels)
}

/// A client pipelines gets of a 512 KiB value and never reads the answers.
/// The node cuts it off once its answers pass the queue bound, logs one
/// line for it, frees the queue, and keeps serving another client.
#[test]
fn a_client_that_stops_reading_is_cut_off_once_and_others_are_served() {
    let mut cluster = Cluster::configure(1, 1, "max_frame_bytes = 2097152\n");
    cluster.node(1).start();
    cluster.wait_for_leaders();
    let value = Bytes::from(vec![b'v'; 512 * 1024]);
    let mut other = RawClient::connect(cluster.nodes[0].client_port).unwrap();
    let put = other
        .call(Request {
            id: 1,
            no_forward: false,
            op: Some(Op::Put(Put {
                key: Bytes::from_static(b"big"),
                value: value.clone(),
            })),
            ..Default::default()
        })
        .unwrap();
    assert!(
        matches!(put.result, Some(response::Result::Write(_))),
        "{put:?}"
    );

    let mut greedy = RawClient::connect(cluster.nodes[0].client_port).unwrap();
    greedy
        .tcp
        .set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // Write until the node stops taking requests (back-pressure or the cut).
    for id in 1..=5_000 {
        if greedy.send(&get_request(id, "big")).is_err() {
            break;
        }
    }
    wait_for("the slow reader cut off", DEADLINE, || {
        (node_metric(
            &cluster,
            "client_connections_closed_total{shard=\"0\",reason=\"slow_reader\"}",
        ) == Some(1.0))
        .then_some(())
    });
    match other.call(get_request(2, "big")).unwrap().result {
        Some(response::Result::Get(g)) => assert_eq!(g.value, value),
        result => panic!("another client must still be served: {result:?}"),
    }
    let lines = cluster.nodes[0]
        .log()
        .lines()
        .filter(|l| l.contains("not reading its answers"))
        .count();
    assert_eq!(lines, 1, "one line for the connection");
    // What was queued for it is gone: the connection ends for the client too.
    greedy
        .tcp
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut sink = vec![0u8; 1 << 20];
    loop {
        match greedy.stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    wait_for("the connection counted closed", DEADLINE, || {
        // Only `other` is left open.
        (node_metric(&cluster, "client_connections{shard=\"0\"}") == Some(1.0)).then_some(())
    });
}

/// Past max_client_connections a new connection gets one UNAVAILABLE answer
/// naming the limit and is closed; when one closes, a new one is served.
#[test]
fn connections_past_the_limit_are_refused_with_a_clear_answer() {
    let mut cluster = Cluster::configure(1, 1, "max_client_connections = 3\n");
    cluster.node(1).start();
    cluster.wait_for_leaders();
    let port = cluster.nodes[0].client_port;
    let mut held: Vec<RawClient> = (0..3)
        .map(|i| {
            let mut c = RawClient::connect(port).unwrap();
            c.call(get_request(i, "k"))
                .expect("a connection within the limit is served");
            c
        })
        .collect();
    let mut extra = RawClient::connect(port).unwrap();
    let answer = extra.recv().expect("the refused connection is told why");
    match answer.result {
        Some(response::Result::Error(e)) => {
            assert_eq!(e.code, ErrorCode::Unavailable as i32);
            assert!(
                e.message.contains("max_client_connections 3"),
                "{}",
                e.message
            );
        }
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    assert!(extra.recv().is_err(), "the refused connection is closed");
    assert_eq!(
        node_metric(&cluster, "client_connections_rejected_total{shard=\"0\"}"),
        Some(1.0)
    );
    held.pop();
    wait_for("a slot given back", DEADLINE, || {
        let mut c = RawClient::connect(port).ok()?;
        c.call(get_request(9, "k")).ok()?.result?;
        Some(())
    });
}

/// A connection idle past client_idle_timeout_ms is closed; one that keeps
/// talking is not.
#[test]
fn idle_connections_are_closed_after_the_idle_timeout() {
    let mut cluster = Cluster::configure(1, 1, "client_idle_timeout_ms = 1000\n");
    cluster.node(1).start();
    cluster.wait_for_leaders();
    let port = cluster.nodes[0].client_port;
    let mut idle = RawClient::connect(port).unwrap();
    idle.call(get_request(1, "k")).unwrap();
    let mut busy = RawClient::connect(port).unwrap();
    wait_for("the idle connection closed", DEADLINE, || {
        busy.call(get_request(2, "k"))
            .expect("a busy connection stays open");
        (node_metric(
            &cluster,
            "client_connections_closed_total{shard=\"0\",reason=\"idle\"}",
        ) == Some(1.0))
        .then_some(())
    });
    assert!(idle.recv().is_err(), "the idle connection must be closed");
    busy.call(get_request(3, "k"))
        .expect("the busy connection is still served");
}

/// With at most 4 requests of a connection in flight, a client that
/// pipelines 2,000 writes on one connection still gets every answer: the
/// node stops reading instead of failing, and reads on as answers go out.
#[test]
fn back_pressure_on_in_flight_requests_loses_nothing() {
    let mut cluster = Cluster::configure(1, 1, "max_requests_in_flight_per_connection = 4\n");
    cluster.node(1).start();
    cluster.wait_for_leaders();
    let mut client = RawClient::connect(cluster.nodes[0].client_port).unwrap();
    let total = 2_000u64;
    let writer_stream = client.tcp.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut c = RawClient::from_stream(writer_stream);
        for id in 1..=total {
            c.send(&Request {
                id,
                no_forward: false,
                op: Some(Op::Put(Put {
                    key: Bytes::from(format!("k{id}")),
                    value: Bytes::from_static(b"v"),
                })),
                ..Default::default()
            })
            .unwrap();
        }
    });
    let mut answered = std::collections::BTreeSet::new();
    while answered.len() < total as usize {
        let response = client.recv().expect("every request is answered");
        assert!(
            matches!(response.result, Some(response::Result::Write(_))),
            "{response:?}"
        );
        answered.insert(response.id);
    }
    writer.join().unwrap();
}
