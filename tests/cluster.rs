//! Runbook-style tests of the `corekv` binary: real processes on loopback.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{key_on_shard, wait_for, Cluster, RawClient, DEADLINE};
use corekv_proto::client::{
    request::Op, response, Consistency, ErrorCode, Get, Put, Request, Role,
};

fn put_request(id: u64, key: &str, value: &str, no_forward: bool) -> Request {
    Request {
        id,
        no_forward,
        op: Some(Op::Put(Put {
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::copy_from_slice(value.as_bytes()),
        })),
        ..Default::default()
    }
}

fn get_request(id: u64, key: &str, consistency: Consistency) -> Request {
    Request {
        id,
        no_forward: false,
        op: Some(Op::Get(Get {
            key: Bytes::copy_from_slice(key.as_bytes()),
            consistency: consistency as i32,
            local: false,
        })),
        ..Default::default()
    }
}

fn value_of(result: &Option<response::Result>) -> Option<String> {
    match result {
        Some(response::Result::Get(g)) if g.found => {
            Some(String::from_utf8_lossy(&g.value).into_owned())
        }
        _ => None,
    }
}

#[test]
fn one_node_crud_scan_and_restart() {
    let mut cluster = Cluster::start(1, 2);
    cluster.wait_for_leaders();

    let (code, out, err) = cluster.cli(&["put", "fruit/apple", "red"]);
    assert_eq!(code, 0, "put failed: {out} {err}");
    assert!(out.starts_with("OK version="), "{out}");
    let (code, out, _) = cluster.cli(&["get", "fruit/apple"]);
    assert_eq!((code, out.trim()), (0, "red"));

    let (code, _, err) = cluster.cli(&["get", "fruit/none"]);
    assert_eq!(code, 1, "a missing key exits 1: {err}");

    // CAS: creating needs version 0; a wrong version is refused with exit 1.
    let (code, out, _) = cluster.cli(&["--json", "cas", "counter", "--expect-version", "0", "1"]);
    assert_eq!(code, 0);
    let version: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let version = version["version"].as_u64().unwrap();
    let (code, _, err) = cluster.cli(&["cas", "counter", "--expect-version", "0", "2"]);
    assert_eq!(code, 1, "stale cas must fail: {err}");
    let (code, _, _) = cluster.cli(&[
        "cas",
        "counter",
        "--expect-version",
        &version.to_string(),
        "2",
    ]);
    assert_eq!(code, 0);
    let (_, out, _) = cluster.cli(&["get", "counter"]);
    assert_eq!(out.trim(), "2");

    for fruit in ["banana", "cherry", "date"] {
        assert_eq!(cluster.cli(&["put", &format!("fruit/{fruit}"), "x"]).0, 0);
    }
    assert_eq!(cluster.cli(&["put", "veg/leek", "green"]).0, 0);
    let (code, out, _) = cluster.cli(&["scan", "--prefix", "fruit/", "--limit", "3"]);
    assert_eq!(code, 0);
    let keys: Vec<&str> = out.lines().map(|l| l.split('\t').next().unwrap()).collect();
    assert_eq!(keys, ["fruit/apple", "fruit/banana", "fruit/cherry"]);

    let (code, out, _) = cluster.cli(&["del", "fruit/apple"]);
    assert_eq!((code, out.trim()), (0, "deleted"));
    assert_eq!(cluster.cli(&["get", "fruit/apple"]).0, 1);

    // Restart: everything acknowledged is still there.
    let status = cluster.node(1).terminate();
    assert!(status.success(), "SIGTERM exit: {status}");
    cluster.node(1).start();
    cluster.wait_for_leaders();
    let (code, out, _) = cluster.cli(&["get", "counter"]);
    assert_eq!((code, out.trim()), (0, "2"));
    let (_, out, _) = cluster.cli(&["scan", "--prefix", "fruit/"]);
    assert_eq!(out.lines().count(), 3, "{out}");
    assert_eq!(cluster.cli(&["get", "fruit/apple"]).0, 1);
}

