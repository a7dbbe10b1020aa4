//! `corekv top` through the real binary, in its plain-lines mode (stdout is
//! not a terminal here): a row per node and shard with one leader per shard,
//! request rates once two refreshes apart, and a node that does not answer
//! named instead of hiding the others.

mod common;

use common::Cluster;

/// Runs `corekv top` for `iterations` refreshes; returns its output.
fn top(cluster: &Cluster, iterations: &str) -> String {
    let (code, out, err) = cluster.cli(&["top", "--iterations", iterations, "--interval", "300ms"]);
    assert_eq!(code, 0, "{out} {err}");
    out
}

/// The data rows of the last refresh in `out`, split into cells.
fn last_refresh(out: &str) -> Vec<Vec<String>> {
    let last = out.rsplit("corekv top:").next().unwrap();
    last.lines()
        .skip(2)
        .filter(|l| !l.starts_with("node "))
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect()
}

#[test]
fn top_shows_every_node_and_shard_with_one_leader_each_and_names_a_dead_node() {
    let mut cluster = Cluster::start(3, 2);
    let leaders = cluster.wait_for_leaders();
    for i in 0..20 {
        assert_eq!(cluster.cli(&["put", &format!("k{i}"), "v"]).0, 0);
    }
    let out = top(&cluster, "2");
    assert_eq!(out.matches("corekv top: 3 nodes").count(), 2, "{out}");
    let rows = last_refresh(&out);
    assert_eq!(rows.len(), 6, "{out}");
    for (shard, leader) in leaders.iter().enumerate() {
        let shard_rows: Vec<&Vec<String>> =
            rows.iter().filter(|r| r[1] == shard.to_string()).collect();
        assert_eq!(shard_rows.len(), 3, "{out}");
        let leading: Vec<&&Vec<String>> = shard_rows.iter().filter(|r| r[2] == "leader").collect();
        assert_eq!(leading.len(), 1, "{out}");
        assert_eq!(leading[0][0], leader.to_string(), "{out}");
        assert!(leading[0].last().unwrap() == "LEADER", "{out}");
        // The second refresh has rates: a number, not "-".
        assert!(leading[0][6].parse::<f64>().is_ok(), "{out}");
    }

    cluster.node(3).kill9();
    let out = top(&cluster, "1");
    assert!(out.contains("node 3: cannot connect to admin"), "{out}");
    assert_eq!(last_refresh(&out).len(), 4, "{out}");
}
