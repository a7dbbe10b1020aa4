//! The Rust client library (corekv-client) against real nodes: what its
//! crate docs promise, call by call.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{key_on_shard, Cluster};
use corekv_client::{
    block_on, Client, ClientError, ClientOptions, Consistency, ErrorCode, ReadFrom,
};

fn options(cluster: &Cluster) -> ClientOptions {
    ClientOptions {
        endpoints: cluster.endpoints().split(',').map(str::to_string).collect(),
        request_timeout: Duration::from_secs(20),
        ..ClientOptions::default()
    }
}

fn b(text: &str) -> Bytes {
    Bytes::copy_from_slice(text.as_bytes())
}

#[test]
fn put_get_cas_delete_and_scan_through_the_client_library() {
    let mut cluster = Cluster::start(3, 2);
    cluster.wait_for_leaders();
    let options = options(&cluster);
    block_on(async move {
        let client = Client::connect(options).await.expect("connect");
        assert_eq!(client.topology().shards, 2);

        // Versions are the Raft index of the write: they grow per key.
        let v1 = client.put(b("user/1"), b("ada")).await.unwrap();
        let v2 = client.put(b("user/1"), b("ada2")).await.unwrap();
        assert!(v2 > v1, "versions must grow: {v1} then {v2}");
        for consistency in [Consistency::Linearizable, Consistency::Lease] {
            let got = client.get(b("user/1"), consistency).await.unwrap();
            assert_eq!(got, Some((b("ada2"), v2)), "{consistency:?}");
        }
        assert_eq!(
            client
                .get(b("user/none"), Consistency::Linearizable)
                .await
                .unwrap(),
            None
        );

        // CAS at a stale version is refused and says which version is current.
        match client.cas(b("user/1"), v1, b("grace")).await {
            Err(ClientError::Server {
                code: ErrorCode::VersionMismatch,
                current_version,
                ..
            }) => assert_eq!(current_version, v2),
            other => panic!("expected VERSION_MISMATCH, got {other:?}"),
        }
        let v3 = client.cas(b("user/1"), v2, b("grace")).await.unwrap();
        assert!(v3 > v2);
        let created = client.cas(b("user/2"), 0, b("new")).await.unwrap();
        assert!(created > v3, "a CAS at version 0 creates the key");

        // Delete: at the wrong version refused, at the right one done, then gone.
        assert!(matches!(
            client.delete(b("user/2"), Some(1)).await,
            Err(ClientError::Server {
                code: ErrorCode::VersionMismatch,
                ..
            })
        ));
        assert!(client.delete(b("user/2"), None).await.unwrap());
        assert!(!client.delete(b("user/2"), None).await.unwrap());

        // Scan fans out to both shards and merges in key order, cut at the limit.
        let keys: Vec<String> = (0..2)
            .flat_map(|shard| (0..3).map(move |i| key_on_shard(&format!("scan/{i}/"), shard, 2)))
            .collect();
        for key in &keys {
            client.put(b(key), b("x")).await.unwrap();
        }
        let mut sorted = keys.clone();
        sorted.sort();
        let all = client
            .scan(b("scan/"), b("scan0"), 0, Consistency::Linearizable)
            .await
            .unwrap();
        let got: Vec<String> = all
            .pairs
            .iter()
            .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
            .collect();
        assert_eq!((got, all.more), (sorted.clone(), false));
        let page = client
            .scan(b("scan/"), b("scan0"), 4, Consistency::Stale)
            .await
            .unwrap();
        assert_eq!(page.pairs.len(), 4);
        assert!(page.more, "a scan cut by its limit says there is more");
    })
}

