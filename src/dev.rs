//! `corekv dev`: a local cluster for trying corekv out.
//!
//! Writes one config per node under `DIR/node{i}/corekv.toml` (node i:
//! client port `base + 100*i`, peer port `base + 100*i + 50`, admin port
//! `base + 100*i + 90`), starts one `corekv run` child per node, waits until
//! every shard has a leader, and stops the children on Ctrl-C or SIGTERM.
//! An existing directory is resumed: its configs and data are kept.
//!
//! With `--tls`, a throwaway CA and certificates go to `DIR/tls` (see
//! [`crate::certs`]) and every node serves TLS on all its ports, peers
//! authenticate each other, and clients need the client certificate.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;

use corekv_client::{block_on, Client, ClientOptions, ClientTls};
use corekv_node::config::{Config, PeerConfig};

use crate::certs::{write_dev_pki, DevPki};

/// Client and peer ports of a node are 50 apart, so a dev cluster has at
/// most 40 shards (the admin port sits at +90).
const MAX_DEV_SHARDS: u32 = 40;

/// Options of `corekv dev`.
#[derive(Args, Debug, Clone)]
pub struct DevArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: u64,
    /// Shards per node (default: cores / nodes, at least 1, since the nodes share this machine).
    #[arg(long)]
    pub shards: Option<u32>,
    /// Directory for configs, data and logs.
    #[arg(long, default_value = "./corekv-dev")]
    pub dir: PathBuf,
    /// Port base: node i listens for clients on base + 100*i.
    #[arg(long, default_value_t = 7000)]
    pub port_base: u16,
    /// Only write the config files; start nothing.
    #[arg(long)]
    pub no_start: bool,
    /// Generate a throwaway CA and certificates in DIR/tls and turn TLS on,
    /// with client certificates required.
    #[arg(long)]
    pub tls: bool,
}

/// `--dir`, absolute, so that the paths in the configs hold whatever
/// directory a node is started from.
fn absolute_dir(args: &DevArgs) -> PathBuf {
    std::path::absolute(&args.dir).unwrap_or_else(|_| args.dir.clone())
}

/// Where `--tls` keeps the certificates.
fn dev_pki(args: &DevArgs) -> DevPki {
    DevPki::in_dir(&absolute_dir(args).join("tls"))
}

/// Ports of node `i` (1-based) for a port base.
pub fn node_ports(base: u16, i: u64) -> anyhow::Result<(u16, u16, u16)> {
    let client = u64::from(base) + 100 * i;
    let (peer, admin) = (client + 50, client + 90);
    if admin > u64::from(u16::MAX) {
        bail!("--port-base {base} with node {i} needs port {admin}, above 65535");
    }
    Ok((client as u16, peer as u16, admin as u16))
}

/// Fails, naming the port and the node, if any port a node of `configs`
/// would listen on is taken.
pub fn check_ports_free(configs: &[Config]) -> anyhow::Result<()> {
    for config in configs {
        let node = config.node_id;
        let mut ports: Vec<(u32, &str)> = (0..config.shards)
            .flat_map(|s| {
                [
                    (u32::from(config.client_port) + s, "client"),
                    (u32::from(config.peer_port) + s, "peer"),
                ]
            })
            .collect();
        ports.push((u32::from(config.admin_port), "admin"));
        for (port, what) in ports {
            let port = u16::try_from(port)?;
            if let Err(e) = std::net::TcpListener::bind((config.listen_host.as_str(), port)) {
                bail!(
                    "{what} port {port} of node {node} is not free ({e}); another cluster \
                     may be running there: stop it or choose another --port-base"
                );
            }
        }
    }
    Ok(())
}

