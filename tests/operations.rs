//! Operations: admin HTTP, metrics, health, shutdown, data-dir lock.

mod common;

use std::process::Command;

use common::{wait_for, Cluster, COREKV, DEADLINE};
use corekv::scrape::{self, metric_value};

#[test]
fn metrics_show_one_leader_per_shard_and_rising_indexes() {
    let mut cluster = Cluster::start(3, 2);
    cluster.wait_for_leaders();
    let metrics_of = |cluster: &Cluster, id: usize| {
        scrape::get(&cluster.nodes[id].admin_addr(), "/metrics").unwrap()
    };
    let before: Vec<String> = (0..3).map(|i| metrics_of(&cluster, i)).collect();
    for shard in 0..2 {
        let label = format!("{{shard=\"{shard}\"}}");
        let leaders = before
            .iter()
            .filter(|m| metric_value(m, &format!("raft_node_state{label}")) == Some(2.0))
            .count();
        assert_eq!(leaders, 1, "shard {shard}: exactly one leader in /metrics");
        let terms: Vec<_> = before
            .iter()
            .map(|m| metric_value(m, &format!("raft_current_term{label}")))
            .collect();
        assert!(
            terms.iter().all(|t| t.is_some() && *t == terms[0]),
            "terms disagree: {terms:?}"
        );
    }
    for i in 0..20 {
        assert_eq!(cluster.cli(&["put", &format!("m{i}"), "x"]).0, 0);
    }
    let sum = |texts: &[String], name: &str| -> f64 {
        texts
            .iter()
            .map(|m| {
                (0..2)
                    .map(|s| metric_value(m, &format!("{name}{{shard=\"{s}\"}}")).unwrap_or(0.0))
                    .sum::<f64>()
            })
            .sum()
    };
    wait_for(
        "commit and applied indexes to rise on every node",
        DEADLINE,
        || {
            let after: Vec<String> = (0..3).map(|i| metrics_of(&cluster, i)).collect();
            let ok = (0..3).all(|i| {
                sum(&after[i..i + 1], "raft_applied_index")
                    >= sum(&before[i..i + 1], "raft_applied_index") + 20.0
                    && sum(&after[i..i + 1], "raft_commit_index")
                        >= sum(&before[i..i + 1], "raft_commit_index") + 20.0
            });
            ok.then_some(())
        },
    );
    let text = metrics_of(&cluster, 0);
    for name in [
        "raft_leader_changes_total",
        "raft_proposals_total",
        "wal_fsync_seconds_count",
        "wal_bytes_written_total",
        "wal_segments",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_cpu_seconds_total",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}");
    }
    assert!(
        text.contains("client_requests_total{shard="),
        "no client request counters"
    );
    for shard in 0..2 {
        let turns = metric_value(
            &text,
            &format!("shard_loop_turn_seconds_count{{shard=\"{shard}\"}}"),
        );
        assert!(
            turns.is_some_and(|n| n > 0.0),
            "shard {shard}: {turns:?} loop turns"
        );
    }
}

#[test]
fn health_ready_turns_200_once_shards_have_leaders() {
    let mut cluster = Cluster::configure(3, 1, "");
    cluster.node(1).start();
    let admin = cluster.nodes[0].admin_addr();
    let status_of = |method: &str, path: &str| scrape::request(method, &admin, path).unwrap().0;
    // Alone, node 1 cannot elect a leader: not ready, but live.
    let (status, body) = wait_for("node 1 admin to answer", DEADLINE, || {
        scrape::request("GET", &admin, "/health/ready").ok()
    });
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no leader"), "{body}");
    assert_eq!(status_of("GET", "/health/live"), 200);
    assert_eq!(status_of("GET", "/nope"), 404);
    assert_eq!(status_of("POST", "/metrics"), 405);
    let body = scrape::get(&admin, "/status").unwrap();
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["node_id"], 1);
    cluster.node(2).start();
    cluster.node(3).start();
    wait_for("/health/ready to say 200", DEADLINE, || {
        (scrape::request("GET", &admin, "/health/ready").ok()?.0 == 200).then_some(())
    });
}

