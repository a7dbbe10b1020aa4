//! Membership: replacing a dead node, growing and shrinking the cluster,
//! removing a leader, a change on the minority side of a partition, and
//! the refusals an operator meets, all through `corekv member` and
//! `corekv run --join` against real processes.

mod common;

use std::time::{Duration, Instant};

use common::proxy::ProxiedCluster;
use common::{wait_for, wait_for_keys_on, Cluster, RawClient, Writer, DEADLINE};
use corekv_proto::client::{
    request::Op, response, ChangeMembership, ErrorCode, MembershipAction, NodeInfo, Request,
};

/// `corekv member add` for node `id` of the harness (its own ports).
fn add(cluster: &Cluster, id: u64) -> (i32, String, String) {
    let node = &cluster.nodes[id as usize - 1];
    cluster.cli(&[
        "member",
        "add",
        "--id",
        &id.to_string(),
        "--host",
        "127.0.0.1",
        "--client-port",
        &node.client_port.to_string(),
        "--peer-port",
        &node.peer_port.to_string(),
        "--admin-port",
        &node.admin_port.to_string(),
    ])
}

/// Promotes learner `id`, asking again while it is still catching up.
fn promote_when_caught_up(cluster: &Cluster, id: u64) {
    let id_text = id.to_string();
    wait_for(&format!("node {id} promoted"), DEADLINE, || {
        let (code, out, err) = cluster.cli(&["member", "promote", &id_text]);
        match code {
            0 => Some(()),
            _ if err.contains("has not caught up") => None,
            _ => panic!("promote {id} failed: {out} {err}"),
        }
    });
}

/// `corekv member list --json`.
fn members(cluster: &Cluster) -> serde_json::Value {
    let (code, out, err) = cluster.cli(&["--json", "member", "list"]);
    assert_eq!(code, 0, "{out} {err}");
    serde_json::from_str(&out).expect("member list --json")
}

/// `member list` without who reported it (leadership may move meanwhile).
fn membership_state(cluster: &Cluster) -> serde_json::Value {
    let mut list = members(cluster);
    for shard in list["shards"].as_array_mut().unwrap() {
        let shard = shard.as_object_mut().unwrap();
        shard.remove("reported_by");
        shard.remove("reported_by_leader");
    }
    list
}

