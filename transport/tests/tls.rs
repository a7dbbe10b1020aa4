//! TLS connections end to end on loopback: frames both ways (one larger
//! than a TLS record), peer identity, and the failures an operator must be
//! able to read: an unknown CA, an expired certificate, and plaintext on
//! one side only.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::{listen, run};
use corekv_transport::rustls::{ClientConfig, ServerConfig};
use corekv_transport::{
    certificate_names, client_config, encode_frame_bytes, peer_server_name, plain, server_config,
    server_name, spawn_writer, tls_accept, tls_connect, FrameError, FrameReader, IdentityFiles,
    TlsError,
};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

const CLUSTER: u64 = 7;
const TIMEOUT: Duration = Duration::from_secs(20);

struct Ca {
    cert: Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).expect("self-signed CA");
    Ca { cert, key }
}

/// A node certificate for `node`, valid for `days_valid` days counted from
/// `start_days` days from now (negative: in the past).
fn node_cert(ca: &Ca, node: u64, start_days: i64, days_valid: i64) -> (String, String) {
    let key = KeyPair::generate().expect("node key");
    let names = vec![peer_server_name(CLUSTER, node), "127.0.0.1".to_string()];
    let mut params = CertificateParams::new(names).expect("node params");
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let day = Duration::from_secs(86_400);
    let at = |days: i64| {
        let now = SystemTime::now();
        let moment = if days >= 0 {
            now + day * days as u32
        } else {
            now - day * (-days) as u32
        };
        moment.into()
    };
    params.not_before = at(start_days);
    params.not_after = at(start_days + days_valid);
    let cert = params
        .signed_by(&key, &ca.cert, &ca.key)
        .expect("node certificate");
    (cert.pem(), key.serialize_pem())
}

struct Files {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    node1: IdentityFiles,
    node2: IdentityFiles,
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write PEM");
    path
}

fn files(authority: &Ca, node2_start_days: i64) -> Files {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = write(dir.path(), "ca.pem", &authority.cert.pem());
    let identity = |node: u64, start: i64| {
        let (cert, key) = node_cert(authority, node, start, 365);
        IdentityFiles {
            cert: write(dir.path(), &format!("node{node}.pem"), &cert),
            key: write(dir.path(), &format!("node{node}-key.pem"), &key),
        }
    };
    let node1 = identity(1, -1);
    let node2 = identity(2, node2_start_days);
    Files {
        _dir: dir,
        ca,
        node1,
        node2,
    }
}

#[test]
fn frames_cross_a_mutual_tls_connection_both_ways() {
    let authority = ca("test CA");
    let files = files(&authority, -1);
    let server = server_config(&files.ca, &files.node1, true).expect("server config");
    let client = client_config(&files.ca, Some(&files.node2)).expect("client config");
    run(async move {
        let (listener, addr) = listen();
        let echo = monoio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let accepted = tls_accept(stream, server, TIMEOUT)
                .await
                .expect("accept TLS");
            let certificate = accepted.peer_certificate.expect("client certificate");
            let sender = spawn_writer(accepted.write, 64 << 20);
            let mut reader = FrameReader::new(accepted.read, 4 << 20);
            while let Ok(Some(frame)) = reader.next_frame().await {
                let mut echo = Vec::with_capacity(frame.len() + 4);
                echo.extend_from_slice(&(frame.len() as u32).to_be_bytes());
                echo.extend_from_slice(&frame);
                sender.send(Bytes::from(echo)).expect("queue echo");
            }
            certificate
        });
        let stream = corekv_transport::connect(addr, &Default::default())
            .await
            .expect("connect");
        let name = server_name(&peer_server_name(CLUSTER, 1)).expect("name");
        let (read, write) = tls_connect(stream, client, name, TIMEOUT)
            .await
            .expect("TLS handshake");
        let sender = spawn_writer(write, 64 << 20);
        let mut reader = FrameReader::new(read, 4 << 20);
        // One byte, one frame of several TLS records, then a burst.
        let sizes = [1usize, 3 << 20, 100, 200, 300];
        for (i, size) in sizes.iter().enumerate() {
            let payload = vec![i as u8; *size];
            let mut frame = (*size as u32).to_be_bytes().to_vec();
            frame.extend_from_slice(&payload);
            sender.send(Bytes::from(frame)).expect("queue frame");
        }
        for (i, size) in sizes.iter().enumerate() {
            let echo = reader
                .next_frame()
                .await
                .expect("read echo")
                .expect("an echo, not EOF");
            assert_eq!(echo.len(), *size, "echo {i} has the size sent");
            assert!(echo.iter().all(|b| *b == i as u8), "echo {i} intact");
        }
        sender.close();
        drop(reader);
        let certificate = echo.await;
        certificate_names(&certificate, &peer_server_name(CLUSTER, 2))
            .expect("the client's certificate names node 2");
        let wrong = certificate_names(&certificate, &peer_server_name(CLUSTER, 3));
        assert!(
            wrong.is_err(),
            "node 2's certificate must not pass as node 3"
        );
    });
}

