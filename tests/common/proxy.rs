//! A partition proxy: every node dials its peers through it, and a test cuts
//! chosen links so that a node cannot tell the cut from a dead network.
//!
//! One listener per (destination node, shard) on 127.0.0.1 forwards to the
//! destination's real peer port of that shard. The dialer is identified by
//! the first frame it sends, the `Hello` of the peer handshake (4-byte
//! big-endian length, then a `PeerFrame`). While a link {a, b} is cut, every
//! byte of a connection between a and b, in both directions, is read and
//! thrown away: the TCP connection stays open, nothing is refused or reset,
//! nothing arrives. A connection that arrives while its link is cut is
//! accepted and swallowed the same way (the dialer's handshake times out).
//! On `heal` every connection that swallowed a byte is closed, so the
//! streams restart at a frame boundary; new connections flow again.
//!
//! How the configs make nodes dial through the proxy: each node's config lists
//! every node, itself with its real ports (config validation requires its
//! own entry to match its listeners) and every other node with the proxy's
//! port range for that node as `peer_port`. All nodes list the same ids and
//! hosts; only the other nodes' peer ports differ from the truth. Validation
//! accepts this because the proxy ranges sit inside the harness's 100-port
//! block of each node (after its peer range, before its admin port), so no
//! range in any node's view overlaps another. The handshake accepts it because
//! `Hello` carries ids, cluster id and shard, never addresses.
//!
//! Limits: at most `MAX_CONNECTIONS` proxied connections live at once (more are
//! closed on accept), two threads each, plus one accept thread per listener;
//! Drop stops and joins all of them. Kernel keepalive still succeeds through a
//! cut (the proxy's sockets answer probes), so a cut lasting longer than the
//! node's keepalive budget (25 s by default) still looks alive at TCP level.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use corekv_proto::peer::{peer_frame, PeerFrame};
use prost::Message;

use super::Cluster;

/// Most proxied connections alive at once.
const MAX_CONNECTIONS: usize = 512;
/// Largest first frame accepted as a Hello.
const MAX_HELLO_BYTES: usize = 64 * 1024;
/// How long a dialer gets to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the proxy waits to reach a destination's real peer port.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Read buffer of one pump.
const PUMP_BUFFER_BYTES: usize = 64 * 1024;

/// One proxied connection: dialer `from` -> node `to`, one shard.
struct Connection {
    /// The dialer's node id, 0 until its Hello arrived.
    from: AtomicU64,
    to: u64,
    /// Clones of the sockets, to shut them down from outside the pumps.
    sockets: Mutex<Vec<TcpStream>>,
    /// Set once a byte was swallowed; such a connection never forwards again.
    tainted: AtomicBool,
}

