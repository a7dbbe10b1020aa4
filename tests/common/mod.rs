//! Test harness: real `corekv` processes on 127.0.0.1, each with its own
//! temp data dir and free ports, killed by pid when the guard drops (also
//! when a test panics).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use corekv_proto::client::{Request, Response, StatusResult};
use prost::Message;

/// Path of the binary under test.
pub const COREKV: &str = env!("CARGO_BIN_EXE_corekv");

/// TLS for every cluster of this test process: one CA, a client
/// certificate, and node certificates issued per cluster. On when a test
/// asks ([`enable_tls`]) or `COREKV_TEST_TLS=1` (how CI runs the kill -9
/// chaos test a second time, over TLS).
pub struct TestPki {
    pub authority: corekv::certs::Authority,
    pub client: corekv::certs::Issued,
    /// The client library's TLS (CA and client certificate).
    pub client_tls: corekv_client::ClientTls,
    /// The same, for [`RawClient`]'s blocking rustls.
    pub raw: std::sync::Arc<rustls::ClientConfig>,
}

static TLS: std::sync::OnceLock<TestPki> = std::sync::OnceLock::new();

/// This process's TLS, if on.
pub fn tls() -> Option<&'static TestPki> {
    if std::env::var("COREKV_TEST_TLS").is_ok_and(|v| v == "1") {
        return Some(enable_tls());
    }
    TLS.get()
}

/// Turns TLS on for every cluster this process configures from now on.
pub fn enable_tls() -> &'static TestPki {
    TLS.get_or_init(|| {
        let authority = corekv::certs::Authority::new("corekv test CA").expect("test CA");
        let client = authority.client("test client").expect("client certificate");
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca, cert, key) = write_client_pem(dir.path(), &authority, &client);
        let client_tls = corekv_client::ClientTls::from_files(&ca, Some((&cert, &key)))
            .expect("client TLS from the test PEMs");
        let raw = client_tls.rustls_config();
        // Admin ports speak HTTPS on a TLS node.
        corekv::scrape::use_tls(raw.clone());
        TestPki {
            authority,
            client,
            client_tls,
            raw,
        }
    })
}

/// Writes the CA and the client certificate under `dir`: (CA, cert, key).
pub fn write_client_pem(
    dir: &Path,
    authority: &corekv::certs::Authority,
    client: &corekv::certs::Issued,
) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).expect("create TLS dir");
    let paths = (
        dir.join("ca.pem"),
        dir.join("client.pem"),
        dir.join("client-key.pem"),
    );
    std::fs::write(&paths.0, authority.cert_pem()).expect("write CA");
    std::fs::write(&paths.1, &client.cert_pem).expect("write client certificate");
    std::fs::write(&paths.2, &client.key_pem).expect("write client key");
    paths
}

/// The client library's TLS for this process's clusters.
pub fn client_tls() -> Option<corekv_client::ClientTls> {
    tls().map(|pki| pki.client_tls.clone())
}