/// A client stream connected to a fresh listener, whose one accepted
/// stream `serve` handles on a task of its own.
async fn connect_to<F, T>(
    serve: impl FnOnce(monoio::net::TcpStream) -> F + 'static,
) -> (monoio::net::TcpStream, monoio::task::JoinHandle<T>)
where
    F: std::future::Future<Output = T> + 'static,
    T: 'static,
{
    let (listener, addr) = listen();
    let server_side = monoio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        serve(stream).await
    });
    let stream = corekv_transport::connect(addr, &Default::default())
        .await
        .expect("connect");
    (stream, server_side)
}

/// A handshake that must fail: the client's error and the server's.
fn failed_handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    node: u64,
) -> (TlsError, Option<TlsError>) {
    run(async move {
        let (stream, server_side) =
            connect_to(|stream| async move { tls_accept(stream, server, TIMEOUT).await.err() })
                .await;
        let name = server_name(&peer_server_name(CLUSTER, node)).expect("name");
        let client_error = tls_connect(stream, client, name, TIMEOUT)
            .await
            .err()
            .expect("the handshake must fail");
        (client_error, server_side.await)
    })
}

#[test]
fn a_server_signed_by_another_ca_is_refused_on_both_sides() {
    let ours = ca("our CA");
    let theirs = ca("their CA");
    let ours_files = files(&ours, -1);
    let theirs_files = files(&theirs, -1);
    let server = server_config(&theirs_files.ca, &theirs_files.node1, true).expect("server");
    let client = client_config(&ours_files.ca, Some(&ours_files.node2)).expect("client");
    let (client_error, server_error) = failed_handshake(server, client, 1);
    let text = client_error.to_string();
    assert!(text.contains("UnknownIssuer"), "client error: {text}");
    let text = server_error
        .expect("the server sees the failure too")
        .to_string();
    assert!(text.contains("UnknownCA"), "server error: {text}");
}

#[test]
fn an_expired_certificate_is_named_as_expired() {
    let authority = ca("test CA");
    // node 2's certificate ended 10 days ago.
    let files = files(&authority, -375);
    let server = server_config(&files.ca, &files.node2, true).expect("server");
    let client = client_config(&files.ca, Some(&files.node1)).expect("client");
    let (client_error, server_error) = failed_handshake(server, client, 2);
    assert!(
        client_error.to_string().to_lowercase().contains("expired"),
        "client error: {client_error}"
    );
    assert!(server_error.is_some(), "the server fails too");
}

#[test]
fn a_plaintext_client_on_a_tls_port_is_told_on_both_sides() {
    let authority = ca("test CA");
    let files = files(&authority, -1);
    let server = server_config(&files.ca, &files.node1, false).expect("server");
    run(async move {
        let (stream, server_side) =
            connect_to(|stream| async move { tls_accept(stream, server, TIMEOUT).await.err() })
                .await;
        let (read, write) = plain(stream);
        let sender = spawn_writer(write, 1 << 20);
        sender
            .send(encode_frame_bytes(&corekv_proto::client::Request::default()))
            .expect("queue");
        let mut reader = FrameReader::new(read, 1 << 20);
        let error = reader.next_frame().await.err();
        assert!(
            matches!(error, Some(FrameError::TlsRecord)),
            "the plaintext client reads the alert as a TLS record: {error:?}"
        );
        let server_error = server_side.await;
        assert!(
            matches!(server_error, Some(TlsError::PlaintextClient { first: 0 })),
            "server: {server_error:?}"
        );
    });
}

#[test]
fn a_tls_client_on_a_plaintext_port_is_told_on_both_sides() {
    let authority = ca("test CA");
    let files = files(&authority, -1);
    let client = client_config(&files.ca, None).expect("client");
    run(async move {
        let (stream, server_side) = connect_to(|stream| async move {
            let (read, _write) = plain(stream);
            FrameReader::new(read, 1 << 20).next_frame().await.err()
        })
        .await;
        let name = server_name("127.0.0.1").expect("name");
        let client_side =
            monoio::spawn(async move { tls_connect(stream, client, name, TIMEOUT).await.err() });
        let server_error = server_side.await;
        assert!(
            matches!(server_error, Some(FrameError::TlsRecord)),
            "the plaintext server sees a TLS record: {server_error:?}"
        );
        // The server has closed: the client's handshake ends.
        let error = client_side.await;
        assert!(
            matches!(error, Some(TlsError::Closed | TlsError::Io(_))),
            "client: {error:?}"
        );
    });
}
