//! Bad input on one connection closes that connection with a logged reason;
//! the listener and its other connections carry on.

mod common;

use std::cell::RefCell;
use std::rc::Rc;

use bytes::{BufMut, Bytes, BytesMut};
use common::{frame_number, listen, numbered_frame, run, wait_for};
use corekv_proto::peer::PeerFrame;
use corekv_transport::{decode_message, spawn_writer, FrameError, FrameReader};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};
use monoio::net::{TcpListener, TcpStream};

const MAX_FRAME_BYTES: usize = 1024;

/// How each connection the echo server handled ended.
type Outcomes = Rc<RefCell<Vec<String>>>;

/// Accepts connections forever; each one echoes every PeerFrame back and,
/// when a frame is too large, truncated or undecodable, records why and
/// closes that connection only.
fn spawn_echo_server(listener: TcpListener) -> Outcomes {
    let outcomes: Outcomes = Rc::default();
    let recorded = outcomes.clone();
    monoio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.expect("accept");
            let recorded = recorded.clone();
            monoio::spawn(async move {
                let outcome = echo(stream).await;
                recorded.borrow_mut().push(outcome);
            });
        }
    });
    outcomes
}

async fn echo(stream: TcpStream) -> String {
    let (read_half, write_half) = stream.into_split();
    let mut reader = FrameReader::new(read_half, MAX_FRAME_BYTES);
    let sender = spawn_writer(write_half, 1 << 20);
    loop {
        let payload = match reader.next_frame().await {
            Ok(Some(payload)) => payload,
            Ok(None) => return "clean eof".to_string(),
            Err(error) => return error_outcome(&error),
        };
        if let Err(error) = decode_message::<PeerFrame>(payload.clone()) {
            return error_outcome(&error);
        }
        let mut frame = BytesMut::with_capacity(4 + payload.len());
        frame.put_u32(payload.len() as u32);
        frame.extend_from_slice(&payload);
        sender.send(frame.freeze()).expect("queue echo");
    }
}

/// The variant and the operator-facing message.
fn error_outcome(error: &FrameError) -> String {
    let variant = match error {
        FrameError::FrameTooLarge { .. } => "FrameTooLarge",
        FrameError::Truncated { .. } => "Truncated",
        FrameError::Decode(_) => "Decode",
        FrameError::Io(_) => "Io",
        FrameError::Closed => "Closed",
        FrameError::TlsRecord => "TlsRecord",
    };
    format!("{variant}: {error}")
}

/// A client connection that sends raw bytes and reads frames back.
struct Client {
    reader: FrameReader<monoio::net::tcp::TcpOwnedReadHalf>,
    writer: monoio::net::tcp::TcpOwnedWriteHalf,
}

impl Client {
    async fn connect(addr: std::net::SocketAddr) -> Client {
        let stream = TcpStream::connect_addr(addr).await.expect("connect");
        let (read_half, writer) = stream.into_split();
        Client {
            reader: FrameReader::new(read_half, MAX_FRAME_BYTES),
            writer,
        }
    }

    async fn send_raw(&mut self, bytes: Bytes) {
        let (result, _) = self.writer.write_all(bytes).await;
        result.expect("client write");
    }

    /// Sends a numbered frame and checks the echo comes back.
    async fn round_trip(&mut self, seq: u32) {
        self.send_raw(numbered_frame(seq)).await;
        let payload = self
            .reader
            .next_frame()
            .await
            .expect("echo")
            .expect("echo, not eof");
        assert_eq!(frame_number(payload), seq);
    }

    /// Waits for the server to close this connection: EOF or a reset,
    /// whichever the kernel reports first.
    async fn expect_closed_by_server(self) {
        let mut read_half = self.reader.into_inner();
        let deadline = std::time::Instant::now() + common::DEADLINE;
        loop {
            let (result, _) = read_half.read(vec![0u8; 64]).await;
            match result {
                Ok(0) | Err(_) => return,
                Ok(_) => assert!(std::time::Instant::now() < deadline, "server kept talking"),
            }
        }
    }
}

fn header(len: u32) -> Bytes {
    Bytes::copy_from_slice(&len.to_be_bytes())
}

#[test]
fn oversize_frame_closes_only_its_connection() {
    run(async {
        let (listener, addr) = listen();
        let outcomes = spawn_echo_server(listener);
        let mut good = Client::connect(addr).await;
        good.round_trip(1).await;

        let mut bad = Client::connect(addr).await;
        // Announce 16 MiB to a server that accepts 1 KiB; send no payload, so
        // the refusal cannot come from having read (or allocated) it.
        bad.send_raw(header(16 << 20)).await;
        bad.expect_closed_by_server().await;
        wait_for("the server to record the refusal", || {
            !outcomes.borrow().is_empty()
        })
        .await;
        assert_eq!(
            outcomes.borrow()[0],
            "FrameTooLarge: frame of 16777216 bytes exceeds the limit of 1024 bytes (max_frame_bytes)"
        );

        // The other connection is untouched, and new ones are still accepted.
        good.round_trip(2).await;
        Client::connect(addr).await.round_trip(3).await;
    });
}

