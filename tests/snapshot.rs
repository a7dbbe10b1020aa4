//! Snapshots: creation, WAL compaction, restart from a snapshot, and a
//! follower catching up through a snapshot after the leader compacted past it.

mod common;

use bytes::Bytes;
use common::{files_under, wait_for, Cluster, RawClient, DEADLINE};
use corekv::scrape::{self, metric_value};
use corekv_proto::client::{request::Op, response, Put, Request};

const SNAPSHOT_CONFIG: &str = "snapshot_entries = 200\nwal_segment_bytes = 1048576\n";

/// Writes `count` keys `key{i}` with 4 KiB values through `port`, pipelined.
fn write_many(port: u16, from: u64, count: u64) {
    let mut raw = RawClient::connect(port).unwrap();
    let value = Bytes::from(vec![b'v'; 4096]);
    for chunk_start in (from..from + count).step_by(100) {
        let chunk_end = (chunk_start + 100).min(from + count);
        for i in chunk_start..chunk_end {
            raw.send(&Request {
                id: i,
                no_forward: false,
                op: Some(Op::Put(Put {
                    key: Bytes::from(format!("key{i}")),
                    value: value.clone(),
                })),
                ..Default::default()
            })
            .unwrap();
        }
        for _ in chunk_start..chunk_end {
            let response = raw.recv().unwrap();
            assert!(
                matches!(response.result, Some(response::Result::Write(_))),
                "{response:?}"
            );
        }
    }
}

/// The length of the value the node behind `port` holds for `key` (STALE).
fn stale_get(port: u16, key: &str) -> Option<usize> {
    common::stale_get(port, key).flatten().map(|v| v.len())
}

fn wal_segments(cluster: &Cluster, id: u64) -> usize {
    files_under(&cluster.nodes[id as usize - 1].data_dir)
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .count()
}

#[test]
fn follower_catches_up_through_a_snapshot_after_compaction() {
    let mut cluster = Cluster::configure(3, 1, SNAPSHOT_CONFIG);
    for node in &mut cluster.nodes {
        node.start();
    }
    let leader = cluster.wait_for_leaders()[0];
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let leader_port = cluster.nodes[leader as usize - 1].client_port;

    write_many(leader_port, 0, 50);
    cluster.node(follower).kill9();

    // Enough 4 KiB writes to fill several 1 MiB segments; snapshots every
    // 200 entries let the leader delete the segments the follower would need.
    write_many(leader_port, 50, 1500);
    wait_for(
        "the leader to snapshot and compact its WAL",
        DEADLINE,
        || {
            let log = cluster.nodes[leader as usize - 1].log();
            (log.contains("snapshot created") && log.contains("WAL compacted")).then_some(())
        },
    );
    let leader_status = cluster.status(leader).unwrap().shards[0].clone();

    cluster.node(follower).start();
    wait_for(
        "the follower to apply up to the leader's index",
        DEADLINE,
        || {
            let status = cluster.status(follower)?.shards[0].clone();
            (status.applied_index >= leader_status.applied_index).then_some(())
        },
    );
    let log = cluster.nodes[follower as usize - 1].log();
    assert!(
        log.contains("snapshot received and verified"),
        "follower did not use a snapshot:\n{log}"
    );
    assert!(log.contains("snapshot applied"), "{log}");
    let follower_port = cluster.nodes[follower as usize - 1].client_port;
    for key in ["key0", "key49", "key777", "key1549"] {
        assert_eq!(
            stale_get(follower_port, key),
            Some(4096),
            "{key} on the follower"
        );
    }
    assert!(
        wal_segments(&cluster, leader) < 8,
        "the leader's WAL was not compacted: {} segments",
        wal_segments(&cluster, leader)
    );
}

/// One node with `SNAPSHOT_CONFIG`, leading its shard, and its client port.
fn single_snapshotting_node() -> (Cluster, u16) {
    let mut cluster = Cluster::configure(1, 1, SNAPSHOT_CONFIG);
    cluster.node(1).start();
    cluster.wait_for_leaders();
    let port = cluster.nodes[0].client_port;
    (cluster, port)
}

/// Waits until the first node's log holds `line`.
fn wait_for_first_log(cluster: &Cluster, what: &str, line: &str) {
    wait_for(what, DEADLINE, || {
        cluster.nodes[0].log().contains(line).then_some(())
    });
}

#[test]
fn restart_recovers_from_snapshot_plus_wal_tail() {
    let (mut cluster, port) = single_snapshotting_node();
    write_many(port, 0, 700);
    wait_for_first_log(&cluster, "a snapshot", "snapshot created");
    let applied = cluster.status(1).unwrap().shards[0].applied_index;
    assert!(cluster.node(1).terminate().success());
    cluster.node(1).start();
    cluster.wait_for_leaders();
    let log = cluster.nodes[0].log();
    assert!(log.contains("snapshot loaded"), "{log}");
    // Snapshot plus WAL tail bring it back to where it was, and the new
    // term's empty entry lands on top.
    wait_for(
        "the applied index to pass its value before the restart",
        DEADLINE,
        || {
            let status = cluster.status(1)?.shards[0].clone();
            (status.applied_index > applied).then_some(())
        },
    );
    for key in ["key0", "key350", "key699"] {
        assert_eq!(stale_get(port, key), Some(4096), "{key}");
    }
}

#[test]
fn segments_that_compaction_retires_are_reused_for_new_ones() {
    let (cluster, port) = single_snapshotting_node();
    let started = |name: &str| {
        let text = scrape::get(&cluster.nodes[0].admin_addr(), "/metrics").ok()?;
        metric_value(&text, &format!("{name}{{shard=\"0\"}}"))
    };
    // 4 KiB values fill a 1 MiB segment every ~250 writes; a snapshot
    // every 200 entries lets compaction retire the older ones.
    write_many(port, 0, 1500);
    wait_for_first_log(&cluster, "the WAL to be compacted", "WAL compacted");
    assert!(started("wal_new_segments_total").is_some_and(|n| n >= 1.0));
    // The segment prepared before the compaction is a new one; the ones
    // after it are made out of retired files.
    let mut next = 1500;
    wait_for("a segment made out of a retired one", DEADLINE, || {
        write_many(port, next, 300);
        next += 300;
        started("wal_reused_segments_total")
            .filter(|&reused| reused >= 1.0)
            .map(|_| ())
    });
    let free = files_under(&cluster.nodes[0].data_dir)
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "free"))
        .count();
    assert!(
        wal_segments(&cluster, 1) + free < 16,
        "{} live and {free} free segments for a log of a few MiB",
        wal_segments(&cluster, 1)
    );
}