/// The configs of a dev cluster. With `--tls` they name the certificate
/// files [`write_configs`] writes; this function writes nothing.
pub fn configs(args: &DevArgs) -> anyhow::Result<Vec<Config>> {
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    // The nodes share this machine, so together they get one shard thread
    // per core. Measured on 2 cores (3 nodes, benches/scenarios.sh, median of
    // 3): 1 shard per node beat 2 in every write and read scenario, e.g. W64
    // 18.5k vs 14.5k puts/s at 54 vs 84 us of CPU per put.
    let shards = args.shards.unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        (cores / args.nodes).clamp(1, u64::from(MAX_DEV_SHARDS)) as u32
    });
    if shards == 0 || shards > MAX_DEV_SHARDS {
        bail!("--shards must be between 1 and {MAX_DEV_SHARDS}: node ports are 50 apart in a dev cluster");
    }
    let mut peers = Vec::new();
    for i in 1..=args.nodes {
        let (client_port, peer_port, admin_port) = node_ports(args.port_base, i)?;
        peers.push(PeerConfig {
            id: i,
            host: "127.0.0.1".to_string(),
            client_port,
            peer_port,
            admin_port: Some(admin_port),
        });
    }
    let dir = absolute_dir(args);
    let pki = args.tls.then(|| dev_pki(args));
    let cores: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .iter()
        .map(|core| core.id)
        .collect();
    let mut configs = Vec::new();
    for (i, peer) in peers.iter().enumerate() {
        let text = format!(
            "node_id = {id}\ndata_dir = {data:?}\nclient_port = {c}\npeer_port = {p}\nadmin_port = {a}\nshards = {shards}\n",
            id = peer.id,
            data = dir.join(format!("node{}", peer.id)).join("data").display().to_string(),
            c = peer.client_port,
            p = peer.peer_port,
            a = peer.admin_port.unwrap_or_default(),
        );
        let mut text = text;
        // The nodes share this machine: with fewer shards than cores, give
        // each node the next cores in turn instead of pinning every node's
        // shard 0 to core 0.
        if (shards as usize) < cores.len() {
            let cpus: Vec<String> = (0..shards as usize)
                .map(|s| cores[(i * shards as usize + s) % cores.len()].to_string())
                .collect();
            text.push_str(&format!("cpus = [{}]\n", cpus.join(", ")));
        }
        if let Some(pki) = &pki {
            text.push_str(&format!(
                "tls_cert_file = {cert:?}\ntls_key_file = {key:?}\ntls_ca_file = {ca:?}\n\
                 peer_tls = true\nclient_auth = \"cert\"\n",
                cert = pki.node_cert(peer.id).display().to_string(),
                key = pki.node_key(peer.id).display().to_string(),
                ca = pki.ca.display().to_string(),
            ));
        }
        for p in &peers {
            text.push_str(&format!(
                "\n[[peers]]\nid = {}\nhost = \"{}\"\nclient_port = {}\npeer_port = {}\nadmin_port = {}\n",
                p.id,
                p.host,
                p.client_port,
                p.peer_port,
                p.admin_port.unwrap_or_default()
            ));
        }
        let mut config = Config::from_toml_str(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
        // The default limit is half of the machine's memory for one node;
        // the dev nodes share the machine, so they share that half.
        config.max_memory_bytes /= args.nodes;
        configs.push(config);
    }
    Ok(configs)
}

fn config_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("node{id}")).join("corekv.toml")
}

