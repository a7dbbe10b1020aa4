//! corekv-client: the Rust client library of corekv (async, monoio,
//! single-threaded).
//!
//! Owns routing, pipelining and retries for one application thread. It is
//! shard-aware: it fetches the topology, sends each key to
//! `client_port + shard(key)` on the shard's leader, pipelines any number of
//! requests per connection, follows NOT_LEADER hints, retries NOT_LEADER and
//! UNAVAILABLE within its deadline, sends a read that got no answer within a
//! quarter of the deadline to another node, and fans scans out to every
//! shard.
//! It depends only on the wire contract (corekv-proto) and the transport;
//! it never links Raft, the WAL or the server.
//!
//! # Example
//!
//! ```no_run
//! use bytes::Bytes;
//! use corekv_client::{block_on, Client, ClientError, ClientOptions, Consistency, ErrorCode};
//!
//! block_on(async {
//!     let client = Client::connect(ClientOptions {
//!         endpoints: vec!["127.0.0.1:7100".into()],
//!         ..ClientOptions::default()
//!     })
//!     .await?;
//!
//!     // A write answers with the key's new version (the Raft index that wrote it).
//!     let version = client.put(Bytes::from("user/1"), Bytes::from("ada")).await?;
//!
//!     // Linearizable by default; `Consistency::Stale` reads any replica.
//!     if let Some((value, at)) = client.get(Bytes::from("user/1"), Consistency::Linearizable).await? {
//!         println!("{value:?} at version {at}");
//!     }
//!
//!     // Compare-and-swap: write only if the key is still at `version`.
//!     match client.cas(Bytes::from("user/1"), version, Bytes::from("grace")).await {
//!         Ok(new_version) => println!("swapped, now at {new_version}"),
//!         Err(ClientError::Server { code: ErrorCode::VersionMismatch, current_version, .. }) => {
//!             println!("someone else wrote it first (now at {current_version})")
//!         }
//!         Err(other) => return Err(other),
//!     }
//!
//!     // Keys in order, `[start, end)`, across every shard; `more` says the limit cut it.
//!     let page = client
//!         .scan(Bytes::from("user/"), Bytes::from("user0"), 100, Consistency::Linearizable)
//!         .await?;
//!     for pair in &page.pairs {
//!         println!("{:?} = {:?}", pair.key, pair.value);
//!     }
//!
//!     // Writes are exactly-once: retries inside the deadline never apply twice.
//!     // One whose outcome is not known by the deadline may have applied: read to find out.
//!     if let Err(e @ ClientError::OutcomeUnknown { .. }) = client.delete(Bytes::from("user/1"), None).await {
//!         eprintln!("unknown outcome: {e}");
//!     }
//!     Ok::<(), ClientError>(())
//! })
//! .expect("corekv request failed");
//! ```

mod answer;

use std::cell::{Cell, RefCell};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use corekv_proto::client::{
    request::Op, response, CompareAndSwap, Delete, Get, Put, Request, Response, Scan, Status,
    Topology, TopologyResult,
};
use corekv_transport::rustls::ClientConfig;
use corekv_transport::{
    client_config, connect, decode_message, encode_frame_bytes, plain, server_name, spawn_writer,
    tls_connect, FrameReader, FrameSender, IdentityFiles, SocketOptions, TlsConfigError,
    DEFAULT_MAX_FRAME_BYTES,
};
use foldhash::{HashMap, HashMapExt};

pub use corekv_proto::client::{Consistency, ErrorCode, KeyValue, ScanResult, StatusResult};

/// The shortest time one attempt of a read or a session write waits for its
/// answer (see `Client::attempt_timeout`), so that even a short request
/// timeout leaves a slow answer its chance.
pub const MIN_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(250);

/// How often a connection with requests in flight looks for those past
/// their deadline: a request times out at most this much late. One timer
/// per connection instead of one per request: monoio's timer future is
/// 640 bytes (cache-line padded), which made every request's future
/// several KiB, and registered a wheel entry per request.
const TIMEOUT_SWEEP: Duration = Duration::from_millis(25);

/// Runs `future` to completion on a new monoio runtime on this thread: the
/// way a synchronous program (a CLI, a test) uses the async client.
///
/// # Panics
///
/// Panics if the runtime cannot be built (no io_uring and no epoll).
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    let mut runtime = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .uring_builder(corekv_transport::uring_builder())
        .enable_timer()
        .build()
        .expect("cannot build a monoio runtime");
    runtime.block_on(future)
}