/// A generous deadline for anything a cluster has to do on a noisy 2-core box.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Polls `check` until it returns Some or `within` passes.
pub fn wait_for<T>(what: &str, within: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check() {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Port blocks held by this test process: one lock file per 100-port
/// block, flock'ed for as long as the cluster lives. A killed node's ports
/// look free to a bind probe, so without this a parallel test could take them
/// and the node could not come back (or would talk to a stranger's cluster).
/// The kernel drops the locks when the process dies, however it dies.
pub struct PortReservation {
    _locks: Vec<std::fs::File>,
}

fn try_lock_block(block: u64) -> Option<std::fs::File> {
    use std::os::fd::AsRawFd;
    let dir = std::env::temp_dir().join("corekv-test-ports");
    std::fs::create_dir_all(&dir).ok()?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(format!("{block}.lock")))
        .ok()?;
    // SAFETY: flock(2) on a descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    (rc == 0).then_some(file)
}

/// A port base such that every port the cluster needs is free right now and
/// reserved against other test processes until the reservation drops.
/// Bases are spread by pid and time so parallel test processes rarely
/// collide, and stay below Linux's ephemeral range (32768 and up), where an
/// outgoing connection could take a port before a node binds it.
pub fn free_port_base(nodes: u64, shards: u32) -> (u16, PortReservation) {
    const LOW: u64 = 10_000;
    const HIGH: u64 = 32_000;
    let span = nodes * 100;
    let slots = (HIGH - LOW - span) / 100;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let seed = (std::process::id() as u64).wrapping_mul(7919) ^ nanos;
    for attempt in 0..slots {
        let candidate = LOW + ((seed + attempt * 7) % slots) * 100;
        let blocks = (0..nodes).map(|i| candidate + i * 100);
        let Some(locks) = blocks.map(try_lock_block).collect::<Option<Vec<_>>>() else {
            continue;
        };
        let free = (1..=nodes).all(|i| {
            let base = candidate + (i - 1) * 100;
            (0..shards as u64)
                .flat_map(|s| [base + s, base + 50 + s])
                .chain([base + 90])
                .all(|port| TcpListener::bind(("127.0.0.1", port as u16)).is_ok())
        });
        if free {
            return (candidate as u16, PortReservation { _locks: locks });
        }
    }
    panic!("no free ports found");
}

/// One node of a test cluster.
pub struct Node {
    pub id: u64,
    pub client_port: u16,
    pub peer_port: u16,
    pub admin_port: u16,
    pub config_path: PathBuf,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    /// RLIMIT_FSIZE the process starts with (`None` = inherited): a file
    /// may not grow past it, which the node sees as a full disk.
    pub file_size_limit: Option<u64>,
    /// Environment variables the process starts with, beside the test's.
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Node {
    /// `127.0.0.1:client_port`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// `127.0.0.1:admin_port`, as `corekv::scrape` takes it.
    pub fn admin_addr(&self) -> String {
        format!("127.0.0.1:{}", self.admin_port)
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The exit code once the process has exited (`Some(None)` if a signal
    /// ended it); `None` while it runs.
    pub fn try_exit_code(&mut self) -> Option<Option<i32>> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status.code())
    }

    /// The pid, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Starts the process (it must not be running).
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "node {} already running", self.id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open log");
        let mut command = Command::new(COREKV);
        command
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .env("RUST_LOG", "info")
            // The allocator's options as shipped, whatever the test's
            // environment says.
            .env_remove("_RJEM_MALLOC_CONF")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log);
        if let Some(limit) = self.file_size_limit {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs
            // between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    let rlimit = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: libc::RLIM_INFINITY,
                    };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &rlimit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        self.child = Some(command.spawn().expect("spawn corekv"));
    }

    /// Sets the running process's RLIMIT_FSIZE (`None` = unlimited): from
    /// now on no file of it may grow past `limit`, as if the disk were full.
    pub fn set_file_size_limit(&mut self, limit: Option<u64>) {
        let pid = self.pid().expect("node not running") as libc::pid_t;
        let rlimit = libc::rlimit {
            rlim_cur: limit.unwrap_or(libc::RLIM_INFINITY),
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: prlimit on our own child with a valid struct; the old
        // value is not asked for.
        let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &rlimit, std::ptr::null_mut()) };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
        self.file_size_limit = limit;
    }

    /// kill -9 and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("node not running");
        // SAFETY: kill(2) on our own child's pid, not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("node {} ignored SIGTERM", self.id);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The node's log so far (empty when it logs to a device, such as
    /// /dev/full, that is no file).
    pub fn log(&self) -> String {
        if !std::fs::metadata(&self.log_path).is_ok_and(|m| m.is_file()) {
            return String::new();
        }
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

/// A cluster of real processes. Dropping it kills every node by pid.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    pub shards: u32,
    /// Dropped after the nodes are killed (fields drop after `Drop::drop`).
    _ports: PortReservation,
}

impl Cluster {
    /// Writes configs for `nodes` nodes with `shards` shards and starts them.
    pub fn start(nodes: u64, shards: u32) -> Cluster {
        let mut cluster = Self::configure(nodes, shards, "");
        for node in &mut cluster.nodes {
            node.start();
        }
        cluster
    }

    /// Writes configs (with `extra` TOML lines for every node) without starting.
    pub fn configure(nodes: u64, shards: u32, extra: &str) -> Cluster {
        Self::configure_with_spares(nodes, 0, shards, extra)
    }

    /// A cluster of `nodes` voters (started) and `spares` more nodes, ids
    /// `nodes + 1..`, configured to join it (`join` = the voters' client
    /// addresses, no `peers`) but not started.
    pub fn start_with_spares(nodes: u64, spares: u64, shards: u32) -> Cluster {
        let mut cluster = Self::configure_with_spares(nodes, spares, shards, "");
        for node in cluster.nodes.iter_mut().take(nodes as usize) {
            node.start();
        }
        cluster
    }

