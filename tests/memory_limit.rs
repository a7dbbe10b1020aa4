//! The state machine's memory limit through the real binary: past
//! `max_memory_bytes` growing writes are refused with RESOURCE_EXHAUSTED
//! naming what is used and the limit; shrinking overwrites and deletes still
//! work; nothing acknowledged is lost across a restart.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{wait_for, Cluster, DEADLINE};
use corekv::scrape;
use corekv_client::{block_on, Client, ClientError, ClientOptions, Consistency, ErrorCode};

/// One shard, so the whole limit is its share.
const LIMIT: u64 = 64 * 1024;

async fn connect(cluster: &Cluster) -> Client {
    Client::connect(ClientOptions {
        endpoints: cluster.endpoints().split(',').map(String::from).collect(),
        request_timeout: Duration::from_secs(10),
        ..Default::default()
    })
    .await
    .expect("connect")
}

fn key(i: usize) -> Bytes {
    Bytes::from(format!("key-{i:04}"))
}

#[test]
fn growing_writes_are_refused_at_the_limit_and_shrinking_ones_are_not() {
    let mut cluster = Cluster::configure(3, 1, &format!("max_memory_bytes = {LIMIT}\n"));
    for node in &mut cluster.nodes {
        node.start();
    }
    cluster.wait_for_leaders();
    let value = Bytes::from(vec![b'v'; 1024]);
    let acknowledged = block_on(async {
        let client = connect(&cluster).await;
        let mut acknowledged = Vec::new();
        let refusal = loop {
            let i = acknowledged.len();
            assert!(
                i < 200,
                "no refusal after {i} KiB with a {LIMIT} byte limit"
            );
            match client.put(key(i), value.clone()).await {
                Ok(_) => acknowledged.push(i),
                Err(error) => break error,
            }
        };
        match &refusal {
            ClientError::Server { code, message, .. } => {
                assert_eq!(*code, ErrorCode::ResourceExhausted, "{message}");
                assert!(message.contains(&format!("limit of {LIMIT}")), "{message}");
                assert!(
                    message.contains("deletes and smaller overwrites"),
                    "{message}"
                );
            }
            other => panic!("expected RESOURCE_EXHAUSTED, got {other}"),
        }
        // A smaller overwrite and a delete work at the limit; the room a
        // delete frees takes a new key again.
        client
            .put(key(0), Bytes::from_static(b"small"))
            .await
            .expect("a shrinking overwrite");
        assert!(client.delete(key(1), None).await.expect("a delete"));
        let next = acknowledged.len();
        client
            .put(key(next), value.clone())
            .await
            .expect("a put into the room a delete freed");
        acknowledged.push(next);
        acknowledged
    });
    assert!(acknowledged.len() > 40, "{}", acknowledged.len());

    // Status and metrics say how full the shard is (on the leader of now:
    // leadership may have moved to the shard's preferred node meanwhile;
    // a follower catches up within a heartbeat or two).
    let keys = acknowledged.len() as u64 - 1;
    let (leader, status) = wait_for("status counts every key", DEADLINE, || {
        let leader = cluster.status(1)?.shards[0].leader_id;
        if leader == 0 {
            return None;
        }
        let status = cluster.status(leader)?.shards[0].clone();
        (status.state_machine_keys == keys).then_some((leader, status))
    });
    assert!(status.state_machine_bytes <= LIMIT, "{status:?}");
    let admin = cluster.node(leader).admin_addr();
    wait_for("the metric follows the status", DEADLINE, || {
        let metrics = scrape::get(&admin, "/metrics").ok()?;
        let bytes = scrape::metric_value(&metrics, "state_machine_bytes{shard=\"0\"}")?;
        (bytes == status.state_machine_bytes as f64).then_some(())
    });

    // Nothing acknowledged is lost across a restart of every node.
    for node in &mut cluster.nodes {
        assert!(node.terminate().success());
    }
    for node in &mut cluster.nodes {
        node.start();
    }
    cluster.wait_for_leaders();
    block_on(async {
        let client = connect(&cluster).await;
        for &i in &acknowledged {
            let got = client
                .get(key(i), Consistency::Linearizable)
                .await
                .unwrap_or_else(|e| panic!("get key {i}: {e}"));
            let expected = match i {
                0 => Some(Bytes::from_static(b"small")),
                1 => None,
                _ => Some(value.clone()),
            };
            assert_eq!(got.map(|(v, _)| v), expected, "key {i}");
        }
    });
}