#[test]
fn three_nodes_replicate_forward_and_redirect() {
    let mut cluster = Cluster::start(3, 2);
    let leaders = cluster.wait_for_leaders();

    // Exactly one leader per shard across the cluster.
    for shard in 0..cluster.shards {
        let leading: Vec<u64> = (1..=3)
            .filter(|&id| {
                cluster.status(id).unwrap().shards[shard as usize].role == Role::Leader as i32
            })
            .collect();
        assert_eq!(leading, vec![leaders[shard as usize]], "shard {shard}");
    }

    // A write through every node (any port, any shard) is read back
    // linearizably through every node.
    for writer in 1..=3u64 {
        for shard in 0..cluster.shards {
            let key = key_on_shard(&format!("w{writer}-"), shard, cluster.shards);
            let port = cluster.nodes[writer as usize - 1].client_port;
            let mut raw = RawClient::connect(port).unwrap();
            let response = raw.call(put_request(1, &key, "v", false)).unwrap();
            assert!(
                matches!(response.result, Some(response::Result::Write(_))),
                "put {key} via node {writer}: {response:?}"
            );
            for reader in 1..=3u64 {
                let port = cluster.nodes[reader as usize - 1].client_port;
                let mut raw = RawClient::connect(port).unwrap();
                let response = raw
                    .call(get_request(2, &key, Consistency::Linearizable))
                    .unwrap();
                assert_eq!(
                    value_of(&response.result).as_deref(),
                    Some("v"),
                    "node {reader}: {response:?}"
                );
            }
            // STALE reads on every replica see it once applied there.
            for reader in 1..=3u64 {
                let port = cluster.nodes[reader as usize - 1].client_port + shard as u16;
                wait_for("a stale read of an applied write", DEADLINE, || {
                    let mut raw = RawClient::connect(port).ok()?;
                    let response = raw.call(get_request(3, &key, Consistency::Stale)).ok()?;
                    (value_of(&response.result).as_deref() == Some("v")).then_some(())
                });
            }
        }
    }

    // no_forward at a follower: NOT_LEADER naming the right leader.
    let shard = 0;
    let leader = leaders[shard];
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let key = key_on_shard("nf", shard as u32, cluster.shards);
    let port = cluster.nodes[follower as usize - 1].client_port + shard as u16;
    let mut raw = RawClient::connect(port).unwrap();
    let response = raw.call(put_request(9, &key, "x", true)).unwrap();
    assert_eq!(response.id, 9);
    match response.result {
        Some(response::Result::Error(e)) => {
            assert_eq!(e.code, ErrorCode::NotLeader as i32, "{e:?}");
            assert_eq!(e.leader_id, leader);
            let leader_port = cluster.nodes[leader as usize - 1].client_port + shard as u16;
            assert_eq!(e.leader_addr, format!("127.0.0.1:{leader_port}"));
        }
        other => panic!("expected NOT_LEADER, got {other:?}"),
    }
    // Without no_forward the same follower forwards and the write lands.
    let response = raw.call(put_request(10, &key, "forwarded", false)).unwrap();
    assert!(
        matches!(response.result, Some(response::Result::Write(_))),
        "{response:?}"
    );
    let leader_port = cluster.nodes[leader as usize - 1].client_port;
    let mut raw = RawClient::connect(leader_port).unwrap();
    let response = raw
        .call(get_request(11, &key, Consistency::Linearizable))
        .unwrap();
    assert_eq!(value_of(&response.result).as_deref(), Some("forwarded"));
}

