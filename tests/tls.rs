//! TLS through the real binary: a TLS cluster elects, replicates and
//! serves; clients without TLS or without a certificate, and a peer with
//! another node's certificate, are refused with errors that name the cause;
//! SIGHUP rotates the certificate for new connections while open ones go
//! on. (The kill -9 chaos test runs over TLS too: COREKV_TEST_TLS=1.)

mod common;

use std::io::Write as _;
use std::net::TcpStream;
use std::process::Command;

use common::{enable_tls, stale_get, wait_for, Cluster, COREKV, DEADLINE};
use corekv_client::{block_on, Client, ClientOptions};

fn log_has(cluster: &Cluster, id: u64, text: &str) -> bool {
    cluster.nodes[id as usize - 1].log().contains(text)
}

fn wait_for_log(cluster: &Cluster, ids: &[u64], text: &str) {
    wait_for(&format!("`{text}` in a node log"), DEADLINE, || {
        ids.iter()
            .any(|id| log_has(cluster, *id, text))
            .then_some(())
    });
}

/// Runs the CLI against `cluster` with exactly `flags` for TLS.
fn cli_with(cluster: &Cluster, flags: &[&str], args: &[&str]) -> (i32, String) {
    let output = Command::new(COREKV)
        .arg("--endpoints")
        .arg(cluster.nodes[0].endpoint())
        .arg("--timeout")
        .arg("3s")
        .args(flags)
        .args(args)
        .output()
        .expect("run corekv");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_tls_cluster_serves_and_names_why_it_refuses_a_client() {
    enable_tls();
    let mut cluster = Cluster::start(3, 2);
    cluster.wait_for_leaders();
    let keys: Vec<String> = (0..6).map(|i| format!("tls-key-{i}")).collect();
    for key in &keys {
        let (code, out, err) = cluster.cli(&["put", key, key]);
        assert_eq!(code, 0, "put {key} over TLS: {out} {err}");
    }
    // Replicated: every node's own state machine has every key.
    for node in &cluster.nodes {
        for key in &keys {
            wait_for(&format!("{key} on node {}", node.id), DEADLINE, || {
                stale_get(node.client_port, key)
                    .flatten()
                    .filter(|value| value == key.as_bytes())
                    .map(|_| ())
            });
        }
    }
    let (code, err) = cli_with(&cluster, &[], &["get", &keys[0]]);
    assert_ne!(code, 0, "a plaintext client must be refused");
    assert!(
        err.contains("the other side speaks TLS"),
        "the plaintext client is told the port speaks TLS: {err}"
    );
    let tls_dir = cluster.dir.path().join("tls");
    let ca = tls_dir.join("ca.pem").display().to_string();
    let (code, err) = cli_with(&cluster, &["--cacert", &ca], &["get", &keys[0]]);
    assert_ne!(code, 0, "a client without a certificate must be refused");
    assert!(
        err.contains("CertificateRequired"),
        "the client is told a certificate is required: {err}"
    );
    wait_for_log(&cluster, &[1], "not a TLS handshake (first byte 0x00)");
    wait_for_log(&cluster, &[1], "client TLS handshake failed");
    let metrics =
        corekv::scrape::get(&cluster.nodes[0].admin_addr(), "/metrics").expect("scrape node 1");
    let failures = corekv::scrape::metric_sum(&metrics, "client_tls_handshake_failures_total");
    assert!(
        failures.is_some_and(|n| n >= 2.0),
        "both refusals are counted: {failures:?}"
    );
    // The admin port speaks HTTPS (the scrape above), and nothing else.
    let mut plain = TcpStream::connect(cluster.nodes[0].admin_addr()).expect("connect admin");
    plain
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .expect("timeout");
    plain
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut plain, &mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plain HTTP must not be served on a TLS admin port: {:?}",
        String::from_utf8_lossy(&answer)
    );
    // With admin_client_auth = cert, HTTPS without a client certificate is
    // refused (the scrapes above present the test client's).
    let ca_only = corekv_client::ClientTls::from_files(std::path::Path::new(&ca), None)
        .expect("TLS with the CA only")
        .rustls_config();
    let name = "127.0.0.1".try_into().expect("server name");
    let tls = rustls::ClientConnection::new(ca_only, name).expect("TLS client");
    let tcp = TcpStream::connect(cluster.nodes[0].admin_addr()).expect("connect admin");
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .expect("timeout");
    let mut https = rustls::StreamOwned::new(tls, tcp);
    let _ = https.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut answer = Vec::new();
    let read = std::io::Read::read_to_end(&mut https, &mut answer);
    assert!(
        read.as_ref()
            .is_err_and(|e| e.to_string().contains("CertificateRequired")),
        "the admin port must refuse a client without a certificate: {read:?} {:?}",
        String::from_utf8_lossy(&answer)
    );
    // The node kept serving through all of that.
    let (code, out, err) = cluster.cli(&["get", &keys[1]]);
    assert_eq!((code, out.trim()), (0, keys[1].as_str()), "{err}");
}