#[test]
fn errors_name_the_problem() {
    let mut cluster = Cluster::start(1, 1);
    cluster.wait_for_leaders();
    let options = options(&cluster);
    block_on(async move {
        let client = Client::connect(options).await.expect("connect");
        // An empty key is the caller's mistake: no retry, a clear code.
        match client.put(Bytes::new(), b("v")).await {
            Err(ClientError::Server {
                code: ErrorCode::InvalidArgument,
                message,
                ..
            }) => assert!(message.contains("empty key"), "{message}"),
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
        // A key above the server's limit (4096 bytes by default).
        let long = Bytes::from(vec![b'k'; 5000]);
        assert!(matches!(
            client.put(long, b("v")).await,
            Err(ClientError::Server {
                code: ErrorCode::TooLarge,
                ..
            })
        ));
    });

    // Nothing listens on the endpoint: NoEndpoint, naming it, within the deadline.
    drop(cluster);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = listener.local_addr().unwrap().to_string();
    drop(listener);
    let error = block_on(Client::connect(ClientOptions {
        endpoints: vec![dead.clone()],
        request_timeout: Duration::from_secs(2),
        ..ClientOptions::default()
    }))
    .err()
    .expect("connecting to a closed port must fail");
    assert!(matches!(error, ClientError::NoEndpoint(_)), "{error:?}");
    assert!(error.to_string().contains(&dead), "{error}");
}

#[test]
fn a_tls_client_against_a_plaintext_cluster_is_told_tls_is_off() {
    let mut cluster = Cluster::start(1, 1);
    cluster.wait_for_leaders();
    let ca = corekv::certs::Authority::new("some CA").expect("CA");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).expect("write CA");
    let tls = corekv_client::ClientTls::from_files(&ca_file, None).expect("client TLS");
    let error = block_on(Client::connect(ClientOptions {
        request_timeout: Duration::from_secs(5),
        tls: Some(tls),
        ..options(&cluster)
    }))
    .err()
    .expect("TLS against a plaintext port must fail");
    let text = error.to_string();
    assert!(
        text.contains("is TLS off on that port") || text.contains("during the TLS handshake"),
        "the client names the cause: {text}"
    );
    // The node saw a TLS hello where a frame belongs, said so, and serves on.
    common::wait_for("the node to name the TLS hello", common::DEADLINE, || {
        cluster.nodes[0]
            .log()
            .contains("got a TLS record where a corekv frame was expected")
            .then_some(())
    });
    let (code, _, err) = cluster.cli(&["put", "k", "v"]);
    assert_eq!(code, 0, "{err}");
}

/// `client_follower_reads_total` of shard 0 on every node, by node id.
fn follower_reads(cluster: &Cluster) -> Vec<(u64, f64)> {
    cluster
        .nodes
        .iter()
        .map(|node| {
            let text = corekv::scrape::get(&node.admin_addr(), "/metrics").expect("scrape");
            let reads =
                corekv::scrape::metric_value(&text, "client_follower_reads_total{shard=\"0\"}");
            (node.id, reads.unwrap_or(0.0))
        })
        .collect()
}