#[test]
fn stable_under_light_load_for_30_seconds() {
    let mut cluster = Cluster::start(3, 2);
    cluster.wait_for_leaders();
    let terms_before: Vec<Vec<u64>> = (1..=3)
        .map(|id| {
            cluster
                .status(id)
                .unwrap()
                .shards
                .iter()
                .map(|s| s.term)
                .collect()
        })
        .collect();
    let logs_before: Vec<usize> = cluster
        .nodes
        .iter()
        .map(|n| n.log().matches("connection lost").count())
        .collect();

    let started = Instant::now();
    let mut writes = 0u64;
    let mut raw = RawClient::connect(cluster.nodes[0].client_port).unwrap();
    while started.elapsed() < Duration::from_secs(30) {
        let key = format!("steady{}", writes % 50);
        let response = raw.call(put_request(writes, &key, "x", false)).unwrap();
        assert!(
            matches!(response.result, Some(response::Result::Write(_))),
            "write {writes}: {response:?}"
        );
        writes += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let terms_after: Vec<Vec<u64>> = (1..=3)
        .map(|id| {
            cluster
                .status(id)
                .unwrap()
                .shards
                .iter()
                .map(|s| s.term)
                .collect()
        })
        .collect();
    assert_eq!(
        terms_before, terms_after,
        "a term changed during steady load"
    );
    let logs_after: Vec<usize> = cluster
        .nodes
        .iter()
        .map(|n| n.log().matches("connection lost").count())
        .collect();
    assert_eq!(
        logs_before, logs_after,
        "a peer link dropped during steady load"
    );
    assert!(writes > 100, "only {writes} writes in 30 s");
}

#[test]
fn garbage_and_oversize_frames_close_only_that_connection() {
    use std::io::{Read, Write};
    let mut cluster = Cluster::start(1, 1);
    cluster.wait_for_leaders();
    let port = cluster.nodes[0].client_port;

    // A healthy client connected before the bad ones.
    let mut good = RawClient::connect(port).unwrap();
    assert!(matches!(
        good.call(put_request(1, "k", "v", false)).unwrap().result,
        Some(response::Result::Write(_))
    ));

    // Oversize: a 1 GiB length prefix; answered TOO_LARGE then closed.
    let mut big = RawClient::connect(port).unwrap();
    big.stream.write_all(&(1u32 << 30).to_be_bytes()).unwrap();
    let response = big.recv().expect("an error frame before the close");
    match response.result {
        Some(response::Result::Error(e)) => assert_eq!(e.code, ErrorCode::TooLarge as i32, "{e:?}"),
        other => panic!("expected TOO_LARGE, got {other:?}"),
    }
    assert!(big.recv().is_err(), "connection must be closed");

    // Garbage: a frame that is not a Request.
    let mut junk = RawClient::connect(port).unwrap();
    junk.stream
        .write_all(&[0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff])
        .unwrap();
    let mut rest = Vec::new();
    let _ = junk.stream.read_to_end(&mut rest);
    // Whatever it said before closing, it closed (read_to_end returned).

    // Oversized keys and values are refused with TOO_LARGE, connection kept.
    let big_key = "k".repeat(5000);
    let response = good.call(put_request(4, &big_key, "v", false)).unwrap();
    match response.result {
        Some(response::Result::Error(e)) => assert_eq!(e.code, ErrorCode::TooLarge as i32, "{e:?}"),
        other => panic!("expected TOO_LARGE for a 5000-byte key, got {other:?}"),
    }
    let big_value = "v".repeat((1 << 20) + 1);
    let response = good.call(put_request(5, "k2", &big_value, false)).unwrap();
    match response.result {
        Some(response::Result::Error(e)) => assert_eq!(e.code, ErrorCode::TooLarge as i32, "{e:?}"),
        other => panic!("expected TOO_LARGE for a 1 MiB + 1 value, got {other:?}"),
    }

    // The healthy client and new clients carry on.
    let response = good
        .call(get_request(2, "k", Consistency::Linearizable))
        .unwrap();
    assert_eq!(value_of(&response.result).as_deref(), Some("v"));
    let mut fresh = RawClient::connect(port).unwrap();
    let response = fresh.call(get_request(3, "k", Consistency::Stale)).unwrap();
    assert_eq!(value_of(&response.result).as_deref(), Some("v"));
    assert!(cluster.node(1).is_running());
}
