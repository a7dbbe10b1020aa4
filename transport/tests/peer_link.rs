//! Peer handshake and the reconnecting outbound link, over real loopback
//! sockets: the runbook cases "wrong cluster id" and "peer restarted".

mod common;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use common::{frame_number, hello, listen, numbered_frame, run, wait_for};
use corekv_proto::peer::Hello;
use corekv_transport::{
    accept_peer, connect_peer, HandshakeError, LinkEvent, PeerLink, PeerLinkConfig, Refusal,
    SendError, SocketOptions,
};
use monoio::net::TcpListener;

const MY_CLUSTER_ID: u64 = 7;
const MY_NODE_ID: u64 = 2;

/// The check a node runs on an incoming Hello, reduced to the cluster id.
fn check_cluster(hello: &Hello) -> Result<(), Refusal> {
    if hello.cluster_id == MY_CLUSTER_ID {
        Ok(())
    } else {
        Err(Refusal {
            reason: format!(
                "cluster id: mine {MY_CLUSTER_ID}, yours {}",
                hello.cluster_id
            ),
            removed: false,
        })
    }
}

fn link_config(addr: std::net::SocketAddr, cluster_id: u64) -> PeerLinkConfig {
    PeerLinkConfig {
        addr,
        hello: hello(cluster_id),
        socket: SocketOptions {
            connect_timeout: Duration::from_secs(5),
            ..SocketOptions::default()
        },
        max_queue_bytes: 1 << 20,
        max_frame_bytes: 1 << 20,
        tls: None,
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(200),
    }
}

/// Every event a link reported, in order.
type Events = Rc<RefCell<Vec<LinkEvent>>>;

/// Records every event a link reports.
fn recorder() -> (Events, Rc<dyn Fn(LinkEvent)>) {
    let events: Events = Rc::default();
    let sink = events.clone();
    (events, Rc::new(move |event| sink.borrow_mut().push(event)))
}

/// Listener side of one peer connection: handshake, then collect the
/// numbers of `count` frames, then drop the connection and the listener
/// (the peer "goes away").
async fn serve_once(listener: TcpListener, count: usize) -> Vec<u32> {
    let (stream, _) = listener.accept().await.expect("accept");
    let (hello, mut reader, _write_half) = accept_peer(
        stream.peer_addr().expect("peer address"),
        corekv_transport::plain(stream),
        MY_NODE_ID,
        1 << 20,
        Duration::from_secs(10),
        check_cluster,
    )
    .await
    .expect("handshake");
    assert_eq!(hello.node_id, 1);
    let mut received = Vec::with_capacity(count);
    while received.len() < count {
        let payload = reader.next_frame().await.expect("read").expect("not eof");
        received.push(frame_number(payload));
    }
    received
}

#[test]
fn wrong_cluster_id_is_rejected_with_the_reason_on_both_sides() {
    run(async {
        let (listener, addr) = listen();
        let listener_side = monoio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            accept_peer(
                stream.peer_addr().expect("peer address"),
                corekv_transport::plain(stream),
                MY_NODE_ID,
                1 << 20,
                Duration::from_secs(10),
                check_cluster,
            )
            .await
        });
        let dialer_side =
            connect_peer(addr, &hello(8), &SocketOptions::default(), 1 << 20, None).await;
        match dialer_side {
            Err(HandshakeError::Rejected {
                peer,
                reason,
                removed,
            }) => {
                assert_eq!(peer, addr);
                assert!(!removed);
                assert_eq!(reason, "cluster id: mine 7, yours 8");
            }
            Err(other) => panic!("dialer expected a rejection, got {other}"),
            Ok(_) => panic!("dialer expected a rejection, got HelloAck"),
        }
        match listener_side.await {
            Err(error @ HandshakeError::Rejected { .. }) => assert!(
                error
                    .to_string()
                    .ends_with("rejected: cluster id: mine 7, yours 8"),
                "{error}"
            ),
            Err(other) => panic!("listener expected a rejection, got {other}"),
            Ok(_) => panic!("listener accepted a foreign cluster"),
        }
    });
}

#[test]
fn matching_hello_is_acknowledged_with_the_listener_node_id() {
    run(async {
        let (listener, addr) = listen();
        let listener_side = monoio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let (hello, _, _) = accept_peer(
                stream.peer_addr().expect("peer address"),
                corekv_transport::plain(stream),
                MY_NODE_ID,
                1 << 20,
                Duration::from_secs(10),
                check_cluster,
            )
            .await
            .expect("listener handshake");
            hello
        });
        let (ack, _, _) = connect_peer(
            addr,
            &hello(MY_CLUSTER_ID),
            &SocketOptions::default(),
            1 << 20,
            None,
        )
        .await
        .expect("dialer handshake");
        assert_eq!(ack.node_id, MY_NODE_ID);
        assert_eq!(listener_side.await, hello(MY_CLUSTER_ID));
    });
}

#[test]
fn a_silent_dialer_times_out_the_handshake() {
    run(async {
        let (listener, addr) = listen();
        let _silent = monoio::net::TcpStream::connect_addr(addr)
            .await
            .expect("connect");
        let (stream, _) = listener.accept().await.expect("accept");
        let result = accept_peer(
            stream.peer_addr().expect("peer address"),
            corekv_transport::plain(stream),
            MY_NODE_ID,
            1 << 20,
            Duration::from_millis(50),
            check_cluster,
        )
        .await;
        match result {
            Err(HandshakeError::Timeout { after, .. }) => {
                assert_eq!(after, Duration::from_millis(50))
            }
            Err(other) => panic!("expected a timeout, got {other}"),
            Ok(_) => panic!("handshake completed without a Hello"),
        }
    });
}

