//! Transport over loopback, client and server on one monoio thread (as two
//! tasks of one shard would be):
//!
//! - `transport/ping_pong`: one 64 B RaftBatch frame out, echoed back, next
//!   frame only after the echo: round trips/s (latency bound).
//! - `transport/one_way_pipelined`: frames queued as fast as the bounded send
//!   queue takes them, counted (and decoded) by the receiver: frames/s.
//!
//! `cargo bench --bench transport`.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use corekv_proto::peer::{peer_frame::Msg, HelloAck, PeerFrame, RaftBatch};
use corekv_transport::{
    configure_stream, connect, decode_message, encode_frame_bytes, spawn_writer, FrameReader,
    FrameSender, SendError, SocketOptions,
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use monoio::io::Splitable;
use monoio::net::tcp::TcpOwnedReadHalf;
use monoio::net::TcpListener;

const MAX_FRAME_BYTES: usize = 1 << 20;
const MAX_QUEUE_BYTES: usize = 4 << 20;

type Runtime = monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>>;
type LegacyRuntime = monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>>;

/// A 64-byte raft message in a batch: the size of a heartbeat or a small
/// append.
fn raft_frame() -> Bytes {
    encode_frame_bytes(&PeerFrame {
        msg: Some(Msg::Raft(RaftBatch {
            messages: vec![Bytes::from(vec![7u8; 64])],
        })),
    })
}

/// Marks the end of a pipelined burst; the server answers it.
fn marker_frame() -> Bytes {
    encode_frame_bytes(&PeerFrame {
        msg: Some(Msg::HelloAck(HelloAck { node_id: 1 })),
    })
}

/// Serves every connection: echoes RaftBatch frames when `echo` is set,
/// otherwise only counts them, and answers each marker frame.
async fn serve(listener: TcpListener, echo: bool, received: Rc<Cell<u64>>) {
    loop {
        let (stream, _) = listener.accept().await.expect("accept");
        configure_stream(&stream, &SocketOptions::default()).expect("configure");
        let (read_half, write_half) = stream.into_split();
        let mut reader = FrameReader::new(read_half, MAX_FRAME_BYTES);
        let sender = spawn_writer(write_half, MAX_QUEUE_BYTES);
        let received = received.clone();
        monoio::spawn(async move {
            while let Ok(Some(payload)) = reader.next_frame().await {
                let frame: PeerFrame = decode_message(payload.clone()).expect("PeerFrame");
                match frame.msg {
                    Some(Msg::Raft(_)) => {
                        received.set(received.get() + 1);
                        if echo {
                            send_all(&sender, raft_frame()).await;
                        }
                    }
                    _ => send_all(&sender, marker_frame()).await,
                }
            }
        });
    }
}

/// Queues a frame, waiting for the writer to make room while the queue is
/// full.
async fn send_all(sender: &FrameSender, frame: Bytes) {
    loop {
        match sender.send(frame.clone()) {
            Ok(()) => return,
            Err(SendError::Full { .. }) => sender.wait_for_room(frame.len()).await.expect("room"),
            Err(error) => panic!("send failed: {error}"),
        }
    }
}

struct Client {
    sender: FrameSender,
    reader: FrameReader<TcpOwnedReadHalf>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let stream = connect(addr, &SocketOptions::default())
            .await
            .expect("connect");
        let (read_half, write_half) = stream.into_split();
        Client {
            sender: spawn_writer(write_half, MAX_QUEUE_BYTES),
            reader: FrameReader::new(read_half, MAX_FRAME_BYTES),
        }
    }

    async fn ping_pong(&mut self, round_trips: u64) -> Duration {
        let frame = raft_frame();
        let start = Instant::now();
        for _ in 0..round_trips {
            send_all(&self.sender, frame.clone()).await;
            self.reader.next_frame().await.expect("read").expect("echo");
        }
        start.elapsed()
    }

    async fn one_way(&mut self, frames: u64) -> Duration {
        let frame = raft_frame();
        let start = Instant::now();
        // Frames pile up until the queue is full; the writer then drains
        // them in vectored writes of up to 1024 frames.
        for _ in 0..frames {
            send_all(&self.sender, frame.clone()).await;
        }
        send_all(&self.sender, marker_frame()).await;
        self.reader
            .next_frame()
            .await
            .expect("read")
            .expect("marker answer");
        start.elapsed()
    }
}

/// Runs `bench` with a client connected to a fresh server, on io_uring when
/// the kernel allows it, else epoll.
fn with_client(
    c: &mut Criterion,
    echo: bool,
    bench: impl Fn(&mut Criterion, &mut dyn FnMut(u64) -> Duration),
) {
    let received = Rc::new(Cell::new(0));
    macro_rules! run_on {
        ($rt:expr) => {{
            let mut rt = $rt;
            let mut client = rt.block_on(async {
                let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
                let addr = listener.local_addr().expect("addr");
                monoio::spawn(serve(listener, echo, received.clone()));
                Client::connect(addr).await
            });
            bench(c, &mut |iters| {
                rt.block_on(async {
                    if echo {
                        client.ping_pong(iters).await
                    } else {
                        client.one_way(iters).await
                    }
                })
            });
        }};
    }
    if monoio::utils::detect_uring() {
        eprintln!("driver: io_uring");
        let rt: Runtime = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
            .expect("io_uring runtime");
        run_on!(rt);
    } else {
        eprintln!("driver: epoll (io_uring unavailable)");
        let rt: LegacyRuntime = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("epoll runtime");
        run_on!(rt);
    }
}

fn transport(c: &mut Criterion) {
    with_client(c, true, |c, run| {
        let mut group = c.benchmark_group("transport");
        group.measurement_time(Duration::from_secs(5));
        group.throughput(Throughput::Elements(1));
        group.bench_function("ping_pong_64B", |b| b.iter_custom(&mut *run));
        group.finish();
    });
    with_client(c, false, |c, run| {
        let mut group = c.benchmark_group("transport");
        group.measurement_time(Duration::from_secs(5));
        group.throughput(Throughput::Elements(1));
        group.bench_function("one_way_pipelined_64B", |b| b.iter_custom(&mut *run));
        group.finish();
    });
}

criterion_group!(benches, transport);
criterion_main!(benches);