#[test]
fn sigterm_exits_zero_and_restart_keeps_applied_index_continuous() {
    let mut cluster = Cluster::start(1, 1);
    cluster.wait_for_leaders();
    for i in 0..30 {
        assert_eq!(cluster.cli(&["put", &format!("k{i}"), &i.to_string()]).0, 0);
    }
    let (_, out, _) = cluster.cli(&["--json", "get", "k29"]);
    let before: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let applied_before = cluster.status(1).unwrap().shards[0].applied_index;

    let status = cluster.node(1).terminate();
    assert_eq!(status.code(), Some(0), "SIGTERM must exit 0");
    let log = cluster.nodes[0].log();
    assert!(
        log.contains("WAL synced"),
        "shutdown must sync the WAL:\n{log}"
    );

    cluster.node(1).start();
    cluster.wait_for_leaders();
    // Replay re-applies exactly the log: the same entries, nothing twice,
    // plus the new leader's empty entry once it commits.
    wait_for(
        "the applied index to pass its value before the restart",
        DEADLINE,
        || {
            let after = cluster.status(1)?.shards[0].clone();
            (after.applied_index > applied_before).then_some(())
        },
    );
    let (_, out, _) = cluster.cli(&["--json", "get", "k29"]);
    let again: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        before, again,
        "value and version survive the restart unchanged"
    );
    assert_eq!(
        cluster
            .cli(&["scan", "--prefix", "k", "--limit", "100"])
            .1
            .lines()
            .count(),
        30
    );
}

#[test]
fn second_node_on_the_same_data_dir_refuses_to_start() {
    let mut cluster = Cluster::start(1, 1);
    cluster.wait_for_leaders();
    let pid = cluster.nodes[0].pid().unwrap();
    let output = Command::new(COREKV)
        .arg("run")
        .arg("--config")
        .arg(&cluster.nodes[0].config_path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("locked"), "{stderr}");
    assert!(
        stderr.contains(&cluster.nodes[0].data_dir.display().to_string()),
        "{stderr}"
    );
    assert!(
        stderr.contains(&pid.to_string()),
        "holder pid missing: {stderr}"
    );
    // The first node is unharmed.
    assert!(cluster.node(1).is_running());
    assert_eq!(cluster.cli(&["put", "still", "here"]).0, 0);
}

#[test]
fn a_second_node_on_the_same_ports_fails_instead_of_sharing_them() {
    let mut cluster = Cluster::start(1, 1);
    cluster.wait_for_leaders();
    // Same ports, another data dir: the admin or client bind must fail.
    let config = std::fs::read_to_string(&cluster.nodes[0].config_path).unwrap();
    let other_dir = cluster.dir.path().join("other-data");
    let data_line = config.lines().find(|l| l.starts_with("data_dir")).unwrap();
    let twin = config.replace(
        data_line,
        &format!("data_dir = {:?}", other_dir.display().to_string()),
    );
    let twin_path = cluster.dir.path().join("twin.toml");
    std::fs::write(&twin_path, twin).unwrap();
    let mut child = Command::new(COREKV)
        .arg("run")
        .arg("--config")
        .arg(&twin_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_for("the twin node to exit", DEADLINE, || {
        child.try_wait().unwrap()
    });
    if status.success() {
        panic!("a node on ports already in use must not start");
    }
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("cannot listen"), "{stderr}");
    assert!(cluster.node(1).is_running());
    assert_eq!(cluster.cli(&["put", "k", "v"]).0, 0);
}

#[test]
fn a_peer_of_another_cluster_is_refused_and_both_sides_log_why() {
    // Node 2 believes it belongs to cluster 8; node 1 to cluster 7.
    refused_peers_log_why(
        |config| config.replace("cluster_id = 7", "cluster_id = 8"),
        "cluster id mismatch: mine 7, yours 8",
    );
}