#[test]
fn truncated_frame_is_reported_with_what_was_missing() {
    run(async {
        let (listener, addr) = listen();
        let outcomes = spawn_echo_server(listener);
        let mut good = Client::connect(addr).await;

        let mut bad = Client::connect(addr).await;
        let mut partial = BytesMut::new();
        partial.put_u32(100);
        partial.extend_from_slice(&[0u8; 10]);
        bad.send_raw(partial.freeze()).await;
        // Half-close: the server sees EOF 14 bytes into a 104-byte frame.
        bad.writer.shutdown().await.expect("shutdown write side");
        bad.expect_closed_by_server().await;
        wait_for("the server to record the truncation", || {
            !outcomes.borrow().is_empty()
        })
        .await;
        assert_eq!(
            outcomes.borrow()[0],
            "Truncated: connection ended mid-frame: expected 104 bytes, got 14"
        );
        good.round_trip(1).await;
    });
}

#[test]
fn garbage_closes_the_connection_whether_it_looks_like_a_frame_or_not() {
    run(async {
        let (listener, addr) = listen();
        let outcomes = spawn_echo_server(listener);
        let mut good = Client::connect(addr).await;

        // Someone points an HTTP client at the peer port: "GET " read as a
        // length is about 1.2 GB, refused from the header alone.
        let mut http = Client::connect(addr).await;
        http.send_raw(Bytes::from_static(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
            .await;
        http.expect_closed_by_server().await;
        wait_for("the HTTP refusal", || outcomes.borrow().len() == 1).await;
        assert!(
            outcomes.borrow()[0].starts_with("FrameTooLarge: frame of 1195725856 bytes"),
            "{:?}",
            outcomes.borrow()
        );

        // A well-formed frame whose payload is not a protobuf message.
        let mut junk = Client::connect(addr).await;
        let mut frame = BytesMut::new();
        frame.put_u32(3);
        frame.extend_from_slice(&[0xff, 0xff, 0xff]);
        junk.send_raw(frame.freeze()).await;
        junk.expect_closed_by_server().await;
        wait_for("the decode failure", || outcomes.borrow().len() == 2).await;
        assert!(
            outcomes.borrow()[1].starts_with("Decode: undecodable frame payload"),
            "{:?}",
            outcomes.borrow()
        );

        good.round_trip(1).await;
    });
}

#[test]
fn frames_pipelined_on_one_connection_come_back_in_order() {
    run(async {
        let (listener, addr) = listen();
        let _outcomes = spawn_echo_server(listener);
        let stream = TcpStream::connect_addr(addr).await.expect("connect");
        let (read_half, write_half) = stream.into_split();
        let sender = spawn_writer(write_half, 1 << 20);
        let mut reader = FrameReader::new(read_half, MAX_FRAME_BYTES);
        for seq in 0..2000 {
            sender.send(numbered_frame(seq)).expect("queue");
        }
        for seq in 0..2000 {
            let payload = reader.next_frame().await.expect("read").expect("not eof");
            assert_eq!(frame_number(payload), seq);
        }
    });
}

/// Ten megabytes queued in one turn: far more than the socket buffers hold,
/// so the writer's vectored writes end short and must resume mid-frame.
#[test]
fn a_burst_larger_than_the_socket_buffers_arrives_intact_and_in_order() {
    run(async {
        let (listener, addr) = listen();
        let dialer = TcpStream::connect_addr(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        let (_dialer_read, dialer_write) = dialer.into_split();
        let sender = spawn_writer(dialer_write, 64 << 20);
        const FRAMES: u32 = 20_000;
        // Each frame: a sequence number followed by a pattern derived from
        // it, so a repeated or skipped slice shows up as a mismatch.
        let frame_of = |seq: u32| {
            let mut frame = BytesMut::with_capacity(4 + 512);
            frame.put_u32(512);
            frame.put_u32(seq);
            frame.extend((0..508u32).map(|i| (seq.wrapping_mul(31).wrapping_add(i) % 251) as u8));
            frame.freeze()
        };
        for seq in 0..FRAMES {
            sender.send(frame_of(seq)).expect("queue");
        }
        let mut reader = FrameReader::new(accepted, 4096);
        for seq in 0..FRAMES {
            let payload = reader.next_frame().await.expect("read").expect("not eof");
            assert_eq!(payload, frame_of(seq).slice(4..), "frame {seq} damaged");
        }
        wait_for("the queue to drain", || sender.queued_bytes() == 0).await;
    });
}

/// A peer that never reads: its writer is stuck with a full socket and a
/// full queue. `abort` frees the queue at once, cancels the stuck write and
/// closes the connection, so the peer sees it end instead of the sender
/// holding the memory for as long as the peer likes.
#[test]
fn abort_frees_a_stuck_queue_and_closes_the_connection() {
    run(async {
        let (listener, addr) = listen();
        let mut client = TcpStream::connect_addr(addr).await.expect("connect");
        let (stream, _) = listener.accept().await.expect("accept");
        let (_read_half, write_half) = stream.into_split();
        let sender = spawn_writer(write_half, 64 << 20);
        // Far more than loopback socket buffers hold; the client reads nothing.
        for seq in 0..20_000u32 {
            let mut frame = BytesMut::new();
            frame.put_u32(1020);
            frame.extend_from_slice(&seq.to_be_bytes());
            frame.extend_from_slice(&[0u8; 1016]);
            sender.send(frame.freeze()).expect("queue");
        }
        wait_for("the socket to fill up", || sender.queued_bytes() > 1 << 20).await;
        sender.abort();
        assert_eq!(sender.queued_bytes(), 0, "abort must free what is queued");
        assert!(sender.is_closed());
        drop(_read_half);
        // The client drains what the kernel held, then sees the end.
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let (result, back) = client.read(buf).await;
            buf = back;
            match result {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    });
}