/// How a client behaves.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Nodes to ask for the topology, `host:port` of a client port.
    pub endpoints: Vec<String>,
    /// Total time one call may take, retries included.
    pub request_timeout: Duration,
    /// Socket settings (connect timeout, keepalive).
    pub socket: SocketOptions,
    /// Largest response frame accepted.
    pub max_frame_bytes: usize,
    /// Exactly-once writes: open a session on each shard written to and
    /// number the writes, so a retried write is never applied twice.
    /// Costs one Raft write per shard at the first write there.
    pub exactly_once: bool,
    /// TLS to every node, when the cluster runs it.
    pub tls: Option<ClientTls>,
    /// Which replica of a shard serves gets and scans.
    pub read_from: ReadFrom,
}

/// Which replica of a shard serves a read. Writes always go to the leader.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReadFrom {
    /// The shard's leader: every read costs the leader.
    #[default]
    Leader,
    /// The shard's followers in turn (the leader when it has none), so read
    /// capacity grows with the nodes. A linearizable read still asks the
    /// leader for its commit index (Raft ReadIndex, one small message) and
    /// is served by the follower once it has applied that far; a stale
    /// read may be as old as that follower's state.
    Follower,
    /// The node of the first of `endpoints` that is a member, whatever its
    /// role (list the closest node first); the others in turn while it
    /// fails.
    Nearest,
}

impl std::str::FromStr for ReadFrom {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "leader" => Ok(ReadFrom::Leader),
            "follower" => Ok(ReadFrom::Follower),
            "nearest" => Ok(ReadFrom::Nearest),
            other => Err(format!(
                "unknown read-from `{other}`: use leader, follower or nearest"
            )),
        }
    }
}

/// TLS for a client: the CA that signs the nodes' certificates, and this
/// client's certificate for a cluster with `client_auth = cert`. A node is
/// verified by the host name (or IP address) the client dialed, so its
/// certificate must name it.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
}

impl ClientTls {
    /// Reads the CA and, when both are given, the client certificate and
    /// its key, from PEM files.
    pub fn from_files(
        ca_file: &Path,
        identity: Option<(&Path, &Path)>,
    ) -> Result<ClientTls, TlsConfigError> {
        let identity = identity.map(|(cert, key)| IdentityFiles {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        });
        Ok(ClientTls {
            config: client_config(ca_file, identity.as_ref())?,
        })
    }

    /// The rustls config, for other connections of the same client (the
    /// admin port's HTTPS).
    pub fn rustls_config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            endpoints: vec!["127.0.0.1:7100".to_string()],
            request_timeout: Duration::from_secs(10),
            socket: SocketOptions::default(),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            exactly_once: true,
            tls: None,
            read_from: ReadFrom::Leader,
        }
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error that retrying would not fix.
    #[error("{code:?}: {message}")]
    Server {
        /// The error code.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
        /// With VERSION_MISMATCH: the key's current version.
        current_version: u64,
    },
    /// The deadline passed; the last attempt's problem is given. A write may
    /// or may not have been applied.
    #[error("gave up after {elapsed:?}: {last}")]
    Timeout {
        /// Time spent.
        elapsed: Duration,
        /// What the last attempt saw.
        last: String,
    },
    /// No endpoint could be reached for the topology.
    #[error("no endpoint reachable: {0}")]
    NoEndpoint(String),
    /// A write's deadline passed, or its session was lost, before its
    /// outcome was known: it may or may not have been applied (once at
    /// most: retries within the deadline never apply it twice). Read the
    /// key to find out.
    #[error("OUTCOME_UNKNOWN after {elapsed:?}: {last}")]
    OutcomeUnknown {
        /// Time spent.
        elapsed: Duration,
        /// What the last attempt saw.
        last: String,
    },
}