#[test]
fn a_peer_with_another_shard_count_is_refused_and_both_sides_log_why() {
    // Node 2 runs 2 shards, node 1 one: shard 0 of each meets and refuses.
    refused_peers_log_why(
        |config| config.replace("shards = 1", "shards = 2"),
        "shard count mismatch: mine 1, yours 2",
    );
}

/// Starts two nodes, node 2 with its config changed by `edit`, and checks
/// that both log `why` for the refused handshake and never elect a leader.
fn refused_peers_log_why(edit: impl Fn(String) -> String, why: &str) {
    let mut cluster = Cluster::configure(2, 1, "");
    let path = cluster.nodes[1].config_path.clone();
    let config = std::fs::read_to_string(&path).unwrap();
    let changed = edit(config.clone());
    assert_ne!(changed, config, "the edit must change node 2's config");
    std::fs::write(&path, changed).unwrap();
    cluster.node(1).start();
    cluster.node(2).start();
    wait_for("both sides to log the refused handshake", DEADLINE, || {
        let listener = cluster.nodes[0].log();
        let dialer = cluster.nodes[1].log();
        (listener.contains(why) && dialer.contains(why)).then_some(())
    });
    // Refused peers never form a group: both campaign, neither wins.
    wait_for("both nodes to have campaigned", DEADLINE, || {
        cluster
            .nodes
            .iter()
            .all(|n| n.log().contains("became pre_candidate"))
            .then_some(())
    });
    for id in 1..=2 {
        let status = cluster.status(id).expect("node answers status");
        assert_eq!(
            status.shards[0].leader_id, 0,
            "node {id} must not elect with a foreign peer"
        );
    }
}

/// The CPUs this test process may run on, from /proc (`0-1,4` style).
fn allowed_cpus(status: &str) -> Vec<usize> {
    let list = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list in /proc status")
        .trim();
    list.split(',')
        .flat_map(|range| {
            let (low, high) = range.split_once('-').unwrap_or((range, range));
            low.parse::<usize>().unwrap()..=high.parse::<usize>().unwrap()
        })
        .collect()
}

#[test]
fn cpus_pins_shard_threads_and_an_unavailable_cpu_is_refused() {
    let refused = Cluster::configure(1, 1, "cpus = [4095]\n");
    let output = Command::new(COREKV)
        .arg("run")
        .arg("--config")
        .arg(&refused.nodes[0].config_path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("`cpus`") && stderr.contains("CPU 4095"),
        "{stderr}"
    );

    let cpu = *allowed_cpus(&std::fs::read_to_string("/proc/self/status").unwrap())
        .last()
        .unwrap();
    let mut cluster = Cluster::configure(1, 1, &format!("cpus = [{cpu}]\n"));
    cluster.node(1).start();
    cluster.wait_for_leaders();
    let pid = cluster.nodes[0].pid().unwrap();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    let shard_thread = tasks
        .map(|task| task.unwrap().path())
        .find(|task| {
            std::fs::read_to_string(task.join("comm")).is_ok_and(|c| c.trim() == "corekv-shard-0")
        })
        .expect("a thread named corekv-shard-0");
    let status = std::fs::read_to_string(shard_thread.join("status")).unwrap();
    assert_eq!(allowed_cpus(&status), vec![cpu]);
    assert_eq!(cluster.cli(&["put", "pinned", "yes"]).0, 0);
}

#[test]
fn frames_for_a_dead_peer_are_counted_as_dropped() {
    let mut cluster = Cluster::start(3, 1);
    let leader = cluster.wait_for_leaders()[0];
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let name = format!("transport_frames_dropped_total{{shard=\"0\",peer=\"{follower}\"}}");
    let dropped = |cluster: &Cluster| {
        let admin = cluster.nodes[leader as usize - 1].admin_addr();
        let body = scrape::get(&admin, "/metrics").ok()?;
        Some(metric_value(&body, &name).unwrap_or(0.0))
    };
    // Start-up may have dropped a few frames before every link was up.
    let before = dropped(&cluster).expect("leader's /metrics");
    cluster.node(follower).kill9();
    // Heartbeats and appends to the dead follower find its link down.
    assert_eq!(cluster.cli(&["put", "while", "down"]).0, 0);
    wait_for("dropped frames to the dead follower", DEADLINE, || {
        dropped(&cluster).filter(|&n| n > before)
    });
}

