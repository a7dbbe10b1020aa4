//! An outbound peer link: one TCP connection to one peer's shard, kept up by
//! its own task.
//!
//! ```text
//!        start
//!          |
//!          v
//!   +-> connect + Hello --HelloReject--> Rejected event, backoff --+
//!   |      |   \--error----------------> Down event (once), backoff -+
//!   |      | HelloAck                                                |
//!   |      v                                                         |
//!   |     Up event; frames flow                                      |
//!   |      | EOF / error / write failure                             |
//!   |      v                                                         |
//!   |     Down event, backoff                                        |
//!   +------------------------------------------------------------<---+
//! ```
//!
//! Backoff is capped exponential with jitter: `backoff_initial` after a drop
//! (so a restarted peer is found fast), doubling per consecutive failure up
//! to `backoff_max`, each delay drawn uniformly from `[delay/2, delay]` so
//! that every node of a cluster does not redial a restarted peer in lockstep.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use corekv_proto::peer::Hello;
use monoio::io::AsyncReadRent;
use rand::Rng;

use crate::frame::{DEFAULT_MAX_FRAME_BYTES, FRAME_HEADER_LEN};
use crate::handshake::{connect_peer, HandshakeError, PeerTls};
use crate::socket::SocketOptions;
use crate::tls::ReadHalf;
use crate::wake::{race, wait_until, Either, WakeSlot};
use crate::writer::{spawn_writer, FrameSender, SendError};

/// A state change of a [`PeerLink`], reported to its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// The handshake completed; frames sent from now on are delivered.
    Up,
    /// The link is not connected: an established connection was lost, or
    /// the first attempt after start or after a loss failed. Reported once
    /// per outage, not once per failed retry.
    Down {
        /// What happened, for people: "connection refused by 10.0.0.2:7000".
        reason: String,
    },
    /// The peer refused our Hello (wrong cluster, shard...). Reported on
    /// every attempt, since it will not fix itself without an operator.
    Rejected {
        /// The peer's reason, with the values that disagree.
        reason: String,
        /// The peer says we were removed from the shard's group.
        removed: bool,
    },
}

/// Everything a [`PeerLink`] needs to know.
#[derive(Clone, Debug)]
pub struct PeerLinkConfig {
    /// The peer's address for this shard (`peer_port + shard`).
    pub addr: SocketAddr,
    /// The Hello this link opens every connection with.
    pub hello: Hello,
    /// Socket options of the connection.
    pub socket: SocketOptions,
    /// Most bytes queued on the link before sends fail with `Full`.
    pub max_queue_bytes: usize,
    /// Largest frame payload the link sends or reads (the peer enforces its
    /// own limit; keep them equal).
    pub max_frame_bytes: usize,
    /// TLS for every connection, when the cluster runs it.
    pub tls: Option<PeerTls>,
    /// First reconnect delay after a connection is lost.
    pub backoff_initial: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
}

impl PeerLinkConfig {
    /// A config with the default socket options, a 64 MiB send queue, the
    /// default frame limit and 10 ms .. 1 s backoff.
    pub fn new(addr: SocketAddr, hello: Hello) -> Self {
        Self {
            addr,
            hello,
            socket: SocketOptions::default(),
            max_queue_bytes: 64 << 20,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            tls: None,
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_secs(1),
        }
    }
}

/// State shared by the link's handles and its task.
struct LinkShared {
    config: PeerLinkConfig,
    up: Cell<bool>,
    dropped_frames: Cell<u64>,
    reconnects: Cell<u64>,
    shutdown: Cell<bool>,
    /// The link task waits here for `shutdown`.
    wake: WakeSlot,
    /// The current connection's sender, while up.
    sender: RefCell<Option<FrameSender>>,
}

impl LinkShared {
    fn shutdown(&self) {
        self.shutdown.set(true);
        self.wake.wake();
    }

    fn count_dropped(&self, frames: u64) {
        self.dropped_frames.set(self.dropped_frames.get() + frames);
    }
}

/// Shuts the link down when the last [`PeerLink`] clone goes away, so the
/// task does not redial a peer nobody sends to.
struct LinkHandle {
    shared: Rc<LinkShared>,
}

impl Drop for LinkHandle {
    fn drop(&mut self) {
        self.shared.shutdown();
    }
}

/// An outbound link to one peer: connects, handshakes, reconnects, and
/// writes queued frames in order, batched per event-loop turn. Cheap to
/// clone; single-threaded (`!Send`). Dropping the last clone shuts it down.
#[derive(Clone)]
pub struct PeerLink {
    handle: Rc<LinkHandle>,
}