    /// [`Cluster::configure`] with `spares` joining nodes after the voters.
    pub fn configure_with_spares(nodes: u64, spares: u64, shards: u32, extra: &str) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, ports_held) = free_port_base(nodes + spares, shards);
        let ports: Vec<(u16, u16, u16)> = (0..nodes + spares)
            .map(|i| {
                let c = base + (i as u16) * 100;
                (c, c + 50, c + 90)
            })
            .collect();
        let mut peers = String::new();
        let join: Vec<String> = ports
            .iter()
            .take(nodes as usize)
            .map(|(c, _, _)| format!("\"127.0.0.1:{c}\""))
            .collect();
        let join = format!("join = [{}]\n", join.join(", "));
        for (i, (c, p, a)) in ports.iter().enumerate().take(nodes as usize) {
            peers.push_str(&format!(
                "\n[[peers]]\nid = {}\nhost = \"127.0.0.1\"\nclient_port = {c}\npeer_port = {p}\nadmin_port = {a}\n",
                i + 1
            ));
        }
        // Small segments keep test data dirs small; `extra` may choose its own.
        let segment = if extra.contains("wal_segment_bytes") {
            ""
        } else {
            "wal_segment_bytes = 4194304\n"
        };
        let mut list = Vec::new();
        let tls_dir = dir.path().join("tls");
        if let Some(pki) = tls() {
            write_client_pem(&tls_dir, &pki.authority, &pki.client);
        }
        for (i, (c, p, a)) in ports.iter().enumerate() {
            let id = i as u64 + 1;
            let node_dir = dir.path().join(format!("node{id}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            let tls_lines = match tls() {
                Some(pki) => node_tls_lines(pki, &tls_dir, id),
                None => String::new(),
            };
            let data_dir = node_dir.join("data");
            let config_path = node_dir.join("corekv.toml");
            let members = if id <= nodes {
                peers.as_str()
            } else {
                join.as_str()
            };
            let text = format!(
                "node_id = {id}\ncluster_id = 7\ndata_dir = {:?}\nclient_port = {c}\npeer_port = {p}\nadmin_port = {a}\nshards = {shards}\n{segment}{tls_lines}{extra}\n{members}",
                data_dir.display().to_string()
            );
            std::fs::write(&config_path, text).unwrap();
            list.push(Node {
                id,
                client_port: *c,
                peer_port: *p,
                admin_port: *a,
                config_path,
                data_dir,
                log_path: node_dir.join("corekv.log"),
                file_size_limit: None,
                env: Vec::new(),
                child: None,
            });
        }
        Cluster {
            dir,
            nodes: list,
            shards,
            _ports: ports_held,
        }
    }

    /// The CLI flags for this cluster's TLS (none without TLS).
    pub fn tls_flags(&self) -> Vec<String> {
        if tls().is_none() {
            return Vec::new();
        }
        let dir = self.dir.path().join("tls");
        let path = |name: &str| dir.join(name).display().to_string();
        vec![
            "--cacert".into(),
            path("ca.pem"),
            "--cert".into(),
            path("client.pem"),
            "--key".into(),
            path("client-key.pem"),
        ]
    }

    /// Comma-separated client endpoints of every node.
    pub fn endpoints(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.endpoint())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node by id.
    pub fn node(&mut self, id: u64) -> &mut Node {
        &mut self.nodes[id as usize - 1]
    }

    /// Status of one node, if it answers.
    pub fn status(&self, id: u64) -> Option<StatusResult> {
        let node = &self.nodes[id as usize - 1];
        let response = RawClient::connect(node.client_port)
            .ok()?
            .call(Request {
                id: 1,
                no_forward: false,
                op: Some(corekv_proto::client::request::Op::Status(Default::default())),
                ..Default::default()
            })
            .ok()?;
        match response.result? {
            corekv_proto::client::response::Result::Status(s) => Some(s),
            _ => None,
        }
    }

    /// Waits until every running node sees a leader for every shard, and all
    /// of them agree on it; returns leader ids by shard.
    pub fn wait_for_leaders(&mut self) -> Vec<u64> {
        let ids: Vec<u64> = self
            .nodes
            .iter_mut()
            .filter_map(|n| n.is_running().then_some(n.id))
            .collect();
        let shards = self.shards as usize;
        wait_for("a leader on every shard", DEADLINE, || {
            let mut leaders = vec![0u64; shards];
            for &id in &ids {
                let status = self.status(id)?;
                if status.shards.len() != shards {
                    return None;
                }
                for s in &status.shards {
                    let slot = &mut leaders[s.shard as usize];
                    if s.leader_id == 0 || (*slot != 0 && *slot != s.leader_id) {
                        return None;
                    }
                    *slot = s.leader_id;
                }
            }
            // The leader must itself be running and say it leads.
            for (shard, leader) in leaders.iter().enumerate() {
                let status = self.status(*leader)?;
                if status.shards[shard].role != corekv_proto::client::Role::Leader as i32 {
                    return None;
                }
            }
            // With every node up, leadership settles on each shard's
            // preferred node (the node balances it); wait for that steady state.
            if ids.len() == self.nodes.len() {
                for (shard, leader) in leaders.iter().enumerate() {
                    if *leader != preferred_leader(shard as u32, self.nodes.len() as u64) {
                        return None;
                    }
                }
            }
            Some(leaders)
        })
    }

    /// Runs the CLI against this cluster; returns (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let output = Command::new(COREKV)
            .arg("--endpoints")
            .arg(self.endpoints())
            .args(self.tls_flags())
            .args(args)
            .output()
            .expect("run corekv cli");
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill9();
        }
        if std::thread::panicking() {
            for node in &self.nodes {
                let log = node.log();
                // Panics and errors first: a backtrace would push them out of the tail.
                for line in log
                    .lines()
                    .filter(|l| l.contains("panicked") || l.contains("ERROR"))
                {
                    eprintln!("node {}: {line}", node.id);
                }
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("---- node {} log (last 40 lines) ----", node.id);
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// A byte stream a [`RawClient`] speaks over: TCP, or TLS over TCP.
pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// A blocking client speaking the raw wire protocol, for tests that need
/// exact control over frames.
pub struct RawClient {
    pub stream: Box<dyn Stream>,
    /// The socket under `stream`, for socket options and clones.
    pub tcp: TcpStream,
    buf: BytesMut,
}

impl RawClient {
    /// Connects to 127.0.0.1:port, with TLS when this process runs TLS
    /// clusters (see [`tls`]).
    pub fn connect(port: u16) -> std::io::Result<RawClient> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        stream.set_nodelay(true)?;
        let tcp = stream.try_clone()?;
        let stream: Box<dyn Stream> = match tls() {
            None => Box::new(stream),
            Some(pki) => {
                let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("IP");
                let conn = rustls::ClientConnection::new(pki.raw.clone(), name)
                    .map_err(std::io::Error::other)?;
                Box::new(rustls::StreamOwned::new(conn, stream))
            }
        };
        Ok(RawClient {
            stream,
            tcp,
            buf: BytesMut::new(),
        })
    }

    /// Wraps an open plaintext stream (say, a clone for a writer thread).
    pub fn from_stream(stream: TcpStream) -> RawClient {
        RawClient {
            tcp: stream.try_clone().expect("clone the socket"),
            stream: Box::new(stream),
            buf: BytesMut::new(),
        }
    }

    /// Sends a request frame.
    pub fn send(&mut self, request: &Request) -> std::io::Result<()> {
        let body = request.encode_to_vec();
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        self.stream.write_all(&frame)
    }

    /// Reads one response frame; Err on EOF.
    pub fn recv(&mut self) -> std::io::Result<Response> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_be_bytes(self.buf[..4].try_into().unwrap()) as usize;
                if self.buf.len() >= 4 + len {
                    self.buf.advance(4);
                    let body = self.buf.split_to(len);
                    return Response::decode(body.freeze())
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e));
                }
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends one request and waits for its response.
    pub fn call(&mut self, request: Request) -> std::io::Result<Response> {
        self.send(&request)?;
        self.recv()
    }
}