#[test]
fn link_to_a_foreign_cluster_reports_rejected_and_keeps_retrying() {
    run(async {
        let (listener, addr) = listen();
        let rejections = Rc::new(RefCell::new(0u32));
        let counted = rejections.clone();
        monoio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.expect("accept");
                if accept_peer(
                    stream.peer_addr().expect("peer address"),
                    corekv_transport::plain(stream),
                    MY_NODE_ID,
                    1 << 20,
                    Duration::from_secs(10),
                    check_cluster,
                )
                .await
                .is_err()
                {
                    *counted.borrow_mut() += 1;
                }
            }
        });
        let (events, on_event) = recorder();
        let link = PeerLink::start(link_config(addr, 8), on_event);
        wait_for("two rejected attempts", || {
            events
                .borrow()
                .iter()
                .filter(|e| matches!(e, LinkEvent::Rejected { .. }))
                .count()
                >= 2
        })
        .await;
        assert_eq!(
            events.borrow()[0],
            LinkEvent::Rejected {
                reason: "cluster id: mine 7, yours 8".to_string(),
                removed: false,
            }
        );
        assert!(*rejections.borrow() >= 2);
        assert!(!link.is_up());
        assert_eq!(link.send(numbered_frame(0)), Err(SendError::Down));
        assert!(link.reconnects() >= 1);
        link.shutdown();
    });
}

#[test]
fn link_reconnects_by_itself_when_the_peer_comes_back_and_keeps_order() {
    run(async {
        let (listener, addr) = listen();
        let first_server = monoio::spawn(serve_once(listener, 100));
        let (events, on_event) = recorder();
        let link = PeerLink::start(link_config(addr, MY_CLUSTER_ID), on_event);
        wait_for("the link to come up", || link.is_up()).await;
        for seq in 0..100 {
            link.send(numbered_frame(seq)).expect("queue while up");
        }
        assert_eq!(first_server.await, (0..100).collect::<Vec<_>>());

        // The peer went away (connection and listener closed).
        wait_for("the link to notice the peer left", || !link.is_up()).await;
        let down_reason = events
            .borrow()
            .iter()
            .find_map(|e| match e {
                LinkEvent::Down { reason } => Some(reason.clone()),
                _ => None,
            })
            .expect("a Down event");
        assert!(
            down_reason.contains(&addr.to_string()),
            "reason should name the peer: {down_reason}"
        );
        let dropped_before = link.dropped_frames();
        assert_eq!(link.send(numbered_frame(999)), Err(SendError::Down));
        assert_eq!(link.dropped_frames(), dropped_before + 1);

        // Let it fail to reconnect at least once (connection refused), then
        // bring the peer back on the same port.
        wait_for("a failed reconnect attempt", || link.reconnects() >= 2).await;
        let listener = TcpListener::bind(addr).expect("rebind the same port");
        let second_server = monoio::spawn(serve_once(listener, 100));
        wait_for("the link to come back up", || link.is_up()).await;
        for seq in 100..200 {
            link.send(numbered_frame(seq))
                .expect("queue after reconnect");
        }
        assert_eq!(second_server.await, (100..200).collect::<Vec<_>>());

        let events = events.borrow();
        let ups = events.iter().filter(|e| **e == LinkEvent::Up).count();
        let downs = events
            .iter()
            .filter(|e| matches!(e, LinkEvent::Down { .. }))
            .count();
        assert_eq!(ups, 2, "{events:?}");
        // One outage, reported once however many retries it took (the
        // second server's departure may or may not have been seen yet).
        assert!((1..=2).contains(&downs), "{events:?}");
        assert_eq!(events[0], LinkEvent::Up);
        assert!(matches!(events[1], LinkEvent::Down { .. }), "{events:?}");
        assert_eq!(events[2], LinkEvent::Up);
        link.shutdown();
    });
}

#[test]
fn an_unreachable_peer_is_reported_down_once_and_shutdown_stops_the_link() {
    run(async {
        // Bind then close a listener to get a port nobody listens on. A std
        // listener closes synchronously on drop (monoio's may close later).
        let addr = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("address")
        };
        let (events, on_event) = recorder();
        let link = PeerLink::start(link_config(addr, MY_CLUSTER_ID), on_event);
        wait_for("several failed attempts", || link.reconnects() >= 3).await;
        {
            let events = events.borrow();
            assert_eq!(events.len(), 1, "one Down per outage: {events:?}");
            match &events[0] {
                LinkEvent::Down { reason } => {
                    assert_eq!(reason, &format!("connection refused by {addr}"))
                }
                other => panic!("expected Down, got {other:?}"),
            }
        }
        link.shutdown();
        assert_eq!(link.send(numbered_frame(0)), Err(SendError::Closed));
        // The task holds the only other reference to the event sink; it is
        // released when the task exits, so no further attempt can be made.
        wait_for("the link task to exit", || Rc::strong_count(&events) == 1).await;
        assert_eq!(events.borrow().len(), 1, "no event after shutdown");
    });
}