impl ClientError {
    /// The server error code, if the server answered.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A request waiting for its answer.
struct Waiter {
    tx: answer::Sender<Response>,
    /// Past it, the sweeper drops `tx`: the caller sees a timeout.
    deadline: Instant,
}

/// One pipelined connection.
struct Conn {
    sender: FrameSender,
    state: Rc<ConnState>,
}

/// What a connection's caller, reader and sweeper share.
#[derive(Default)]
struct ConnState {
    pending: RefCell<HashMap<u64, Waiter>>,
    closed: Cell<bool>,
    /// Why the connection ended, when the reader saw an error.
    why_closed: RefCell<Option<String>>,
    /// The sweeper's waker while it waits for a first request.
    sweeper: Cell<Option<Waker>>,
}

impl ConnState {
    fn wake_sweeper(&self) {
        if let Some(sweeper) = self.sweeper.take() {
            sweeper.wake();
        }
    }
}

/// A shard-aware corekv client. Cheap to clone; not Send (one per thread).
#[derive(Clone)]
pub struct Client {
    inner: Rc<Inner>,
}

struct Inner {
    options: ClientOptions,
    topology: RefCell<TopologyResult>,
    conns: RefCell<HashMap<SocketAddr, Rc<Conn>>>,
    /// Client address of each (node, shard), resolved on first use.
    addrs: RefCell<HashMap<(u64, u32), SocketAddr>>,
    /// The host name each resolved address came from: TLS verifies a
    /// node by the name the client dialed, not by its IP address.
    hosts: RefCell<HashMap<SocketAddr, String>>,
    next_id: Cell<u64>,
    round_robin: Cell<usize>,
    /// Node ids in the order `ReadFrom::Nearest` tries them, worked out once
    /// per topology.
    nearest: RefCell<Option<Vec<u64>>>,
    /// This client's exactly-once session on each shard it wrote to.
    sessions: RefCell<HashMap<u32, ShardSession>>,
}

/// A session on one shard: its id, the next write's number, and the numbers
/// of writes whose answer has not arrived.
struct ShardSession {
    id: u64,
    next_sequence: u64,
    unanswered: std::collections::BTreeSet<u64>,
}

/// The session fields of one request (all 0 = no session).
#[derive(Clone, Copy, Debug, Default)]
struct WriteTag {
    session_id: u64,
    sequence: u64,
    acked_below: u64,
}

/// What a retry loop should do after one attempt.
enum Attempt {
    Done(response::Result),
    Retry(String),
}

impl Client {
    /// Connects to the first reachable endpoint and fetches the topology.
    pub async fn connect(options: ClientOptions) -> Result<Client, ClientError> {
        let client = Client {
            inner: Rc::new(Inner {
                options,
                topology: RefCell::new(TopologyResult::default()),
                conns: RefCell::new(HashMap::new()),
                addrs: RefCell::new(HashMap::new()),
                hosts: RefCell::new(HashMap::new()),
                next_id: Cell::new(1),
                round_robin: Cell::new(0),
                nearest: RefCell::new(None),
                sessions: RefCell::new(HashMap::new()),
            }),
        };
        client.refresh_topology().await?;
        Ok(client)
    }

    /// The topology as last fetched.
    pub fn topology(&self) -> TopologyResult {
        self.inner.topology.borrow().clone()
    }