/// A node's TLS settings: its certificate (naming it and 127.0.0.1),
/// issued now under `dir`, and client certificates required.
pub fn node_tls_lines(pki: &TestPki, dir: &Path, id: u64) -> String {
    let issued = pki
        .authority
        .node(7, id, &["127.0.0.1".to_string(), "localhost".to_string()])
        .expect("node certificate");
    let cert = dir.join(format!("node{id}.pem"));
    let key = dir.join(format!("node{id}-key.pem"));
    std::fs::write(&cert, &issued.cert_pem).expect("write node certificate");
    std::fs::write(&key, &issued.key_pem).expect("write node key");
    format!(
        "tls_cert_file = {:?}\ntls_key_file = {:?}\ntls_ca_file = {:?}\nclient_auth = \"cert\"\nadmin_client_auth = \"cert\"\n",
        cert.display().to_string(),
        key.display().to_string(),
        dir.join("ca.pem").display().to_string()
    )
}

/// The node a shard's leadership settles on when every node is up: the
/// `shard`-th voter by id, wrapping (node ids here are 1..=nodes).
pub fn preferred_leader(shard: u32, nodes: u64) -> u64 {
    shard as u64 % nodes + 1
}

/// Shard of a key, as the documented routing rule computes it.
pub fn shard_of(key: &str, shards: u32) -> u32 {
    corekv_proto::shard_of(key.as_bytes(), shards)
}

