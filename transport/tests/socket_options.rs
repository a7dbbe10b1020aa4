//! The options a connection is configured with are the ones the kernel
//! reports back, on the dialing and on the accepting end. The system this
//! replaces dropped idle connections after ~23 s for lack of keepalive.

mod common;

use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use common::{listen, run};
use corekv_transport::{configure_stream, connect, SocketOptions};
use socket2::SockRef;

/// What getsockopt says about one socket.
#[derive(Debug, PartialEq)]
struct Readback {
    nodelay: bool,
    keepalive: bool,
    keepalive_idle: Duration,
    keepalive_interval: Duration,
    keepalive_count: u32,
    user_timeout: Option<Duration>,
}

fn read_back(stream: &monoio::net::TcpStream) -> Readback {
    // SAFETY: the stream outlives this borrow and SockRef never closes it.
    let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    let socket = SockRef::from(&fd);
    Readback {
        nodelay: socket.nodelay().expect("TCP_NODELAY"),
        keepalive: socket.keepalive().expect("SO_KEEPALIVE"),
        keepalive_idle: socket.keepalive_time().expect("TCP_KEEPIDLE"),
        keepalive_interval: socket.keepalive_interval().expect("TCP_KEEPINTVL"),
        keepalive_count: socket.keepalive_retries().expect("TCP_KEEPCNT"),
        user_timeout: socket.tcp_user_timeout().expect("TCP_USER_TIMEOUT"),
    }
}

fn expected(opts: &SocketOptions) -> Readback {
    Readback {
        nodelay: opts.nodelay,
        keepalive: true,
        keepalive_idle: opts.keepalive_idle,
        keepalive_interval: opts.keepalive_interval,
        keepalive_count: opts.keepalive_count,
        user_timeout: Some(opts.user_timeout()),
    }
}

/// Dials with `connect` and configures the accepted end with
/// `configure_stream`, as the node does, then reads both back.
fn check_both_ends(opts: SocketOptions) {
    run(async move {
        let (listener, addr) = listen();
        let dialed = connect(addr, &opts).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        // A fresh socket has none of this: the readback below is not vacuous.
        assert!(!read_back(&accepted).keepalive);
        configure_stream(&accepted, &opts).expect("configure accepted stream");
        assert_eq!(read_back(&dialed), expected(&opts), "dialing end");
        assert_eq!(read_back(&accepted), expected(&opts), "accepting end");
    });
}

#[test]
fn defaults_are_nodelay_and_keepalive_10s_5s_3() {
    let opts = SocketOptions::default();
    assert_eq!(opts.user_timeout(), Duration::from_secs(25));
    check_both_ends(opts);
}

#[test]
fn configured_keepalive_timings_reach_the_kernel() {
    check_both_ends(SocketOptions {
        nodelay: true,
        keepalive_idle: Duration::from_secs(7),
        keepalive_interval: Duration::from_secs(2),
        keepalive_count: 4,
        connect_timeout: Duration::from_secs(1),
    });
}

#[test]
fn connect_to_a_closed_port_fails_with_connection_refused() {
    run(async {
        let addr = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("address")
        };
        let error = connect(addr, &SocketOptions::default())
            .await
            .expect_err("nothing listens");
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused);
    });
}
