//! A full disk through the real binary: a node whose files may not grow
//! (RLIMIT_FSIZE, set on the running process with prlimit, so the test needs
//! no privileges) refuses writes, hands leadership over, reports it, keeps
//! serving reads, restarts on the still-full disk, and resumes by itself
//! when files may grow again. Nothing acknowledged is lost.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{stale_get, wait_for, Cluster, DEADLINE};
use corekv::scrape;
use corekv_client::{block_on, Client, ClientOptions};

/// Segments of 1 MiB (the smallest allowed) fill quickly; a file limit just
/// below that makes every new segment fail to preallocate.
const SEGMENT_BYTES: u64 = 1 << 20;
const LIMIT: u64 = SEGMENT_BYTES - 1;

/// Puts `keys` with one client (a client lives on the runtime it was
/// connected on, so one `block_on` for all of them), retrying each until it
/// is acknowledged: a refusal while the full node still leads is expected.
fn put_all(cluster: &Cluster, keys: &[String], value: &Bytes) {
    let endpoints: Vec<String> = cluster.endpoints().split(',').map(String::from).collect();
    block_on(async {
        let client = Client::connect(ClientOptions {
            endpoints,
            request_timeout: Duration::from_secs(5),
            ..Default::default()
        })
        .await
        .expect("connect");
        for key in keys {
            let deadline = Instant::now() + DEADLINE;
            loop {
                let key_bytes = Bytes::copy_from_slice(key.as_bytes());
                match client.put(key_bytes, value.clone()).await {
                    Ok(_) => break,
                    Err(error) => {
                        assert!(Instant::now() < deadline, "put {key}: {error}");
                        monoio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    });
}

fn keys(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}-{i}")).collect()
}

fn disk_full_reason(cluster: &Cluster, id: u64) -> Option<String> {
    let status = cluster.status(id)?;
    Some(status.shards[0].disk_full.clone())
}

#[test]
fn a_full_disk_refuses_writes_hands_over_serves_reads_and_resumes() {
    let mut cluster = Cluster::configure(3, 1, &format!("wal_segment_bytes = {SEGMENT_BYTES}\n"));
    for node in &mut cluster.nodes {
        node.start();
    }
    let full = cluster.wait_for_leaders()[0];
    let value = Bytes::from(vec![b'v'; 8 * 1024]);
    let mut acknowledged = keys("before", 20);
    put_all(&cluster, &acknowledged, &value);

    // The leader's files may no longer grow: once its active segment and
    // the one prepared ahead are full, it cannot make another.
    cluster.node(full).set_file_size_limit(Some(LIMIT));
    let during = keys("during", 600);
    put_all(&cluster, &during, &value);
    acknowledged.extend(during);
    let reason = wait_for("the node reports its full disk", DEADLINE, || {
        disk_full_reason(&cluster, full).filter(|r| !r.is_empty())
    });
    assert!(reason.starts_with("disk full on"), "{reason}");
    assert!(reason.contains("File too large"), "{reason}");
    let new_leader = wait_for("leadership off the full disk", DEADLINE, || {
        let status = cluster.status(full)?;
        let leader = status.shards[0].leader_id;
        (leader != 0 && leader != full).then_some(leader)
    });
    assert!(
        cluster.node(full).is_running(),
        "a full disk stopped the node"
    );
    let admin = cluster.node(full).admin_addr();
    let (code, body) = scrape::request("GET", &admin, "/health/ready").expect("health");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("disk full"), "{body}");
    let metrics = scrape::get(&admin, "/metrics").expect("metrics");
    assert_eq!(
        scrape::metric_value(&metrics, "wal_disk_full{shard=\"0\"}"),
        Some(1.0),
        "{metrics}"
    );
    // It still serves what it holds, and the cluster takes writes.
    let port = cluster.node(full).client_port;
    assert_eq!(stale_get(port, "before-0"), Some(Some(value.clone())));
    let after = keys("after-handover", 1);
    put_all(&cluster, &after, &value);
    acknowledged.extend(after);

    // A restart on the still-full disk starts and serves reads.
    cluster.node(full).kill9();
    cluster.node(full).file_size_limit = Some(LIMIT);
    cluster.node(full).start();
    wait_for("the restarted node serves a stale read", DEADLINE, || {
        (stale_get(port, "before-0")? == Some(value.clone())).then_some(())
    });
    let restarted = keys("restarted", 100);
    put_all(&cluster, &restarted, &value);
    acknowledged.extend(restarted);

    // Space returns: the node writes what waited, catches up, and says so.
    cluster.node(full).set_file_size_limit(None);
    wait_for("the node resumes by itself", DEADLINE, || {
        let leader = cluster.status(new_leader)?.shards[0].clone();
        let mine = cluster.status(full)?.shards[0].clone();
        (mine.disk_full.is_empty() && mine.applied_index >= leader.commit_index).then_some(())
    });
    let metrics = scrape::get(&admin, "/metrics").expect("metrics");
    assert_eq!(
        scrape::metric_value(&metrics, "wal_disk_full{shard=\"0\"}"),
        Some(0.0)
    );
    for key in &acknowledged {
        assert_eq!(
            stale_get(port, key),
            Some(Some(value.clone())),
            "{key} on the node that was full"
        );
    }
    let log = cluster.node(full).log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("can grow again"), "{log}");
}

/// A node whose log cannot be written (the disk holding it is full; here
/// its output goes to /dev/full, where every write fails with ENOSPC) drops
/// the lines and goes on serving.
#[test]
fn a_node_whose_log_cannot_be_written_keeps_serving() {
    let mut cluster = Cluster::configure(3, 1, "");
    cluster.node(1).log_path = std::path::PathBuf::from("/dev/full");
    for node in &mut cluster.nodes {
        node.start();
    }
    cluster.wait_for_leaders();
    let value = Bytes::from_static(b"v");
    let written = keys("logged", 50);
    put_all(&cluster, &written, &value);
    let port = cluster.node(1).client_port;
    wait_for("node 1 holds every key", DEADLINE, || {
        written
            .iter()
            .all(|key| stale_get(port, key) == Some(Some(value.clone())))
            .then_some(())
    });
    assert!(cluster.node(1).is_running(), "node 1 exited");
    // The lines are lost, but counted.
    let metrics = corekv::scrape::get(&cluster.node(1).admin_addr(), "/metrics").expect("scrape");
    let dropped = corekv::scrape::metric_value(&metrics, "log_write_errors_total");
    assert!(dropped.is_some_and(|n| n > 0.0), "{dropped:?}");
    let metrics = corekv::scrape::get(&cluster.node(2).admin_addr(), "/metrics").expect("scrape");
    let dropped = corekv::scrape::metric_value(&metrics, "log_write_errors_total");
    assert_eq!(dropped, Some(0.0));
}