#[test]
fn the_admin_port_keeps_connections_alive_and_silent_clients_do_not_block_it() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let mut cluster = Cluster::start(1, 1);
    cluster.wait_for_leaders();
    let admin = cluster.nodes[0].admin_addr();
    // Clients that connect and say nothing hold every connection slot but
    // one.
    let silent: Vec<TcpStream> = (0..corekv_node::admin::MAX_ADMIN_CONNECTIONS - 1)
        .map(|_| TcpStream::connect(&admin).unwrap())
        .collect();
    // Two requests on one connection (keep-alive), answered in order; HEAD
    // gets the head only.
    let mut stream = TcpStream::connect(&admin).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    stream
        .write_all(
            b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n\
              GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
    assert_eq!(text.matches("raft_current_term{").count(), 1, "{text}");
    // A request with a body is refused; the port serves the next client.
    let mut stream = TcpStream::connect(&admin).unwrap();
    stream
        .write_all(b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(scrape::get(&admin, "/status").is_ok());
    // The silent ones are cut off once they have said nothing for the
    // admin port's I/O timeout.
    for mut stream in silent {
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(60)))
            .unwrap();
        let mut rest = Vec::new();
        let read = stream.read_to_end(&mut rest);
        assert!(
            read.is_ok()
                || read
                    .as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "a silent admin client was not closed: {read:?}"
        );
    }
}

/// A loop turn longer than `slow_turn_ms` is logged with where its time
/// went. At 0 every turn is longer (one line a second gets through).
#[test]
fn a_slow_loop_turn_is_logged_with_where_its_time_went() {
    let mut cluster = Cluster::configure(1, 1, "slow_turn_ms = 0\n");
    cluster.node(1).start();
    cluster.wait_for_leaders();
    let line = wait_for("a slow loop turn warning", DEADLINE, || {
        cluster.nodes[0]
            .log()
            .lines()
            .find(|line| line.contains("slow loop turn"))
            .map(str::to_string)
    });
    for field in [
        "turn_ms=",
        "inputs=",
        "handling_ms=",
        "flush_ms=",
        "ready_ms=",
        "dispatch_ms=",
        "kinds=",
        "wall_ms=",
        "cpu_ms=",
        "minor_faults=",
        "involuntary_switches=",
    ] {
        assert!(line.contains(field), "{field} missing: {line}");
    }
}

/// The heap asks for transparent huge pages (jemalloc's `thp:always`,
/// compiled into the binary) and the node logs it beside what the kernel
/// allows; `_RJEM_MALLOC_CONF` in the environment overrides it.
#[test]
fn the_node_logs_whether_its_heap_asks_for_huge_pages() {
    let mut cluster = Cluster::configure(2, 1, "");
    cluster.nodes[1].env = vec![("_RJEM_MALLOC_CONF".into(), "thp:default".into())];
    for node in &mut cluster.nodes {
        node.start();
    }
    cluster.wait_for_leaders();
    let line = |log: &str| {
        log.lines()
            .find(|l| l.contains("heap transparent huge pages"))
            .map(str::to_string)
    };
    let shipped = line(&cluster.nodes[0].log()).expect("node 1 logs its heap's pages");
    assert!(shipped.contains("jemalloc=always kernel="), "{shipped}");
    let overridden = line(&cluster.nodes[1].log()).expect("node 2 logs its heap's pages");
    assert!(
        overridden.contains("jemalloc=default kernel="),
        "{overridden}"
    );
}