impl Connection {
    fn close(&self) {
        for socket in self.sockets.lock().unwrap().iter() {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// Cut links as (smaller id, larger id).
    cuts: Mutex<BTreeSet<(u64, u64)>>,
    connections: Mutex<Vec<Arc<Connection>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    forwarded_bytes: AtomicU64,
    discarded_bytes: AtomicU64,
}

fn link(a: u64, b: u64) -> (u64, u64) {
    (a.min(b), a.max(b))
}

impl Shared {
    /// Whether `connection`'s bytes must be swallowed now; taints it if so.
    /// Decided under the cuts lock, so it cannot interleave with `heal`.
    fn swallow(&self, connection: &Connection) -> bool {
        let cuts = self.cuts.lock().unwrap();
        let from = connection.from.load(Ordering::SeqCst);
        let swallow =
            connection.tainted.load(Ordering::SeqCst) || cuts.contains(&link(from, connection.to));
        if swallow {
            connection.tainted.store(true, Ordering::SeqCst);
        }
        swallow
    }

    fn spawn(self: &Arc<Self>, name: String, body: impl FnOnce() + Send + 'static) {
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(body)
            .expect("spawn proxy thread");
        let mut threads = self.threads.lock().unwrap();
        threads.retain(|t| !t.is_finished());
        threads.push(handle);
    }

    /// Registers a connection unless the proxy is stopping or full.
    fn register(&self, connection: &Arc<Connection>) -> bool {
        let mut connections = self.connections.lock().unwrap();
        if self.stop.load(Ordering::SeqCst) || connections.len() >= MAX_CONNECTIONS {
            return false;
        }
        connections.push(connection.clone());
        true
    }

    fn unregister(&self, connection: &Arc<Connection>) {
        connection.close();
        self.connections
            .lock()
            .unwrap()
            .retain(|c| !Arc::ptr_eq(c, connection));
    }
}

/// The proxy of one cluster; dropping it stops every thread.
pub struct PartitionProxy {
    shared: Arc<Shared>,
    /// Listening ports, to wake the accept threads on Drop.
    ports: Vec<u16>,
    accept_threads: Vec<JoinHandle<()>>,
}

impl PartitionProxy {
    /// Cuts the link between nodes `a` and `b`, both directions.
    pub fn cut(&self, a: u64, b: u64) {
        assert_ne!(a, b, "a node has no link to itself");
        self.shared.cuts.lock().unwrap().insert(link(a, b));
    }

    /// Cuts every link of node `n` to the `nodes` nodes of the cluster.
    pub fn isolate(&self, n: u64, nodes: u64) {
        for other in (1..=nodes).filter(|&o| o != n) {
            self.cut(n, other);
        }
    }

    /// Restores every link: connections that swallowed bytes are closed (the
    /// nodes redial), and new connections flow.
    pub fn heal(&self) {
        let connections = self.shared.connections.lock().unwrap();
        let mut cuts = self.shared.cuts.lock().unwrap();
        cuts.clear();
        for connection in connections.iter() {
            if connection.tainted.load(Ordering::SeqCst) {
                connection.close();
            }
        }
    }

    /// Bytes delivered through the proxy so far (both directions).
    pub fn forwarded_bytes(&self) -> u64 {
        self.shared.forwarded_bytes.load(Ordering::SeqCst)
    }

    /// Bytes swallowed by cuts so far.
    pub fn discarded_bytes(&self) -> u64 {
        self.shared.discarded_bytes.load(Ordering::SeqCst)
    }

    /// Listens on `listen_port`, forwarding to `upstream_port`, for node `to`.
    fn listen(&mut self, listener: TcpListener, to: u64, upstream_port: u16) {
        let port = listener.local_addr().unwrap().port();
        let shared = self.shared.clone();
        let handle = std::thread::Builder::new()
            .name(format!("proxy-accept-{port}"))
            .spawn(move || accept_loop(listener, shared, to, upstream_port))
            .expect("spawn proxy accept thread");
        self.ports.push(port);
        self.accept_threads.push(handle);
    }
}

impl Drop for PartitionProxy {
    fn drop(&mut self) {
        {
            let connections = self.shared.connections.lock().unwrap();
            self.shared.stop.store(true, Ordering::SeqCst);
            for connection in connections.iter() {
                connection.close();
            }
        }
        for port in &self.ports {
            // Wakes the blocking accept so it sees `stop`.
            let _ =
                TcpStream::connect_timeout(&([127, 0, 0, 1], *port).into(), Duration::from_secs(1));
        }
        for handle in self.accept_threads.drain(..) {
            let _ = handle.join();
        }
        let threads = std::mem::take(&mut *self.shared.threads.lock().unwrap());
        for handle in threads {
            let _ = handle.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>, to: u64, upstream_port: u16) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let connection = Arc::new(Connection {
            from: AtomicU64::new(0),
            to,
            sockets: Mutex::new(vec![stream.try_clone().expect("clone socket")]),
            tainted: AtomicBool::new(false),
        });
        if !shared.register(&connection) {
            continue; // dropping `stream` closes it
        }
        let worker = shared.clone();
        shared.spawn(format!("proxy-conn-{to}"), move || {
            serve(stream, &worker, &connection, upstream_port);
            worker.unregister(&connection);
        });
    }
}

/// Reads the dialer's Hello, then forwards (or swallows) the connection.
fn serve(mut client: TcpStream, shared: &Arc<Shared>, connection: &Arc<Connection>, port: u16) {
    let Some((from, hello_bytes)) = read_hello(&mut client) else {
        return;
    };
    connection.from.store(from, Ordering::SeqCst);
    if shared.swallow(connection) {
        // A dead network: the dialer's bytes vanish, no answer, no reset.
        shared
            .discarded_bytes
            .fetch_add(hello_bytes.len() as u64, Ordering::SeqCst);
        let _ = client.set_read_timeout(None);
        pump(&mut client, None, shared, connection);
        return;
    }
    let Ok(mut upstream) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), UPSTREAM_CONNECT_TIMEOUT)
    else {
        return; // the destination is down: the dialer sees its link close
    };
    let _ = upstream.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let _ = client.set_read_timeout(None);
    connection
        .sockets
        .lock()
        .unwrap()
        .push(upstream.try_clone().expect("clone socket"));
    if shared.stop.load(Ordering::SeqCst) || upstream.write_all(&hello_bytes).is_err() {
        return;
    }
    shared
        .forwarded_bytes
        .fetch_add(hello_bytes.len() as u64, Ordering::SeqCst);
    let (mut back_from, mut back_to) = (
        upstream.try_clone().expect("clone socket"),
        client.try_clone().expect("clone socket"),
    );
    let (worker, back) = (shared.clone(), connection.clone());
    shared.spawn(format!("proxy-back-{}", connection.to), move || {
        pump(&mut back_from, Some(&mut back_to), &worker, &back);
        back.close();
    });
    pump(&mut client, Some(&mut upstream), shared, connection);
}