#[test]
fn a_peer_with_the_certificate_of_another_node_is_refused() {
    let pki = enable_tls();
    let mut cluster = Cluster::configure(3, 1, "");
    // Node 3 presents node 2's certificate (signed by the right CA).
    let tls_dir = cluster.dir.path().join("tls");
    let node2 = pki
        .authority
        .node(7, 2, &["127.0.0.1".to_string()])
        .expect("node 2 certificate");
    std::fs::write(tls_dir.join("node3.pem"), &node2.cert_pem).expect("write");
    std::fs::write(tls_dir.join("node3-key.pem"), &node2.key_pem).expect("write");
    for node in &mut cluster.nodes {
        node.start();
    }
    // Nodes 1 and 2 are a quorum and go on.
    wait_for("a leader among nodes 1 and 2", DEADLINE, || {
        let one = cluster.status(1)?.shards.first()?.leader_id;
        let two = cluster.status(2)?.shards.first()?.leader_id;
        (one != 0 && one == two && one != 3).then_some(())
    });
    wait_for_log(
        &cluster,
        &[1, 2],
        "claims node 3 with the certificate of node 2",
    );
    wait_for_log(&cluster, &[3], "certificate refused");
    let (code, out, err) = cluster.cli(&["put", "k", "v"]);
    assert_eq!(code, 0, "the two honest nodes still write: {out} {err}");
}

/// The DER of the certificate node `port` presents to a new connection.
fn served_certificate(pki: &common::TestPki, port: u16) -> Vec<u8> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("IP");
    let mut conn = rustls::ClientConnection::new(pki.raw.clone(), name).expect("TLS client");
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).expect("TLS handshake");
    }
    conn.peer_certificates().expect("a certificate")[0].to_vec()
}

fn der_of(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject as _;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("certificate PEM")
        .to_vec()
}

#[test]
fn sighup_rotates_the_certificate_for_new_connections_only() {
    let pki = enable_tls();
    let mut cluster = Cluster::start(1, 1);
    cluster.wait_for_leaders();
    let port = cluster.nodes[0].client_port;
    let tls_dir = cluster.dir.path().join("tls");
    let first = std::fs::read_to_string(tls_dir.join("node1.pem")).expect("node 1 cert");
    assert_eq!(served_certificate(pki, port), der_of(&first));

    // A client connected before the rotation.
    let endpoint = cluster.nodes[0].endpoint();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let tls = pki.client_tls.clone();
    let old = std::thread::spawn(move || {
        block_on(async move {
            let client = Client::connect(ClientOptions {
                endpoints: vec![endpoint],
                tls: Some(tls),
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
            client
                .put("before".into(), "1".into())
                .await
                .map_err(|e| e.to_string())?;
            let _ = done_tx.send(Ok(()));
            rx.recv().map_err(|e| e.to_string())?;
            client
                .put("after".into(), "2".into())
                .await
                .map_err(|e| e.to_string())?;
            Ok::<(), String>(())
        })
    });
    done_rx
        .recv_timeout(DEADLINE)
        .expect("the old client connected")
        .expect("the old client wrote");

    let rotated = pki
        .authority
        .node(7, 1, &["127.0.0.1".to_string()])
        .expect("rotated certificate");
    write_atomically(&tls_dir.join("node1.pem"), &rotated.cert_pem);
    write_atomically(&tls_dir.join("node1-key.pem"), &rotated.key_pem);
    let pid = cluster.nodes[0].pid().expect("node 1 runs") as i32;
    // SAFETY: kill(2) with a pid this test started and still holds.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    wait_for_log(&cluster, &[1], "TLS certificate, key and CA reloaded");
    assert_eq!(
        served_certificate(pki, port),
        der_of(&rotated.cert_pem),
        "a new connection gets the rotated certificate"
    );
    tx.send(()).expect("the old client waits");
    old.join()
        .expect("old client thread")
        .expect("the connection opened before the rotation still writes");

    // A broken file on the next SIGHUP keeps the rotated certificate.
    write_atomically(&tls_dir.join("node1.pem"), "not a certificate");
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    wait_for_log(&cluster, &[1], "TLS reload failed");
    assert_eq!(served_certificate(pki, port), der_of(&rotated.cert_pem));
    assert!(cluster.nodes[0].is_running());
}

/// Replaces `path` in one rename, as a deploy tool would.
fn write_atomically(path: &std::path::Path, text: &str) {
    let staged = path.with_extension("new");
    let mut file = std::fs::File::create(&staged).expect("create");
    file.write_all(text.as_bytes()).expect("write");
    file.sync_all().expect("sync");
    std::fs::rename(&staged, path).expect("rename");
}