impl PeerLink {
    /// Spawns the link's task on the current monoio runtime; it connects at
    /// once. `on_event` runs on this thread, from the link's task, for each
    /// state change; it may call back into the link (send, shutdown).
    pub fn start(config: PeerLinkConfig, on_event: Rc<dyn Fn(LinkEvent)>) -> PeerLink {
        let shared = Rc::new(LinkShared {
            config,
            up: Cell::new(false),
            dropped_frames: Cell::new(0),
            reconnects: Cell::new(0),
            shutdown: Cell::new(false),
            wake: WakeSlot::default(),
            sender: RefCell::new(None),
        });
        monoio::spawn(run_link(shared.clone(), on_event));
        PeerLink {
            handle: Rc::new(LinkHandle { shared }),
        }
    }

    /// Queues an encoded frame (header included). Frames queued during one
    /// event-loop turn leave in one vectored write, in order.
    ///
    /// Errors: [`SendError::Down`] while the link is not up (the frame is
    /// dropped and counted in [`dropped_frames`](Self::dropped_frames));
    /// [`SendError::Full`] when the byte-bounded queue is full;
    /// [`SendError::TooLarge`] for a payload over `max_frame_bytes`;
    /// [`SendError::Closed`] after [`shutdown`](Self::shutdown).
    pub fn send(&self, frame: Bytes) -> Result<(), SendError> {
        let shared = &self.handle.shared;
        let payload_len = frame.len().saturating_sub(FRAME_HEADER_LEN);
        if payload_len > shared.config.max_frame_bytes {
            return Err(SendError::TooLarge {
                len: payload_len,
                max: shared.config.max_frame_bytes,
            });
        }
        if shared.shutdown.get() {
            return Err(SendError::Closed);
        }
        let result = match shared.sender.borrow().as_ref() {
            Some(sender) => sender.send(frame),
            None => Err(SendError::Down),
        };
        match result {
            // The writer stopped on an error and the task has not noticed
            // yet: to the caller that is the same as being down.
            Err(SendError::Closed | SendError::Down) => {
                shared.count_dropped(1);
                Err(SendError::Down)
            }
            other => other,
        }
    }

    /// True between `Up` and the next `Down` (or shutdown).
    pub fn is_up(&self) -> bool {
        self.handle.shared.up.get()
    }

    /// Frames refused with `Down`, plus frames still queued when a connection
    /// was lost.
    pub fn dropped_frames(&self) -> u64 {
        self.handle.shared.dropped_frames.get()
    }

    /// Connection attempts after the first one (the
    /// `transport_reconnects_total` metric).
    pub fn reconnects(&self) -> u64 {
        self.handle.shared.reconnects.get()
    }

    /// Bytes queued on the current connection (0 while down).
    pub fn queued_bytes(&self) -> usize {
        self.handle
            .shared
            .sender
            .borrow()
            .as_ref()
            .map_or(0, FrameSender::queued_bytes)
    }

    /// The peer address this link dials.
    pub fn addr(&self) -> SocketAddr {
        self.handle.shared.config.addr
    }

    /// Stops the task and closes the socket; queued frames are discarded and
    /// no further event is reported.
    pub fn shutdown(&self) {
        self.handle.shared.shutdown();
    }
}

/// The link's task: connect, run, back off, repeat until shutdown.
async fn run_link(shared: Rc<LinkShared>, on_event: Rc<dyn Fn(LinkEvent)>) {
    let config = &shared.config;
    let addr = config.addr;
    let (node_id, shard) = (config.hello.node_id, config.hello.shard);
    // Consecutive failed attempts since the last success; drives the backoff.
    let mut failures: u32 = 0;
    // Whether the owner has been told about the current outage.
    let mut outage_reported = false;
    let mut first_attempt = true;
    while !shared.shutdown.get() {
        if !first_attempt {
            shared.reconnects.set(shared.reconnects.get() + 1);
        }
        first_attempt = false;
        let dial = connect_peer(
            addr,
            &config.hello,
            &config.socket,
            config.max_frame_bytes,
            config.tls.as_ref(),
        );
        let attempt = match race(dial, wait_for_shutdown(&shared)).await {
            Either::Left(attempt) => attempt,
            Either::Right(()) => break,
        };
        match attempt {
            Ok((ack, reader, write_half)) => {
                failures = 0;
                let sender = spawn_writer(write_half, config.max_queue_bytes);
                *shared.sender.borrow_mut() = Some(sender.clone());
                shared.up.set(true);
                tracing::info!(%addr, node_id, shard, peer_node_id = ack.node_id, "peer link up");
                on_event(LinkEvent::Up);
                let lost = watch_connection(&shared, reader.into_inner(), &sender).await;
                take_down(&shared);
                let Some(reason) = lost else { break };
                tracing::warn!(%addr, node_id, shard, %reason, "connection lost");
                outage_reported = true;
                on_event(LinkEvent::Down { reason });
            }
            Err(HandshakeError::Rejected {
                reason, removed, ..
            }) => {
                failures = failures.saturating_add(1);
                tracing::warn!(%addr, node_id, shard, cluster_id = config.hello.cluster_id, %reason,
                    "peer rejected our handshake");
                on_event(LinkEvent::Rejected { reason, removed });
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                let reason = error.to_string();
                if outage_reported {
                    tracing::debug!(%addr, node_id, shard, failures, %reason, "reconnect failed");
                } else {
                    tracing::warn!(%addr, node_id, shard, %reason, "peer unreachable");
                    outage_reported = true;
                    on_event(LinkEvent::Down { reason });
                }
            }
        }
        let delay = backoff_delay(failures, config.backoff_initial, config.backoff_max);
        if let Either::Right(()) =
            race(monoio::time::sleep(delay), wait_for_shutdown(&shared)).await
        {
            break;
        }
    }
    take_down(&shared);
}