/// The voters of every shard, as `member list` reports them.
fn voters(cluster: &Cluster) -> Vec<Vec<u64>> {
    members(cluster)["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| serde_json::from_value(s["voters"].clone()).unwrap())
        .collect()
}

/// Waits until `/health/ready` of node `id` answers 200.
fn wait_ready(cluster: &Cluster, id: u64) {
    let admin = cluster.nodes[id as usize - 1].admin_addr();
    wait_for(&format!("node {id} ready"), DEADLINE, || {
        let (status, _) = corekv::scrape::request("GET", &admin, "/health/ready").ok()?;
        (status == 200).then_some(())
    });
}

/// Writes `count` keys `pre{i}` (valued as themselves) and returns them.
fn prefill(cluster: &Cluster, count: usize) -> Vec<String> {
    let endpoints: Vec<String> = cluster.endpoints().split(',').map(String::from).collect();
    corekv_client::block_on(async move {
        let client = corekv_client::Client::connect(corekv_client::ClientOptions {
            endpoints,
            tls: common::client_tls(),
            ..Default::default()
        })
        .await
        .expect("connect");
        let mut keys = Vec::new();
        for i in 0..count {
            let key = format!("pre{i}");
            let bytes = bytes::Bytes::from(key.clone().into_bytes());
            client.put(bytes.clone(), bytes).await.expect("prefill put");
            keys.push(key);
        }
        keys
    })
}

#[test]
fn replace_a_killed_node_with_a_new_one_while_a_writer_runs() {
    // Small snapshots, so the log is compacted before node 4 joins: it
    // catches up from a snapshot (which carries the membership), then the log.
    let extra = "snapshot_entries = 50\nwal_segment_bytes = 1048576\n";
    let mut cluster = Cluster::configure_with_spares(3, 1, 2, extra);
    for id in 1..=3 {
        cluster.node(id).start();
    }
    cluster.wait_for_leaders();
    let prefilled = prefill(&cluster, 600);
    let started = Instant::now();
    let writer = Writer::start(cluster.endpoints());
    writer.wait_for_acks(20);

    // Node 2, the leader of shard 1, dies for good; it is removed and node
    // 4 takes its place.
    cluster.node(2).kill9();
    let died = started.elapsed();
    let (code, out, err) = cluster.cli(&["member", "remove", "2"]);
    assert_eq!(code, 0, "{out} {err}");
    cluster.node(4).start();
    let (code, out, err) = add(&cluster, 4);
    assert_eq!(code, 0, "{out} {err}");
    promote_when_caught_up(&cluster, 4);
    wait_ready(&cluster, 4);
    let ready = started.elapsed();
    writer.wait_for_acks(20);
    let report = writer.stop();

    assert_eq!(voters(&cluster), vec![vec![1, 3, 4]; 2]);
    assert!(report.acked.len() > 10, "{report:?}");
    for id in [1, 3, 4] {
        let port = cluster.nodes[id as usize - 1].client_port;
        wait_for_keys_on(port, &prefilled);
        wait_for_keys_on(port, &report.acked);
    }
    let log = cluster.nodes[3].log();
    assert!(log.contains("snapshot received and verified"), "{log}");
    println!(
        "timeline: node 2 (leader of shard 1) killed at {died:?}, node 4 ready at {ready:?}; {} writes acknowledged, {} failed; \
         longest write gap {:?} (ended at {:?})",
        report.acked.len(),
        report.failed,
        report.longest_gap,
        report.longest_gap_ended
    );
    // An election after the kill and the changes themselves: seconds at
    // most, even on a busy machine; a stall would be far longer.
    assert!(report.longest_gap < Duration::from_secs(10), "{report:?}");
}

#[test]
fn grow_three_to_five_kill_two_and_shrink_back_to_three() {
    let mut cluster = Cluster::start_with_spares(3, 2, 2);
    cluster.wait_for_leaders();
    let writer = Writer::start(cluster.endpoints());
    for id in [4, 5] {
        cluster.node(id).start();
        let (code, out, err) = add(&cluster, id);
        assert_eq!(code, 0, "{out} {err}");
    }
    for id in [4, 5] {
        promote_when_caught_up(&cluster, id);
    }
    assert_eq!(voters(&cluster), vec![vec![1, 2, 3, 4, 5]; 2]);
    let grown = writer.stop();

    // Any two of five may die: the other three still form a quorum.
    cluster.node(1).kill9();
    cluster.node(2).kill9();
    let (code, out, err) = cluster.cli(&["put", "after-two-died", "yes"]);
    assert_eq!(code, 0, "{out} {err}");

    // Shrink back to three by removing the dead ones.
    for id in ["1", "2"] {
        let (code, out, err) = cluster.cli(&["member", "remove", id]);
        assert_eq!(code, 0, "{out} {err}");
    }
    assert_eq!(voters(&cluster), vec![vec![3, 4, 5]; 2]);
    let (code, out, err) = cluster.cli(&["put", "after-shrink", "yes"]);
    assert_eq!(code, 0, "{out} {err}");
    for id in [3, 4, 5] {
        wait_for_keys_on(cluster.nodes[id as usize - 1].client_port, &grown.acked);
    }
    let members = members(&cluster);
    assert_eq!(members["disagreeing_shards"], serde_json::json!([]));

    // A restarted node finds the members in its own log, not in its config
    // file (whose `peers` still lists nodes 1, 2 and 3 only).
    assert!(cluster.node(3).terminate().success());
    let log_before = cluster.nodes[2].log().len();
    cluster.node(3).start();
    wait_ready(&cluster, 3);
    wait_for(
        "node 3 to be connected to nodes 4 and 5 again",
        DEADLINE,
        || {
            let log = cluster.nodes[2].log();
            let after = &log[log_before..];
            ["peer=4", "peer=5"]
                .iter()
                .all(|peer| after.contains(&format!("connection up shard=0 {peer}")))
                .then_some(())
        },
    );
    let status = cluster.status(3).unwrap();
    for shard in &status.shards {
        let membership = shard.membership.as_ref().unwrap();
        assert_eq!(membership.voters, vec![3, 4, 5]);
        let ids: Vec<u64> = membership.nodes.iter().map(|n| n.node_id).collect();
        assert_eq!(ids, vec![3, 4, 5]);
    }
    let (code, out, err) = cluster.cli(&["put", "after-restart", "yes"]);
    assert_eq!(code, 0, "{out} {err}");
}

#[test]
fn removing_the_leader_of_every_shard_moves_leadership_first() {
    let mut cluster = Cluster::start(3, 2);
    cluster.wait_for_leaders();
    for shard in ["0", "1"] {
        let (code, out, err) = cluster.cli(&["transfer-leader", "--shard", shard, "--to", "1"]);
        assert_eq!(code, 0, "{out} {err}");
    }
    let writer = Writer::start(cluster.endpoints());
    writer.wait_for_acks(20);
    let (code, out, err) = cluster.cli(&["member", "remove", "1"]);
    assert_eq!(code, 0, "{out} {err}");
    writer.wait_for_acks(20);
    let report = writer.stop();

    let log = cluster.nodes[0].log();
    assert!(
        log.contains("handing leadership over before this node is removed"),
        "{log}"
    );
    assert_eq!(voters(&cluster), vec![vec![2, 3]; 2]);
    for id in [2, 3] {
        wait_for_keys_on(cluster.nodes[id as usize - 1].client_port, &report.acked);
    }
    // The removed node learns it (its peers refuse it as removed) and
    // serves nothing more.
    wait_for("node 1 to know it was removed", DEADLINE, || {
        let status = cluster.status(1)?;
        status.shards.iter().all(|s| s.removed).then_some(())
    });
    let answer = RawClient::connect(cluster.nodes[0].client_port)
        .unwrap()
        .call(Request {
            id: 1,
            op: Some(Op::Put(corekv_proto::client::Put {
                key: "k".into(),
                value: "v".into(),
            })),
            ..Default::default()
        })
        .unwrap();
    match answer.result {
        Some(response::Result::Error(e)) => {
            assert_eq!(e.code(), ErrorCode::Unavailable);
            assert!(e.message.contains("removed"), "{e:?}");
        }
        other => panic!("a removed node answered a put with {other:?}"),
    }
    assert!(cluster.nodes[0]
        .log()
        .contains("no longer serves the shard"));
}

#[test]
fn a_change_on_the_minority_side_of_a_partition_does_not_commit() {
    let mut cluster = ProxiedCluster::start(3, 1);
    let leader = cluster.wait_for_leaders()[0];
    // Cut the leader off and at once ask it (and only it) to add node 9: it
    // still believes it leads for up to an election timeout, so it takes
    // the change into its log, where it can never commit.
    cluster.isolate(leader);
    let port = cluster.nodes[leader as usize - 1].client_port;
    let answer = RawClient::connect(port)
        .unwrap()
        .call(Request {
            id: 1,
            no_forward: true,
            op: Some(Op::ChangeMembership(ChangeMembership {
                shard: 0,
                action: MembershipAction::AddLearner as i32,
                node: Some(NodeInfo {
                    node_id: 9,
                    host: "127.0.0.1".into(),
                    client_port: 9,
                    peer_port: 19,
                    admin_port: 0,
                }),
                force: false,
                dry_run: false,
            })),
            ..Default::default()
        })
        .unwrap();
    match answer.result {
        Some(response::Result::Error(e)) => assert!(
            [
                ErrorCode::Unavailable,
                ErrorCode::NotLeader,
                ErrorCode::Timeout
            ]
            .contains(&e.code()),
            "{e:?}"
        ),
        other => panic!("a change on the minority side was answered {other:?}"),
    }
    // The majority goes on under a leader of its own.
    let others: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    wait_for("a leader on the majority side", DEADLINE, || {
        others
            .iter()
            .find(|id| {
                cluster
                    .status(**id)
                    .is_some_and(|s| s.shards[0].role == corekv_proto::client::Role::Leader as i32)
            })
            .copied()
    });
    cluster.proxy.heal();
    // Exactly one membership, the same on every node, without node 9.
    wait_for("every node to agree on the membership", DEADLINE, || {
        let views: Vec<_> = (1..=3)
            .map(|id| {
                cluster
                    .status(id)
                    .and_then(|s| s.shards[0].membership.clone())
            })
            .collect::<Option<Vec<_>>>()?;
        let first = &views[0];
        views
            .iter()
            .all(|v| {
                (v.voters.clone(), v.learners.clone())
                    == (first.voters.clone(), first.learners.clone())
            })
            .then_some(first.clone())
    });
    for id in 1..=3 {
        let membership = cluster.status(id).unwrap().shards[0]
            .membership
            .clone()
            .unwrap();
        assert_eq!(membership.voters, vec![1, 2, 3]);
        assert!(membership.learners.is_empty(), "{membership:?}");
        assert!(membership.nodes.iter().all(|n| n.node_id != 9));
    }
}

#[test]
fn bad_membership_requests_fail_clearly_and_change_nothing() {
    let mut cluster = Cluster::start_with_spares(3, 1, 2);
    cluster.wait_for_leaders();
    let before = membership_state(&cluster);

    let (code, _, err) = add(&cluster, 1);
    assert_eq!(code, 2);
    assert!(err.contains("already a member"), "{err}");
    let (code, _, err) = cluster.cli(&[
        "member",
        "add",
        "--id",
        "1",
        "--host",
        "10.9.9.9",
        "--client-port",
        "1",
        "--peer-port",
        "2",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("already a voter"), "{err}");
    let (code, _, err) = cluster.cli(&["member", "remove", "9"]);
    assert_eq!(code, 2);
    assert!(err.contains("not a member"), "{err}");
    let (code, _, err) = cluster.cli(&["member", "promote", "9"]);
    assert_eq!(code, 2);
    assert!(err.contains("not a member"), "{err}");
    assert_eq!(membership_state(&cluster), before);

    // Removing a live voter while another is down would leave no quorum.
    // (The leader counts a voter live for an election timeout after it last
    // heard from it: wait until it noticed, through a dry run.)
    cluster.node(3).kill9();
    wait_for("the leaders to see node 3 down", DEADLINE, || {
        let (code, _, err) = cluster.cli(&["member", "remove", "2", "--dry-run"]);
        (code == 2 && err.contains("quorum")).then_some(())
    });
    let (code, _, err) = cluster.cli(&["member", "remove", "2"]);
    assert_eq!(code, 2);
    assert!(err.contains("quorum"), "{err}");
    assert_eq!(voters(&cluster), vec![vec![1, 2, 3]; 2]);
    cluster.node(3).start();
    cluster.wait_for_leaders();

    // A learner that never started cannot be promoted.
    let (code, out, err) = add(&cluster, 4);
    assert_eq!(code, 0, "{out} {err}");
    let (code, _, err) = cluster.cli(&["member", "promote", "4"]);
    assert_eq!(code, 2);
    assert!(err.contains("has not caught up"), "{err}");
    assert_eq!(voters(&cluster), vec![vec![1, 2, 3]; 2]);

    // A node configured for another cluster is refused when it joins.
    let node = cluster.node(4);
    let config = std::fs::read_to_string(&node.config_path).unwrap();
    std::fs::write(
        &node.config_path,
        config.replace("cluster_id = 7", "cluster_id = 8"),
    )
    .unwrap();
    node.start();
    let status = wait_for("the wrongly configured node to exit", DEADLINE, || {
        node_exit_status(cluster.node(4))
    });
    assert_eq!(status, Some(2));
    let log = cluster.nodes[3].log();
    assert!(log.contains("cluster id 7"), "{log}");
    assert!(!cluster.nodes[3].data_dir.join("shard-000").exists());
}

fn node_exit_status(node: &mut common::Node) -> Option<Option<i32>> {
    node.try_exit_code()
}