/// The dialer's node id and the raw bytes of its first frame, if that frame
/// is a Hello.
fn read_hello(client: &mut TcpStream) -> Option<(u64, Vec<u8>)> {
    client.set_read_timeout(Some(HELLO_TIMEOUT)).ok()?;
    let mut header = [0u8; 4];
    client.read_exact(&mut header).ok()?;
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_HELLO_BYTES {
        return None;
    }
    let mut frame = header.to_vec();
    frame.resize(4 + len, 0);
    client.read_exact(&mut frame[4..]).ok()?;
    match PeerFrame::decode(&frame[4..]).ok()?.msg {
        Some(peer_frame::Msg::Hello(hello)) if hello.node_id != 0 => Some((hello.node_id, frame)),
        _ => None,
    }
}

/// Copies `source` to `sink` until either side closes; while the link is cut
/// (or once the connection is tainted) the bytes are swallowed instead.
fn pump(
    source: &mut TcpStream,
    mut sink: Option<&mut TcpStream>,
    shared: &Shared,
    connection: &Connection,
) {
    let mut buffer = vec![0u8; PUMP_BUFFER_BYTES];
    loop {
        let n = match source.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if sink.is_none() || shared.swallow(connection) {
            shared.discarded_bytes.fetch_add(n as u64, Ordering::SeqCst);
            continue;
        }
        if sink.as_mut().unwrap().write_all(&buffer[..n]).is_err() {
            return;
        }
        shared.forwarded_bytes.fetch_add(n as u64, Ordering::SeqCst);
    }
}

/// A cluster whose nodes reach each other only through a [`PartitionProxy`].
/// Derefs to the [`Cluster`]. Nodes are killed before the proxy stops.
pub struct ProxiedCluster {
    pub cluster: Cluster,
    pub proxy: PartitionProxy,
}

impl Deref for ProxiedCluster {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl DerefMut for ProxiedCluster {
    fn deref_mut(&mut self) -> &mut Cluster {
        &mut self.cluster
    }
}

impl ProxiedCluster {
    /// Writes configs for `nodes` nodes and `shards` shards in which every
    /// node dials the others through the proxy, then starts every node.
    pub fn start(nodes: u64, shards: u32) -> ProxiedCluster {
        let cluster = Cluster::configure(nodes, shards, "");
        let mut proxy = PartitionProxy {
            shared: Arc::new(Shared::default()),
            ports: Vec::new(),
            accept_threads: Vec::new(),
        };
        // Proxy port base of each node, inside its 100-port harness block:
        // after the peer range [+50, +50+S), before the admin port (+90).
        let mut proxy_bases = Vec::new();
        for node in &cluster.nodes {
            let (listeners, base) = bind_range(node.client_port, shards);
            for (shard, listener) in listeners.into_iter().enumerate() {
                proxy.listen(listener, node.id, node.peer_port + shard as u16);
            }
            proxy_bases.push(base);
        }
        for node in &cluster.nodes {
            let mut text = std::fs::read_to_string(&node.config_path).expect("read config");
            for (other, base) in cluster.nodes.iter().zip(&proxy_bases) {
                if other.id == node.id {
                    continue;
                }
                let real = format!("\npeer_port = {}\n", other.peer_port);
                assert_eq!(text.matches(&real).count(), 1, "{text}");
                text = text.replace(&real, &format!("\npeer_port = {base}\n"));
            }
            std::fs::write(&node.config_path, text).expect("write config");
        }
        let mut proxied = ProxiedCluster { cluster, proxy };
        for node in &mut proxied.cluster.nodes {
            node.start();
        }
        proxied
    }

    /// Cuts every link of node `n` (see [`PartitionProxy::isolate`]).
    pub fn isolate(&self, n: u64) {
        self.proxy.isolate(n, self.cluster.nodes.len() as u64);
    }
}

/// Binds `shards` consecutive listeners in `(block + 50 + shards, block + 90)`.
fn bind_range(block: u16, shards: u32) -> (Vec<TcpListener>, u16) {
    let shards = shards as u16;
    for base in (block + 51 + shards)..=(block + 90 - shards) {
        let listeners: Vec<TcpListener> = (0..shards)
            .map_while(|s| TcpListener::bind(("127.0.0.1", base + s)).ok())
            .collect();
        if listeners.len() == shards as usize {
            return (listeners, base);
        }
    }
    panic!("no {shards} free proxy ports in the block of port {block}");
}