async fn wait_for_shutdown(shared: &LinkShared) {
    wait_until([&shared.wake], || shared.shutdown.get()).await
}

/// Marks the link down and stops the current connection's writer, counting
/// the frames it still held as dropped.
fn take_down(shared: &LinkShared) {
    shared.up.set(false);
    let sender = shared.sender.borrow_mut().take();
    if let Some(sender) = sender {
        let discarded = sender.queue().abort();
        shared.count_dropped(discarded as u64);
    }
}

/// Waits until the connection fails (EOF or error on the read side, or a
/// failed write) or the link is shut down. Returns why it failed, or `None`
/// on shutdown.
async fn watch_connection(
    shared: &LinkShared,
    read_half: ReadHalf,
    sender: &FrameSender,
) -> Option<String> {
    let addr = shared.config.addr;
    let queue = sender.queue();
    let stopped = wait_until([&shared.wake, queue.finish_wake()], || {
        shared.shutdown.get() || queue.is_finished()
    });
    match race(read_until_closed(read_half), stopped).await {
        Either::Left(error) => Some(describe_lost(addr, error)),
        Either::Right(()) if shared.shutdown.get() => None,
        Either::Right(()) => Some(match queue.take_failure() {
            Some(error) => describe_lost(addr, Some(error)),
            None => format!("writer to {addr} stopped"),
        }),
    }
}

/// Reads (and discards) whatever the peer sends until EOF or an error: the
/// listener side of a link has nothing to say after the handshake, so reading
/// is only how a closed or reset connection is noticed promptly. Returns the
/// error, or `None` for a clean EOF.
async fn read_until_closed(mut read_half: ReadHalf) -> Option<std::io::Error> {
    let mut buf = vec![0u8; 4096];
    loop {
        let (result, returned) = read_half.read(buf).await;
        buf = returned;
        match result {
            Ok(0) => return None,
            Ok(_) => buf.clear(),
            Err(error) => return Some(error),
        }
    }
}

/// Words a lost connection for the owner and the log.
fn describe_lost(addr: SocketAddr, error: Option<std::io::Error>) -> String {
    use std::io::ErrorKind;
    let Some(error) = error else {
        return format!("connection closed by peer {addr}");
    };
    match error.kind() {
        ErrorKind::ConnectionReset => format!("connection reset by peer {addr}"),
        // ETIMEDOUT on an established socket: keepalive probes or
        // TCP_USER_TIMEOUT expired without an answer.
        ErrorKind::TimedOut => format!("keepalive timeout: peer {addr} stopped answering"),
        ErrorKind::BrokenPipe => format!("broken pipe: peer {addr} closed the connection"),
        _ => format!("connection to {addr} failed: {error}"),
    }
}

/// Delay before the next attempt after `failures` consecutive failures (0 =
/// the connection was just lost): `initial * 2^failures` capped at `max`,
/// then drawn uniformly from `[delay/2, delay]`.
fn backoff_delay(failures: u32, initial: Duration, max: Duration) -> Duration {
    let factor = 1u32.checked_shl(failures.min(31)).unwrap_or(u32::MAX);
    let delay = initial.saturating_mul(factor).min(max);
    let low = delay / 2;
    if delay <= low {
        return delay;
    }
    rand::thread_rng().gen_range(low..=delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_initial_and_caps_with_jitter() {
        let initial = Duration::from_millis(10);
        let max = Duration::from_secs(1);
        for _ in 0..100 {
            let first = backoff_delay(0, initial, max);
            assert!(
                first >= Duration::from_millis(5) && first <= initial,
                "{first:?}"
            );
            let third = backoff_delay(3, initial, max);
            assert!(third >= Duration::from_millis(40) && third <= Duration::from_millis(80));
            let late = backoff_delay(40, initial, max);
            assert!(late >= max / 2 && late <= max, "{late:?}");
        }
    }

    #[test]
    fn lost_connections_are_worded_for_operators() {
        let addr: SocketAddr = "10.0.0.2:7000".parse().unwrap();
        assert_eq!(
            describe_lost(addr, None),
            "connection closed by peer 10.0.0.2:7000"
        );
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(
            describe_lost(addr, Some(reset)),
            "connection reset by peer 10.0.0.2:7000"
        );
        let timeout = std::io::Error::from(std::io::ErrorKind::TimedOut);
        assert!(describe_lost(addr, Some(timeout)).starts_with("keepalive timeout"));
    }
}
