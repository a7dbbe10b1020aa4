//! Leadership moves on purpose: `corekv transfer-leader`, and a leader that
//! hands its shards over before it exits on SIGTERM (rolling restarts).

mod common;

use std::time::{Duration, Instant};

use common::{wait_for, Cluster, DEADLINE};
use corekv_proto::client::Role;

#[test]
fn transfer_leader_moves_a_shard_and_keeps_serving() {
    let mut cluster = Cluster::start(3, 2);
    let leaders = cluster.wait_for_leaders();
    let shard = 1u32;
    let from = leaders[shard as usize];
    let to = (1..=3).find(|&id| id != from).unwrap();
    let term_before = cluster.status(from).unwrap().shards[shard as usize].term;

    let (code, out, err) = cluster.cli(&[
        "transfer-leader",
        "--shard",
        &shard.to_string(),
        "--to",
        &to.to_string(),
    ]);
    assert_eq!(code, 0, "{out} {err}");
    assert!(out.contains(&format!("node {to} leads")), "{out}");
    let status = cluster.status(to).unwrap().shards[shard as usize].clone();
    assert_eq!(status.role, Role::Leader as i32);
    assert_eq!(
        status.term,
        term_before + 1,
        "a transfer costs exactly one term"
    );
    // The other shard did not move.
    let other = cluster.status(leaders[0]).unwrap().shards[0].clone();
    assert_eq!(other.role, Role::Leader as i32);
    assert_eq!(cluster.cli(&["put", "after-transfer", "ok"]).0, 0);

    // Refused politely: a non-voter target.
    let (code, _, err) = cluster.cli(&["transfer-leader", "--shard", "0", "--to", "9"]);
    assert_eq!(code, 2);
    assert!(err.contains("not a voter"), "{err}");
}

#[test]
fn sigterm_on_a_leader_hands_its_shards_over_first() {
    let mut cluster = Cluster::start(3, 1);
    let leader = cluster.wait_for_leaders()[0];
    assert_eq!(cluster.cli(&["put", "k", "v"]).0, 0);
    let term = cluster.status(leader).unwrap().shards[0].term;

    let started = Instant::now();
    let status = cluster.node(leader).terminate();
    assert!(status.success(), "{status}");
    let log = cluster.nodes[leader as usize - 1].log();
    assert!(
        log.contains("handing leadership over before shutdown"),
        "{log}"
    );

    // The successor was elected by the transfer (one term later), not by an
    // election timeout after the leader vanished.
    let survivors: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
    let (new_leader, new_term) = wait_for("a new leader among the survivors", DEADLINE, || {
        survivors.iter().find_map(|&id| {
            let s = cluster.status(id)?.shards[0].clone();
            (s.role == Role::Leader as i32).then_some((id, s.term))
        })
    });
    assert_eq!(
        new_term,
        term + 1,
        "leadership moved by transfer, not by a new election"
    );
    assert!(survivors.contains(&new_leader));
    println!(
        "leader {leader} -> {new_leader} in {:?} (including shutdown)",
        started.elapsed()
    );
    let (code, out, _) = cluster.cli(&["get", "k"]);
    assert_eq!((code, out.trim()), (0, "v"));
    assert!(started.elapsed() < Duration::from_secs(30));
}