/// A key that lives on `shard`.
pub fn key_on_shard(prefix: &str, shard: u32, shards: u32) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|k| shard_of(k, shards) == shard)
        .unwrap()
}

/// Files under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(files_under(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}

pub mod proxy;

/// What the node behind `port` holds for `key`, read STALE (its own state
/// machine): `Some(None)` if absent, `None` if it did not answer a value.
pub fn stale_get(port: u16, key: &str) -> Option<Option<bytes::Bytes>> {
    use corekv_proto::client::{request::Op, response, Consistency, Get};
    let response = RawClient::connect(port)
        .ok()?
        .call(Request {
            id: 1,
            no_forward: false,
            op: Some(Op::Get(Get {
                key: bytes::Bytes::copy_from_slice(key.as_bytes()),
                consistency: Consistency::Stale as i32,
                local: true,
            })),
            ..Default::default()
        })
        .ok()?;
    match response.result? {
        response::Result::Get(g) => Some(g.found.then_some(g.value)),
        _ => None,
    }
}

/// A client that writes `w0`, `w1`, ... in a loop on its own thread until
/// stopped, remembering every acknowledged key and the longest time between
/// two acknowledgements (a write that failed is retried under a new key).
pub struct Writer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Puts acknowledged so far.
    acks: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<WriterReport>>,
}

/// What a [`Writer`] saw.
#[derive(Debug)]
pub struct WriterReport {
    /// Every key whose put was acknowledged; its value is the key.
    pub acked: Vec<String>,
    /// Puts that failed (timed out, outcome unknown, refused).
    pub failed: u64,
    /// The longest stretch without an acknowledgement.
    pub longest_gap: Duration,
    /// When (since the writer started) the longest stretch ended.
    pub longest_gap_ended: Duration,
}

impl Writer {
    /// Starts writing to the cluster behind `endpoints`.
    pub fn start(endpoints: String) -> Writer {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let acks = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let acked = acks.clone();
        let thread = std::thread::spawn(move || {
            corekv_client::block_on(async move {
                let options = corekv_client::ClientOptions {
                    endpoints: endpoints.split(',').map(str::to_string).collect(),
                    request_timeout: Duration::from_secs(5),
                    tls: client_tls(),
                    ..Default::default()
                };
                let client = corekv_client::Client::connect(options)
                    .await
                    .expect("writer connects");
                let started = Instant::now();
                let mut report = WriterReport {
                    acked: Vec::new(),
                    failed: 0,
                    longest_gap: Duration::ZERO,
                    longest_gap_ended: Duration::ZERO,
                };
                let mut last_ack = Instant::now();
                let mut i = 0u64;
                while !stopped.load(Ordering::SeqCst) {
                    let key = format!("w{i}");
                    i += 1;
                    let value = bytes::Bytes::from(key.clone().into_bytes());
                    match client.put(value.clone(), value).await {
                        Ok(_) => {
                            let now = Instant::now();
                            if now - last_ack > report.longest_gap {
                                report.longest_gap = now - last_ack;
                                report.longest_gap_ended = now - started;
                            }
                            last_ack = now;
                            report.acked.push(key);
                            acked.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(_) => report.failed += 1,
                    }
                }
                report
            })
        });
        Writer {
            stop,
            acks,
            thread: Some(thread),
        }
    }

    /// Waits until `more` further puts are acknowledged: the cluster took
    /// writes while whatever the caller did happened.
    pub fn wait_for_acks(&self, more: u64) {
        use std::sync::atomic::Ordering;
        let target = self.acks.load(Ordering::SeqCst) + more;
        wait_for(
            &format!("{more} more acknowledged writes"),
            DEADLINE,
            || (self.acks.load(Ordering::SeqCst) >= target).then_some(()),
        );
    }

    /// Stops the writer and returns what it saw.
    pub fn stop(mut self) -> WriterReport {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread
            .take()
            .expect("writer running")
            .join()
            .expect("writer thread")
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Waits until the node behind `port` holds every key of `keys` (each
/// valued as itself), read from its own state machine.
pub fn wait_for_keys_on(port: u16, keys: &[String]) {
    let mut next = 0;
    wait_for(
        &format!("{} keys on port {port}", keys.len()),
        DEADLINE,
        || {
            while next < keys.len() {
                match stale_get(port, &keys[next]) {
                    Some(Some(value)) if value == keys[next].as_bytes() => next += 1,
                    _ => return None,
                }
            }
            Some(())
        },
    );
}