/// Writes the config files (keeping existing ones) and, with `--tls`, the
/// certificates (keeping them if all are there, see [`write_dev_pki`]), and
/// returns the configs' paths.
pub fn write_configs(args: &DevArgs) -> anyhow::Result<Vec<PathBuf>> {
    let configs = configs(args)?;
    let paths: Vec<PathBuf> = configs
        .iter()
        .map(|config| config_path(&args.dir, config.node_id))
        .collect();
    // Every kept file is checked before anything is written, so a refused
    // resume leaves the directory as it was.
    for path in paths.iter().filter(|path| path.exists()) {
        // Resume: the cluster's identity and ports live in these files.
        let kept = Config::from_toml_str(&std::fs::read_to_string(path)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        // The kept file, not the flag, decides, so a flag that disagrees
        // would otherwise be ignored without a word.
        if kept.tls_enabled() != args.tls {
            let was = if kept.tls_enabled() {
                "with"
            } else {
                "without"
            };
            bail!(
                "{} was written {was} --tls and a restart keeps it: run {was} --tls, \
                 or use a new --dir",
                path.display()
            );
        }
    }
    if args.tls {
        // A node is named by the host of its peers entry, which clients get
        // in topology and leader hints, and by localhost, which people type.
        let nodes: Vec<(u64, Vec<String>)> = configs
            .iter()
            .map(|c| {
                (
                    c.node_id,
                    vec![c.advertise_host.clone(), "localhost".to_string()],
                )
            })
            .collect();
        let pki = dev_pki(args);
        write_dev_pki(&pki.dir, configs[0].cluster_id, &nodes)
            .with_context(|| format!("cannot write the certificates in {}", pki.dir.display()))?;
    }
    for (config, path) in configs.iter().zip(&paths) {
        if !path.exists() {
            std::fs::create_dir_all(path.parent().expect("config path has a parent"))?;
            std::fs::write(path, config.to_toml_string())
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    Ok(paths)
}

struct Children(Vec<(u64, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        for (id, child) in &mut self.0 {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        eprintln!("node {id} did not stop in time; killing it");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

/// Runs `corekv dev`.
pub fn run(args: DevArgs) -> anyhow::Result<()> {
    let paths = write_configs(&args)?;
    if args.no_start {
        for path in &paths {
            println!("{}", path.display());
        }
    }
    let tls_flags = args.tls.then(|| {
        let pki = dev_pki(&args);
        format!(
            "--cacert {} --cert {} --key {}",
            pki.ca.display(),
            pki.client_cert.display(),
            pki.client_key.display()
        )
    });
    if let Some(flags) = &tls_flags {
        println!("TLS on: pass {flags} (or COREKV_CACERT, COREKV_CERT, COREKV_KEY)");
    }
    if args.no_start {
        return Ok(());
    }
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(libc::SIGTERM, stop.clone())?;
    signal_hook::flag::register(libc::SIGINT, stop.clone())?;

    // A second cluster on the same ports would fail to bind, and the
    // readiness check (and any client) would then talk to the first one.
    check_ports_free(&configs(&args)?)?;
    let exe = std::env::current_exe().context("cannot find the corekv executable")?;
    let mut children = Children(Vec::new());
    for (i, path) in paths.iter().enumerate() {
        let id = i as u64 + 1;
        let log_path = path.with_file_name("corekv.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        let child = Command::new(&exe)
            .arg("run")
            .arg("--config")
            .arg(path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start a node")?;
        println!(
            "started node {id} (pid {}), log {}",
            child.id(),
            log_path.display()
        );
        children.0.push((id, child));
    }

    let configs = configs(&args)?;
    let endpoints: Vec<String> = configs
        .iter()
        .map(|c| format!("127.0.0.1:{}", c.client_port))
        .collect();
    let dead_child = || {
        children
            .0
            .iter_mut()
            .find_map(|(id, child)| match child.try_wait() {
                Ok(Some(status)) => Some(format!("node {id} ({status})")),
                _ => None,
            })
    };
    let client_tls = match args.tls {
        false => None,
        true => {
            let pki = dev_pki(&args);
            Some(ClientTls::from_files(
                &pki.ca,
                Some((&pki.client_cert, &pki.client_key)),
            )?)
        }
    };
    block_on(wait_for_leaders(
        &endpoints,
        client_tls,
        configs[0].shards,
        Duration::from_secs(60),
        &stop,
        dead_child,
    ))?;
    if stop.load(Ordering::Relaxed) {
        // Ctrl-C while starting: stop the children (Children's drop) and exit cleanly.
        println!("stopping");
        return Ok(());
    }
    println!();
    println!(
        "corekv dev cluster is up: {} nodes, {} shards each",
        args.nodes, configs[0].shards
    );
    let scheme = if args.tls { "https" } else { "http" };
    for c in &configs {
        println!(
            "  node {}: client 127.0.0.1:{}  admin {scheme}://127.0.0.1:{}",
            c.node_id, c.client_port, c.admin_port
        );
    }
    let mut flag = format!("--endpoints {}", endpoints.join(","));
    if let Some(flags) = &tls_flags {
        flag = format!("{flag} {flags}");
    }
    println!();
    println!("try:");
    println!("  corekv {flag} put a 1");
    println!("  corekv {flag} get a");
    println!("  corekv {flag} status");
    println!();
    println!(
        "Ctrl-C stops the cluster; data stays in {}",
        args.dir.display()
    );

    while !stop.load(Ordering::Relaxed) {
        for (id, child) in &mut children.0 {
            if let Some(status) = child.try_wait()? {
                bail!("node {id} exited ({status}); see its corekv.log");
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("stopping");
    Ok(())
}

/// Waits until every shard of every node reports a leader, or until `stop`
/// is set (then returns Ok: the caller checks `stop`). `dead_child` names a
/// node process that has exited, which fails the wait at once.
pub async fn wait_for_leaders(
    endpoints: &[String],
    tls: Option<ClientTls>,
    shards: u32,
    within: Duration,
    stop: &AtomicBool,
    mut dead_child: impl FnMut() -> Option<String>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        if let Some(which) = dead_child() {
            // A node that exited (a taken port, a bad data dir) will not come
            // back: say so now instead of waiting out the deadline.
            bail!("{which} exited during start-up; see its corekv.log");
        }
        let options = ClientOptions {
            endpoints: endpoints.to_vec(),
            request_timeout: Duration::from_secs(1),
            tls: tls.clone(),
            ..Default::default()
        };
        match Client::connect(options).await {
            Ok(client) => {
                let mut ready = true;
                for (id, addr) in client.node_addrs() {
                    match client.status_at(addr.parse()?).await {
                        Ok(status)
                            if status.shards.len() == shards as usize
                                && status.shards.iter().all(|s| s.leader_id != 0) => {}
                        Ok(_) => {
                            ready = false;
                            last = format!("node {id} has a shard without a leader");
                        }
                        Err(e) => {
                            ready = false;
                            last = format!("node {id}: {e}");
                        }
                    }
                }
                if ready {
                    return Ok(());
                }
            }
            Err(e) => last = e.to_string(),
        }
        monoio::time::sleep(Duration::from_millis(100)).await;
    }
    if stop.load(Ordering::Relaxed) {
        return Ok(());
    }
    bail!("cluster not ready: {last}")
}

#[cfg(test)]
mod tests {
    use corekv_node::config::ClientAuth;

    use super::*;

    fn args(shards: u32) -> DevArgs {
        DevArgs {
            nodes: 3,
            shards: Some(shards),
            dir: PathBuf::from("corekv-dev-test"),
            port_base: 7000,
            no_start: true,
            tls: false,
        }
    }

    #[test]
    fn nodes_with_fewer_shards_than_cores_are_pinned_to_different_cores() {
        let cores: Vec<usize> = core_affinity::get_core_ids()
            .unwrap_or_default()
            .iter()
            .map(|core| core.id)
            .collect();
        // By default the nodes share the cores: cores / nodes shards, at least 1.
        let default = configs(&DevArgs {
            shards: None,
            ..args(1)
        })
        .unwrap();
        let parallelism = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(default[0].shards as usize, (parallelism / 3).max(1));
        // As many shards as cores: every node may use every core.
        let all = configs(&args(cores.len().max(1) as u32)).unwrap();
        assert!(all.iter().all(|config| config.cpus.is_empty()));
        if cores.len() >= 2 {
            let one = configs(&args(1)).unwrap();
            let cpus: Vec<Vec<usize>> = one.iter().map(|config| config.cpus.clone()).collect();
            assert_eq!(
                cpus,
                vec![vec![cores[0]], vec![cores[1]], vec![cores[2 % cores.len()]]]
            );
        }
    }

    #[test]
    fn dev_nodes_share_the_default_memory_limit() {
        let one = Config::from_toml_str(
            "node_id = 1\ndata_dir = \"d\"\n[[peers]]\nid = 1\nhost = \"127.0.0.1\"\nclient_port = 7100\npeer_port = 7150\n",
        )
        .unwrap();
        assert!(
            one.max_memory_bytes > 0,
            "the default reads the machine's memory"
        );
        let configs = configs(&args(1)).unwrap();
        assert_eq!(configs.len(), 3);
        for config in &configs {
            assert_eq!(config.max_memory_bytes, one.max_memory_bytes / 3);
        }
    }

    fn tls_args(dir: &Path) -> DevArgs {
        DevArgs {
            dir: dir.join("dev"),
            tls: true,
            ..args(1)
        }
    }

    #[test]
    fn tls_configs_name_absolute_certificate_files_that_exist() {
        use rustls_pki_types::pem::PemObject as _;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

        let dir = tempfile::tempdir().unwrap();
        let args = tls_args(dir.path());
        let paths = write_configs(&args).unwrap();
        assert_eq!(paths.len(), 3);
        let ca = std::fs::read(dev_pki(&args).ca).unwrap();
        let ca = CertificateDer::from_pem_slice(&ca).unwrap();
        let anchors = [webpki::anchor_from_trusted_cert(&ca).unwrap()];
        for (path, expected) in paths.iter().zip(configs(&args).unwrap()) {
            let config = Config::from_toml_str(&std::fs::read_to_string(path).unwrap()).unwrap();
            // Read back whole: the TLS keys survive to_toml_string.
            assert_eq!(config, expected);
            assert!(config.peer_tls);
            assert_eq!(config.client_auth, ClientAuth::Cert);
            let files = [
                &config.tls_cert_file,
                &config.tls_key_file,
                &config.tls_ca_file,
            ];
            for file in files {
                let file = file.as_ref().expect("every TLS file is set");
                assert!(file.is_absolute(), "{}", file.display());
                assert!(file.exists(), "{}", file.display());
            }
            let cert = std::fs::read(config.tls_cert_file.unwrap()).unwrap();
            let cert = CertificateDer::from_pem_slice(&cert).unwrap();
            let key = std::fs::read(config.tls_key_file.unwrap()).unwrap();
            PrivateKeyDer::from_pem_slice(&key).unwrap();
            let cert = webpki::EndEntityCert::try_from(&cert).unwrap();
            cert.verify_for_usage(
                &[webpki::ring::ECDSA_P256_SHA256],
                &anchors,
                &[],
                rustls_pki_types::UnixTime::now(),
                webpki::KeyUsage::server_auth(),
                None,
                None,
            )
            .unwrap();
            let own = corekv_transport::peer_server_name(config.cluster_id, config.node_id);
            for name in [own.as_str(), "127.0.0.1", "localhost"] {
                let name = ServerName::try_from(name).unwrap();
                cert.verify_is_valid_for_subject_name(&name)
                    .unwrap_or_else(|e| panic!("node {}: {name:?}: {e}", config.node_id));
            }
        }
    }

    #[test]
    fn a_restarted_tls_cluster_keeps_its_ca() {
        let dir = tempfile::tempdir().unwrap();
        let args = tls_args(dir.path());
        write_configs(&args).unwrap();
        let ca = std::fs::read_to_string(dev_pki(&args).ca).unwrap();
        write_configs(&args).unwrap();
        assert_eq!(std::fs::read_to_string(dev_pki(&args).ca).unwrap(), ca);
    }

    #[test]
    fn plaintext_configs_round_trip_without_tls_keys() {
        let dir = tempfile::tempdir().unwrap();
        let args = DevArgs {
            tls: false,
            ..tls_args(dir.path())
        };
        for config in configs(&args).unwrap() {
            let text = config.to_toml_string();
            assert!(!text.contains("tls_"), "{text}");
            assert_eq!(Config::from_toml_str(&text).unwrap(), config);
        }
    }

    #[test]
    fn tls_cannot_be_switched_on_a_resumed_directory() {
        let dir = tempfile::tempdir().unwrap();
        let plain = DevArgs {
            tls: false,
            ..tls_args(dir.path())
        };
        write_configs(&plain).unwrap();
        let error = write_configs(&tls_args(dir.path()))
            .unwrap_err()
            .to_string();
        assert!(error.contains("without --tls"), "{error}");
        assert!(
            !dev_pki(&plain).dir.exists(),
            "a refused resume writes nothing"
        );

        let dir = tempfile::tempdir().unwrap();
        write_configs(&tls_args(dir.path())).unwrap();
        let plain = DevArgs {
            tls: false,
            ..tls_args(dir.path())
        };
        let error = write_configs(&plain).unwrap_err().to_string();
        assert!(error.contains("with --tls"), "{error}");
    }

    #[test]
    fn a_taken_port_is_named_before_any_node_starts() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let mut args = args(1);
        // Node 1's client port is base + 100.
        args.port_base = port - 100;
        let configs = configs(&args).unwrap();
        let error = check_ports_free(&configs).unwrap_err().to_string();
        assert!(error.contains("is not free"), "{error}");
        assert!(error.contains("--port-base"), "{error}");
        drop(taken);
    }
}
