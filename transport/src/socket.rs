//! Socket options every corekv TCP connection gets, on both ends.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

/// TCP settings of one connection. The defaults are the ones DESIGN.md
/// names; the node's config overrides them.
#[derive(Clone, Debug)]
pub struct SocketOptions {
    /// `TCP_NODELAY`: send small frames (votes, heartbeats) at once instead of
    /// waiting for Nagle's algorithm to coalesce them.
    pub nodelay: bool,
    /// `TCP_KEEPIDLE`: idle time before the first keepalive probe, so an idle
    /// link to a dead host is noticed and a NAT or firewall keeps its state.
    pub keepalive_idle: Duration,
    /// `TCP_KEEPINTVL`: time between unanswered probes.
    pub keepalive_interval: Duration,
    /// `TCP_KEEPCNT`: unanswered probes before the kernel drops the connection.
    pub keepalive_count: u32,
    /// Longest a connect may take before it counts as failed.
    pub connect_timeout: Duration,
}

impl Default for SocketOptions {
    fn default() -> Self {
        Self {
            nodelay: true,
            keepalive_idle: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(5),
            keepalive_count: 3,
            connect_timeout: Duration::from_secs(3),
        }
    }
}

impl SocketOptions {
    /// How long the kernel lets written data stay unacknowledged before it
    /// drops the connection (`TCP_USER_TIMEOUT`). Keepalive probes only run on
    /// an idle connection; a peer that vanishes while we have data in flight
    /// would otherwise be noticed only after ~15 minutes of retransmissions.
    /// Matching the keepalive budget makes both cases fail in the same time.
    pub fn user_timeout(&self) -> Duration {
        self.keepalive_idle + self.keepalive_interval * self.keepalive_count
    }
}

/// Applies `opts` to a connected stream: `TCP_NODELAY`, `SO_KEEPALIVE` with
/// `TCP_KEEPIDLE` / `TCP_KEEPINTVL` / `TCP_KEEPCNT`, and `TCP_USER_TIMEOUT`
/// (see [`SocketOptions::user_timeout`]).
pub fn configure_stream(
    stream: &monoio::net::TcpStream,
    opts: &SocketOptions,
) -> std::io::Result<()> {
    configure_fd(stream.as_raw_fd(), opts)
}

/// [`configure_stream`] on a raw descriptor, for the halves of a split stream.
pub(crate) fn configure_fd(fd: RawFd, opts: &SocketOptions) -> std::io::Result<()> {
    // SAFETY: callers pass the descriptor of a stream they hold, which stays
    // open for the duration of this call; SockRef never closes it.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let socket = SockRef::from(&fd);
    socket.set_nodelay(opts.nodelay)?;
    let keepalive = TcpKeepalive::new()
        .with_time(opts.keepalive_idle)
        .with_interval(opts.keepalive_interval)
        .with_retries(opts.keepalive_count);
    socket.set_tcp_keepalive(&keepalive)?;
    socket.set_tcp_user_timeout(Some(opts.user_timeout()))?;
    Ok(())
}

/// Connects to `addr`, giving up after `opts.connect_timeout`, and configures
/// the stream. A timeout is reported as `ErrorKind::TimedOut` with the address
/// and the limit in the message.
pub async fn connect(
    addr: SocketAddr,
    opts: &SocketOptions,
) -> std::io::Result<monoio::net::TcpStream> {
    let stream = match monoio::time::timeout(
        opts.connect_timeout,
        monoio::net::TcpStream::connect_addr(addr),
    )
    .await
    {
        Ok(result) => result?,
        Err(_elapsed) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "connect to {addr} timed out after {:?}",
                    opts.connect_timeout
                ),
            ))
        }
    };
    configure_stream(&stream, opts)?;
    Ok(stream)
}