    /// Re-reads the topology from the endpoints (then from any known node).
    pub async fn refresh_topology(&self) -> Result<TopologyResult, ClientError> {
        let mut candidates: Vec<String> = self.inner.options.endpoints.clone();
        for node in &self.inner.topology.borrow().nodes {
            candidates.push(format!("{}:{}", node.host, node.client_port));
        }
        let mut last = String::from("no endpoints given");
        for endpoint in candidates {
            let addr = match self.resolve(&endpoint) {
                Ok(addr) => addr,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            match self
                .call_at(
                    addr,
                    Op::Topology(Topology {}),
                    false,
                    WriteTag::default(),
                    (
                        Instant::now() + self.attempt_timeout(),
                        self.attempt_timeout(),
                    ),
                )
                .await
            {
                Ok(response::Result::Topology(topology)) => {
                    *self.inner.topology.borrow_mut() = topology.clone();
                    self.inner.addrs.borrow_mut().clear();
                    *self.inner.nearest.borrow_mut() = None;
                    return Ok(topology);
                }
                Ok(other) => last = format!("{endpoint}: unexpected answer {other:?}"),
                // An attempt's error already names the address it tried;
                // the endpoint is added only when it says more (a name).
                Err(e) => {
                    let e = e.to_string();
                    last = if e.starts_with(&format!("{endpoint}: ")) {
                        e
                    } else {
                        format!("{endpoint}: {e}")
                    };
                }
            }
        }
        Err(ClientError::NoEndpoint(last))
    }

    /// Writes `value` at `key`; returns the new version.
    pub async fn put(&self, key: Bytes, value: Bytes) -> Result<u64, ClientError> {
        match self.write(key.clone(), Op::Put(Put { key, value })).await? {
            response::Result::Write(w) => Ok(w.version),
            other => Err(unexpected(other)),
        }
    }

    /// Reads `key`: `Some((value, version))` or `None` when absent.
    pub async fn get(
        &self,
        key: Bytes,
        consistency: Consistency,
    ) -> Result<Option<(Bytes, u64)>, ClientError> {
        let op = Op::Get(Get {
            key: key.clone(),
            consistency: consistency as i32,
            local: self.inner.options.read_from != ReadFrom::Leader,
        });
        let shard = self.shard_of(&key);
        match self.routed_read(shard, op).await? {
            response::Result::Get(g) if g.found => Ok(Some((g.value, g.version))),
            response::Result::Get(_) => Ok(None),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes `key` (only at `expected_version` when given); true if it existed.
    pub async fn delete(
        &self,
        key: Bytes,
        expected_version: Option<u64>,
    ) -> Result<bool, ClientError> {
        let op = Op::Delete(Delete {
            key: key.clone(),
            expected_version,
        });
        match self.write(key, op).await? {
            response::Result::Delete(d) => Ok(d.deleted),
            other => Err(unexpected(other)),
        }
    }

    /// Writes `value` if the key's version is `expected_version` (0 = absent).
    pub async fn cas(
        &self,
        key: Bytes,
        expected_version: u64,
        value: Bytes,
    ) -> Result<u64, ClientError> {
        let op = Op::Cas(CompareAndSwap {
            key: key.clone(),
            expected_version,
            value,
        });
        match self.write(key, op).await? {
            response::Result::Write(w) => Ok(w.version),
            other => Err(unexpected(other)),
        }
    }

    /// Pairs in `[start, end)` from every shard, merged in key order.
    pub async fn scan(
        &self,
        start: Bytes,
        end: Bytes,
        limit: u32,
        consistency: Consistency,
    ) -> Result<ScanResult, ClientError> {
        let shards = self.inner.topology.borrow().shards.max(1);
        let mut pairs: Vec<KeyValue> = Vec::new();
        let mut more = false;
        for shard in 0..shards {
            let op = Op::Scan(Scan {
                start: start.clone(),
                end: end.clone(),
                limit,
                consistency: consistency as i32,
                shard: Some(shard),
                local: self.inner.options.read_from != ReadFrom::Leader,
            });
            match self.routed_read(shard, op).await? {
                response::Result::Scan(result) => {
                    more |= result.more;
                    pairs.extend(result.pairs);
                }
                other => return Err(unexpected(other)),
            }
        }
        pairs.sort_by(|a, b| a.key.cmp(&b.key));
        let limit = corekv_proto::scan_limit(limit);
        if pairs.len() > limit {
            pairs.truncate(limit);
            more = true;
        }
        Ok(ScanResult { pairs, more })
    }

    /// Asks the leader of `shard` to hand leadership to node `to`; returns
    /// once the transfer has started.
    pub async fn transfer_leader(&self, shard: u32, to: u64) -> Result<(), ClientError> {
        let op = Op::TransferLeader(corekv_proto::client::TransferLeader { shard, to });
        match self.routed(shard, op).await? {
            response::Result::TransferLeader(_) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Changes the members of `shard` (see client.proto ChangeMembership);
    /// follows the shard's leader and retries while a change is in
    /// progress or leadership moves, until the request timeout.
    pub async fn change_membership(
        &self,
        change: corekv_proto::client::ChangeMembership,
    ) -> Result<corekv_proto::client::MembershipResult, ClientError> {
        let shard = change.shard;
        match self.routed(shard, Op::ChangeMembership(change)).await? {
            response::Result::Membership(result) => Ok(result),
            other => Err(unexpected(other)),
        }
    }

    /// Status of the node at `addr` (a client port).
    pub async fn status_at(&self, addr: SocketAddr) -> Result<StatusResult, ClientError> {
        let answer = self
            .call_at(
                addr,
                Op::Status(Status {}),
                false,
                WriteTag::default(),
                (
                    Instant::now() + self.inner.options.request_timeout,
                    self.inner.options.request_timeout,
                ),
            )
            .await;
        match answer.map_err(ClientError::NoEndpoint)? {
            response::Result::Status(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// Client address of shard 0 of every node in the topology.
    pub fn node_addrs(&self) -> Vec<(u64, String)> {
        self.inner
            .topology
            .borrow()
            .nodes
            .iter()
            .map(|n| (n.node_id, format!("{}:{}", n.host, n.client_port)))
            .collect()
    }

    fn shard_of(&self, key: &[u8]) -> u32 {
        let shards = self.inner.topology.borrow().shards.max(1);
        corekv_proto::shard_of(key, shards)
    }

    /// A write: in the shard's session when exactly-once is on, so every
    /// retry carries the same number and is applied at most once; a write
    /// whose outcome is not known by the deadline is OUTCOME_UNKNOWN.
    // Not `async fn`: that stores every argument twice in the future
    // (rust-lang/rust#62958), and this future is part of every request's
    // (see `request_futures_stay_small` in tests/client.rs). Same below.
    #[allow(clippy::manual_async_fn)]
    fn write(
        &self,
        key: Bytes,
        op: Op,
    ) -> impl std::future::Future<Output = Result<response::Result, ClientError>> + '_ {
        async move {
            let shard = self.shard_of(&key);
            let started = Instant::now();
            let tag = if self.inner.options.exactly_once {
                self.next_write_tag(shard).await?
            } else {
                WriteTag::default()
            };
            let result = self.routed_tagged(shard, op, tag, started).await;
            if tag.session_id != 0 {
                self.answered(shard, tag);
            }
            match result {
                Err(ClientError::Timeout { elapsed, last }) => {
                    Err(ClientError::OutcomeUnknown { elapsed, last })
                }
                Err(ClientError::Server {
                    code: ErrorCode::Timeout,
                    message,
                    ..
                }) => Err(ClientError::OutcomeUnknown {
                    elapsed: started.elapsed(),
                    last: message,
                }),
                Err(ClientError::Server {
                    code: ErrorCode::SessionExpired,
                    message,
                    ..
                }) => {
                    // A retry may have found the session gone after an earlier
                    // attempt was applied: the outcome is not known.
                    self.inner.sessions.borrow_mut().remove(&shard);
                    Err(ClientError::OutcomeUnknown {
                        elapsed: started.elapsed(),
                        last: message,
                    })
                }
                other => other,
            }
        }
    }

    /// The session fields for the next write to `shard`, opening the
    /// session first if this client has none there.
    async fn next_write_tag(&self, shard: u32) -> Result<WriteTag, ClientError> {
        if !self.inner.sessions.borrow().contains_key(&shard) {
            let op = Op::OpenSession(corekv_proto::client::OpenSession { shard });
            // Boxed: once per shard, and a whole retry loop inline.
            let id = match Box::pin(self.routed(shard, op)).await {
                Ok(response::Result::Session(session)) => session.session_id,
                // A node from before sessions does not know the operation
                // (during a rolling upgrade): write without a session there.
                Err(ClientError::Server {
                    code: ErrorCode::InvalidArgument,
                    ..
                }) => return Ok(WriteTag::default()),
                Ok(other) => return Err(unexpected(other)),
                Err(e) => return Err(e),
            };
            // Another task of this client may have opened one meanwhile.
            self.inner
                .sessions
                .borrow_mut()
                .entry(shard)
                .or_insert(ShardSession {
                    id,
                    next_sequence: 1,
                    unanswered: Default::default(),
                });
        }
        let mut sessions = self.inner.sessions.borrow_mut();
        let session = sessions.get_mut(&shard).expect("opened above");
        let sequence = session.next_sequence;
        session.next_sequence += 1;
        session.unanswered.insert(sequence);
        let acked_below = *session.unanswered.first().expect("holds this write");
        Ok(WriteTag {
            session_id: session.id,
            sequence,
            acked_below,
        })
    }

    /// The write `tag` has its answer, or was given up: the shard may forget
    /// its result.
    fn answered(&self, shard: u32, tag: WriteTag) {
        if let Some(session) = self.inner.sessions.borrow_mut().get_mut(&shard) {
            if session.id == tag.session_id {
                session.unanswered.remove(&tag.sequence);
            }
        }
    }

    /// Sends `op` to the leader of `shard`, following hints and retrying
    /// NOT_LEADER and UNAVAILABLE until the deadline.
    async fn routed(&self, shard: u32, op: Op) -> Result<response::Result, ClientError> {
        self.routed_tagged(shard, op, WriteTag::default(), Instant::now())
            .await
    }

    /// A get or scan of `shard`, sent where [`ClientOptions::read_from`] says.
    async fn routed_read(&self, shard: u32, op: Op) -> Result<response::Result, ClientError> {
        let read_from = self.inner.options.read_from;
        self.retried(shard, op, WriteTag::default(), Instant::now(), read_from)
            .await
    }

    fn routed_tagged(
        &self,
        shard: u32,
        op: Op,
        tag: WriteTag,
        started: Instant,
    ) -> impl std::future::Future<Output = Result<response::Result, ClientError>> + '_ {
        self.retried(shard, op, tag, started, ReadFrom::Leader)
    }

    #[allow(clippy::manual_async_fn)]
    fn retried(
        &self,
        shard: u32,
        op: Op,
        tag: WriteTag,
        started: Instant,
        read_from: ReadFrom,
    ) -> impl std::future::Future<Output = Result<response::Result, ClientError>> + '_ {
        async move {
            let deadline = started + self.inner.options.request_timeout;
            let mut backoff = Duration::from_millis(5);
            let mut attempts = 0u32;
            // A clock read costs a VM tens of nanoseconds: the first attempt
            // starts at `started` (at most a session's opening late, which
            // only shortens its wait).
            let mut now = started;
            loop {
                let attempt = match self
                    .attempt(shard, &op, tag, read_from, attempts, (now, deadline))
                    .await
                {
                    Ok(attempt) => attempt,
                    // After an attempt went out, giving up is a timeout: a write
                    // sent before may have been applied.
                    Err(e @ ClientError::NoEndpoint(_)) if attempts > 0 => {
                        return Err(ClientError::Timeout {
                            elapsed: started.elapsed(),
                            last: e.to_string(),
                        })
                    }
                    Err(e) => return Err(e),
                };
                attempts += 1;
                let last = match attempt {
                    Attempt::Done(result) => return Ok(result),
                    Attempt::Retry(why) => why,
                };
                now = Instant::now();
                if now >= deadline {
                    return Err(ClientError::Timeout {
                        elapsed: now - started,
                        last,
                    });
                }
                // Boxed (a rare path): monoio's sleep future is 640 bytes.
                Box::pin(monoio::time::sleep(backoff.min(deadline - now))).await;
                backoff = (backoff * 2).min(Duration::from_millis(200));
                if backoff >= Duration::from_millis(40) {
                    // Boxed, like opening a connection: a rare path.
                    let _ = Box::pin(self.refresh_topology()).await;
                }
                now = Instant::now();
            }
        }
    }

    #[allow(clippy::manual_async_fn)]
    fn attempt<'a>(
        &'a self,
        shard: u32,
        op: &'a Op,
        tag: WriteTag,
        read_from: ReadFrom,
        attempts: u32,
        (now, deadline): (Instant, Instant),
    ) -> impl std::future::Future<Output = Result<Attempt, ClientError>> + 'a {
        async move {
            let (addr, knows_leader) = match read_from {
                ReadFrom::Leader => self.target(shard)?,
                _ => self.read_target(shard, read_from, attempts)?,
            };
            // A read, and a write in an exactly-once session (the node applies
            // a numbered write at most once), may be sent again at no risk: one
            // that a paused or cut-off node does not answer moves on to another
            // node (for a write, the leader elected meanwhile) within the
            // deadline. Any other request waits for its answer until the
            // deadline: sent twice, it could apply twice.
            let remaining = deadline.saturating_duration_since(now);
            let resendable = matches!(op, Op::Get(_) | Op::Scan(_)) || tag.session_id != 0;
            let timeout = if resendable {
                self.attempt_timeout().min(remaining)
            } else {
                remaining
            };
            match self
                .call_at(
                    addr,
                    op.clone(),
                    knows_leader,
                    tag,
                    (now + timeout, timeout),
                )
                .await
            {
                Ok(response::Result::Error(error)) => {
                    let code = ErrorCode::try_from(error.code).unwrap_or(ErrorCode::Internal);
                    match code {
                        ErrorCode::NotLeader => {
                            self.set_leader(shard, error.leader_id);
                            Ok(Attempt::Retry(error.message))
                        }
                        ErrorCode::Unavailable => {
                            self.set_leader(shard, 0);
                            Ok(Attempt::Retry(error.message))
                        }
                        // The server gave up waiting for the write to commit; it
                        // may still. In a session the retry cannot apply twice.
                        ErrorCode::Timeout if tag.session_id != 0 => {
                            Ok(Attempt::Retry(error.message))
                        }
                        // A follower that trails far behind its leader did not
                        // apply the read's index in time: another replica may.
                        ErrorCode::Timeout if read_from != ReadFrom::Leader => {
                            Ok(Attempt::Retry(error.message))
                        }
                        _ => Err(ClientError::Server {
                            code,
                            message: error.message,
                            current_version: error.current_version,
                        }),
                    }
                }
                Ok(result) => Ok(Attempt::Done(result)),
                Err(e) => {
                    self.set_leader(shard, 0);
                    Ok(Attempt::Retry(e.to_string()))
                }
            }
        }
    }

    /// The address to send a request for `shard` to, and whether it is the
    /// known leader (then forwarding is switched off: we follow hints).
    fn target(&self, shard: u32) -> Result<(SocketAddr, bool), ClientError> {
        let topology = self.inner.topology.borrow();
        if topology.nodes.is_empty() {
            return Err(ClientError::NoEndpoint("empty topology".into()));
        }
        let leader = topology.leaders.get(shard as usize).copied().unwrap_or(0);
        let node = match topology
            .nodes
            .iter()
            .find(|n| n.node_id == leader && leader != 0)
        {
            Some(node) => node,
            None => {
                let i = self.inner.round_robin.get();
                self.inner.round_robin.set(i.wrapping_add(1));
                &topology.nodes[i % topology.nodes.len()]
            }
        };
        let knows_leader = leader != 0 && node.node_id == leader;
        let id = node.node_id;
        drop(topology);
        Ok((self.shard_addr(id, shard)?, knows_leader))
    }

    /// The client address of `shard` on node `id`, resolved once per
    /// (node, shard): no formatting or lookup per request.
    fn shard_addr(&self, id: u64, shard: u32) -> Result<SocketAddr, ClientError> {
        if let Some(addr) = self.inner.addrs.borrow().get(&(id, shard)) {
            return Ok(*addr);
        }
        let endpoint = {
            let topology = self.inner.topology.borrow();
            let node = topology
                .nodes
                .iter()
                .find(|n| n.node_id == id)
                .ok_or_else(|| {
                    ClientError::NoEndpoint(format!("node {id} is not in the topology"))
                })?;
            format!("{}:{}", node.host, node.client_port + shard)
        };
        let addr = self.resolve(&endpoint).map_err(ClientError::NoEndpoint)?;
        self.inner.addrs.borrow_mut().insert((id, shard), addr);
        Ok(addr)
    }

    /// How long one attempt of a read (or a topology request) waits for
    /// its answer before the next node is tried: a quarter of the request
    /// timeout, at least [`MIN_ATTEMPT_TIMEOUT`].
    fn attempt_timeout(&self) -> Duration {
        (self.inner.options.request_timeout / 4).max(MIN_ATTEMPT_TIMEOUT)
    }

    /// Where a follower or nearest read of `shard` goes on its
    /// `attempts`-th retry; never "knows the leader" (the node serves it
    /// itself, or answers why not).
    fn read_target(
        &self,
        shard: u32,
        read_from: ReadFrom,
        attempts: u32,
    ) -> Result<(SocketAddr, bool), ClientError> {
        let empty = || ClientError::NoEndpoint("empty topology".into());
        let node = if read_from == ReadFrom::Nearest {
            self.work_out_nearest_order();
            let order = self.inner.nearest.borrow();
            let order = order.as_deref().unwrap_or_default();
            if order.is_empty() {
                return Err(empty());
            }
            order[attempts as usize % order.len()]
        } else {
            let topology = self.inner.topology.borrow();
            let leader = topology.leaders.get(shard as usize).copied().unwrap_or(0);
            let followers = || {
                topology
                    .nodes
                    .iter()
                    .map(|n| n.node_id)
                    .filter(move |id| *id != leader)
            };
            let i = self.inner.round_robin.get();
            self.inner.round_robin.set(i.wrapping_add(1));
            match followers().count() {
                // No follower known: whichever node there is.
                0 => {
                    topology
                        .nodes
                        .get(i % topology.nodes.len().max(1))
                        .ok_or_else(empty)?
                        .node_id
                }
                count => followers().nth(i % count).expect("counted"),
            }
        };
        Ok((self.shard_addr(node, shard)?, false))
    }

    /// Works out, once per topology, the order `ReadFrom::Nearest` tries
    /// nodes in: those named by `endpoints` first in that order, then the
    /// rest.
    fn work_out_nearest_order(&self) {
        if self.inner.nearest.borrow().is_some() {
            return;
        }
        let nodes: Vec<(u64, Option<SocketAddr>)> = self
            .inner
            .topology
            .borrow()
            .nodes
            .iter()
            .map(|n| {
                let addr = self.resolve(&format!("{}:{}", n.host, n.client_port)).ok();
                (n.node_id, addr)
            })
            .collect();
        let mut order = Vec::with_capacity(nodes.len());
        for endpoint in &self.inner.options.endpoints {
            let Ok(addr) = self.resolve(endpoint) else {
                continue;
            };
            for (id, node_addr) in &nodes {
                if *node_addr == Some(addr) && !order.contains(id) {
                    order.push(*id);
                }
            }
        }
        for (id, _) in &nodes {
            if !order.contains(id) {
                order.push(*id);
            }
        }
        *self.inner.nearest.borrow_mut() = Some(order);
    }

    fn set_leader(&self, shard: u32, leader: u64) {
        let mut topology = self.inner.topology.borrow_mut();
        let shards = topology.shards as usize;
        if topology.leaders.len() < shards {
            topology.leaders.resize(shards, 0);
        }
        if let Some(slot) = topology.leaders.get_mut(shard as usize) {
            *slot = leader;
        }
    }

    /// One request to one address, no retries.
    #[allow(clippy::manual_async_fn)]
    fn call_at(
        &self,
        addr: SocketAddr,
        op: Op,
        no_forward: bool,
        tag: WriteTag,
        (deadline, timeout): (Instant, Duration),
    ) -> impl std::future::Future<Output = Result<response::Result, String>> + '_ {
        async move {
            let conn = self.conn(addr).await?;
            let id = self.inner.next_id.get();
            self.inner.next_id.set(id + 1);
            let (tx, rx) = answer::channel();
            conn.state
                .pending
                .borrow_mut()
                .insert(id, Waiter { tx, deadline });
            conn.state.wake_sweeper();
            let frame = encode_frame_bytes(&Request {
                id,
                no_forward,
                op: Some(op),
                session_id: tag.session_id,
                sequence: tag.sequence,
                acked_below: tag.acked_below,
            });
            if let Err(e) = conn.sender.send(frame) {
                conn.state.pending.borrow_mut().remove(&id);
                return Err(format!("{addr}: cannot send: {e:?}"));
            }
            match rx.await {
                Ok(response) => response
                    .result
                    .ok_or_else(|| format!("{addr}: empty response")),
                Err(_) if conn.state.closed.get() => {
                    Err(match conn.state.why_closed.borrow().as_ref() {
                        Some(why) => format!("{addr}: connection closed before the answer: {why}"),
                        None => format!("{addr}: connection closed before the answer"),
                    })
                }
                Err(_) => Err(format!("{addr}: no answer within {timeout:?}")),
            }
        }
    }

    async fn conn(&self, addr: SocketAddr) -> Result<Rc<Conn>, String> {
        if let Some(conn) = self.inner.conns.borrow().get(&addr) {
            if !conn.state.closed.get() {
                return Ok(conn.clone());
            }
        }
        // Boxed: inline, the connect and TLS handshake state would make
        // every request's future several KiB (see `request_futures_stay_small`
        // in tests/client.rs).
        Box::pin(self.open_conn(addr)).await
    }

    async fn open_conn(&self, addr: SocketAddr) -> Result<Rc<Conn>, String> {
        let options = &self.inner.options;
        let stream = connect(addr, &options.socket)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let (read_half, write_half) = match &options.tls {
            None => plain(stream),
            Some(tls) => {
                let host = self.inner.hosts.borrow().get(&addr).cloned();
                let host = host.unwrap_or_else(|| addr.ip().to_string());
                let name = server_name(&host).map_err(|e| format!("{addr}: {e}"))?;
                tls_connect(
                    stream,
                    tls.config.clone(),
                    name,
                    options.socket.connect_timeout,
                )
                .await
                .map_err(|e| format!("{addr}: {e}"))?
            }
        };
        let sender = spawn_writer(write_half, 64 << 20);
        let state = Rc::new(ConnState::default());
        let conn = Rc::new(Conn {
            sender: sender.clone(),
            state: state.clone(),
        });
        let reader = FrameReader::new(read_half, options.max_frame_bytes);
        monoio::spawn(expire_requests(state.clone()));
        monoio::spawn(read_responses(reader, state, sender));
        self.inner.conns.borrow_mut().insert(addr, conn.clone());
        Ok(conn)
    }
}

async fn read_responses<R: monoio::io::AsyncReadRent>(
    mut reader: FrameReader<R>,
    state: Rc<ConnState>,
    sender: FrameSender,
) {
    loop {
        let frame = match reader.next_frame().await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            // A TLS alert (a refused certificate) or a TLS record on a
            // plaintext connection shows here: the caller is told.
            Err(e) => {
                *state.why_closed.borrow_mut() = Some(e.to_string());
                break;
            }
        };
        let response = match decode_message::<Response>(frame) {
            Ok(response) => response,
            Err(e) => {
                *state.why_closed.borrow_mut() = Some(e.to_string());
                break;
            }
        };
        if let Some(waiter) = state.pending.borrow_mut().remove(&response.id) {
            waiter.tx.send(response);
        }
    }
    state.closed.set(true);
    sender.close();
    // Dropping the senders wakes every waiter with "connection closed".
    state.pending.borrow_mut().clear();
    state.wake_sweeper();
}

/// Drops the waiters of one connection that are past their deadline (their
/// callers see "no answer within"), every [`TIMEOUT_SWEEP`] while any wait;
/// asleep while none does. Ends when the connection closes.
async fn expire_requests(state: Rc<ConnState>) {
    while !state.closed.get() {
        if state.pending.borrow().is_empty() {
            std::future::poll_fn(|cx| {
                if state.closed.get() || !state.pending.borrow().is_empty() {
                    Poll::Ready(())
                } else {
                    state.sweeper.set(Some(cx.waker().clone()));
                    Poll::Pending
                }
            })
            .await;
            continue;
        }
        monoio::time::sleep(TIMEOUT_SWEEP).await;
        let now = Instant::now();
        state
            .pending
            .borrow_mut()
            .retain(|_, waiter| waiter.deadline > now);
    }
}

impl Client {
    /// Resolves `host:port`, remembering the host the address came from.
    fn resolve(&self, endpoint: &str) -> Result<SocketAddr, String> {
        let addr = resolve(endpoint)?;
        if let Some((host, _)) = endpoint.rsplit_once(':') {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            self.inner.hosts.borrow_mut().insert(addr, host.to_string());
        }
        Ok(addr)
    }
}

fn resolve(endpoint: &str) -> Result<SocketAddr, String> {
    endpoint
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {endpoint}: {e}"))?
        .next()
        .ok_or_else(|| format!("{endpoint} resolves to no address"))
}

fn unexpected(result: response::Result) -> ClientError {
    ClientError::Server {
        code: ErrorCode::Internal,
        message: format!("unexpected answer: {result:?}"),
        current_version: 0,
    }
}