#[test]
fn follower_reads_are_served_by_followers_and_stay_linearizable() {
    let mut cluster = Cluster::start(3, 1);
    let leader = cluster.wait_for_leaders()[0];
    let writer_options = options(&cluster);
    let follower_options = ClientOptions {
        read_from: ReadFrom::Follower,
        ..options(&cluster)
    };
    // Nearest: the first endpoint is a follower's.
    let nearest = cluster.nodes.iter().find(|n| n.id != leader).unwrap().id;
    let mut endpoints = vec![cluster.nodes[nearest as usize - 1].endpoint()];
    endpoints.extend(cluster.nodes.iter().map(|n| n.endpoint()));
    let nearest_options = ClientOptions {
        read_from: ReadFrom::Nearest,
        endpoints,
        ..options(&cluster)
    };
    let rounds = 60;
    block_on(async move {
        let writer = Client::connect(writer_options).await.expect("connect");
        let reader = Client::connect(follower_options).await.expect("connect");
        for i in 0..rounds {
            let value = b(&format!("v{i}"));
            let version = writer.put(b("counter"), value.clone()).await.unwrap();
            // A read that starts after the write's answer sees it, although
            // a follower (which may not have applied it yet) serves it.
            let consistency = if i % 2 == 0 {
                Consistency::Linearizable
            } else {
                Consistency::Lease
            };
            let got = reader.get(b("counter"), consistency).await.unwrap();
            assert_eq!(got, Some((value, version)), "read {i} ({consistency:?})");
        }
        let scanned = reader
            .scan(b("counter"), b("counter0"), 10, Consistency::Linearizable)
            .await
            .unwrap();
        assert_eq!(scanned.pairs.len(), 1);
        assert_eq!(scanned.pairs[0].value, b(&format!("v{}", rounds - 1)));
    });
    let after_follower = follower_reads(&cluster);
    let on = |reads: &[(u64, f64)], id: u64| reads.iter().find(|(n, _)| *n == id).unwrap().1;
    assert_eq!(on(&after_follower, leader), 0.0, "{after_follower:?}");
    let by_followers: f64 = after_follower.iter().map(|(_, r)| r).sum();
    assert!(by_followers >= f64::from(rounds + 1), "{after_follower:?}");

    block_on(async move {
        let reader = Client::connect(nearest_options).await.expect("connect");
        for _ in 0..20 {
            let got = reader
                .get(b("counter"), Consistency::Linearizable)
                .await
                .unwrap();
            assert!(got.is_some());
        }
    });
    let after_nearest = follower_reads(&cluster);
    assert!(
        on(&after_nearest, nearest) >= on(&after_follower, nearest) + 20.0,
        "the nearest node serves them: {after_follower:?} then {after_nearest:?}"
    );
    assert_eq!(on(&after_nearest, leader), 0.0, "{after_nearest:?}");

    // The CLI's --read-from.
    let (code, out, err) = cluster.cli(&["get", "--read-from", "follower", "counter"]);
    assert_eq!(
        (code, out.trim()),
        (0, format!("v{}", rounds - 1).as_str()),
        "{err}"
    );
    let (code, _, err) = cluster.cli(&["get", "--read-from", "sideways", "counter"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn a_write_moves_on_from_a_paused_leader_to_the_next_one_within_its_deadline() {
    let mut cluster = Cluster::start(3, 1);
    let leader = cluster.wait_for_leaders()[0];
    let paused = cluster.nodes.iter().find(|n| n.id == leader).unwrap();
    let pid = paused.pid().expect("running") as i32;
    let options = ClientOptions {
        request_timeout: Duration::from_secs(4),
        ..options(&cluster)
    };
    assert!(options.exactly_once, "the default");
    block_on(async move {
        let client = Client::connect(options).await.expect("connect");
        client.put(b("k"), b("v0")).await.unwrap();
        // The leader stops answering; the others elect a new one within
        // about half a second. A write in the session must reach it (after
        // a quarter of its 4 s deadline), not wait for all of it.
        // SAFETY: a signal to a child process this test started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        let mut last = 0;
        for i in 1..=4 {
            let value = format!("v{i}");
            let version = client.put(b("k"), Bytes::from(value)).await;
            last = version.unwrap_or_else(|e| panic!("write {i}: {e}"));
        }
        // SAFETY: as above.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
        let got = client.get(b("k"), Consistency::Linearizable).await.unwrap();
        assert_eq!(got, Some((b("v4"), last)));
    });
}

/// Without a session a write is never sent twice: to a paused leader it
/// waits for its whole deadline (the connection's sweeper expires it), then
/// ends as OUTCOME_UNKNOWN, neither earlier nor never.
#[test]
fn a_write_outside_a_session_to_a_paused_leader_ends_unknown_at_its_deadline() {
    let mut cluster = Cluster::start(3, 1);
    let leader = cluster.wait_for_leaders()[0];
    let paused = cluster.nodes.iter().find(|n| n.id == leader).unwrap();
    let pid = paused.pid().expect("running") as i32;
    let timeout = Duration::from_secs(2);
    let options = ClientOptions {
        request_timeout: timeout,
        exactly_once: false,
        ..options(&cluster)
    };
    block_on(async move {
        let client = Client::connect(options).await.expect("connect");
        client.put(b("k"), b("v0")).await.unwrap();
        // SAFETY: a signal to a child process this test started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        let started = std::time::Instant::now();
        // Generous: only a request that nothing expires takes this long.
        let result = monoio::time::timeout(timeout * 10, client.put(b("k"), b("v1"))).await;
        let took = started.elapsed();
        // SAFETY: as above.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
        match result {
            Ok(Err(ClientError::OutcomeUnknown { .. })) => {}
            Ok(other) => panic!("expected OUTCOME_UNKNOWN, got {other:?}"),
            Err(_) => panic!("no answer after {took:?}: the request never expired"),
        }
        assert!(
            took >= timeout,
            "gave up after {took:?}, before its deadline"
        );
    });
}

#[test]
fn a_read_moves_on_from_a_paused_node_within_its_deadline() {
    let mut cluster = Cluster::start(3, 1);
    let leader = cluster.wait_for_leaders()[0];
    let paused = cluster.nodes.iter().find(|n| n.id != leader).unwrap();
    let pid = paused.pid().expect("running") as i32;
    let options = ClientOptions {
        read_from: ReadFrom::Follower,
        request_timeout: Duration::from_secs(4),
        ..options(&cluster)
    };
    block_on(async move {
        let client = Client::connect(options).await.expect("connect");
        let version = client.put(b("k"), b("v")).await.unwrap();
        // A paused process: its kernel still accepts connections, nothing
        // answers. Reads sent to it must move on to the other follower
        // (after a quarter of the 4 s deadline), not wait for all of it.
        // SAFETY: a signal to a child process this test started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        for i in 0..6 {
            let got = client.get(b("k"), Consistency::Linearizable).await;
            assert_eq!(got.unwrap(), Some((b("v"), version)), "read {i}");
        }
        // SAFETY: as above.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    });
}

#[test]
fn an_unreachable_endpoint_is_named_once_in_the_error() {
    // A port nobody listens on: taken from the kernel, then let go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("127.0.0.1:{port}");
    let output = std::process::Command::new(common::COREKV)
        .args(["--endpoints", &endpoint, "--timeout", "2s", "get", "k"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert_eq!(stderr.matches(&endpoint).count(), 1, "{stderr}");
    assert!(stderr.contains("refused"), "{stderr}");
}

/// A request's future lives in the caller's task, one per request in
/// flight. At 9.4 KiB (the rare paths inline: connecting, a TLS handshake,
/// opening a session, a topology refresh, a retry's sleep; and a monoio
/// timer per request) 1024 requests in flight touched 9.7 MB, and a
/// pipelined `corekv bench` spent 11 % of its CPU on the cache misses of
/// writing a new one. The rare paths are boxed and the timeouts are kept
/// per connection; this keeps the futures small.
#[test]
fn request_futures_stay_small() {
    let mut cluster = Cluster::start(1, 1);
    cluster.wait_for_leaders();
    let options = options(&cluster);
    block_on(async move {
        let client = Client::connect(options).await.expect("connect");
        client.put(b("k"), b("v")).await.unwrap();
        let sizes = [
            ("put", std::mem::size_of_val(&client.put(b("k"), b("v")))),
            (
                "get",
                std::mem::size_of_val(&client.get(b("k"), Consistency::Linearizable)),
            ),
            (
                "delete",
                std::mem::size_of_val(&client.delete(b("k"), None)),
            ),
            ("cas", std::mem::size_of_val(&client.cas(b("k"), 1, b("v")))),
        ];
        for (call, size) in sizes {
            assert!(size <= MAX_REQUEST_FUTURE_BYTES, "{call}: {size} bytes");
        }
    });
}

const MAX_REQUEST_FUTURE_BYTES: usize = 1024;
