//! Fault tolerance with real processes (issue 5): kill -9 of a leader during
//! writes, failover time, chaos with acknowledged-write accounting, a torn WAL
//! tail, a corrupt older WAL segment, and a network partition.
//!
//! Workloads run the client library (`corekv_client`) on a thread of
//! their own; everything they were told "done" is checked at the end.

mod common;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::proxy::ProxiedCluster;
use common::{shard_of, wait_for, Cluster, Node, RawClient, COREKV, DEADLINE};
use corekv_client::block_on;
use corekv_client::{Client, ClientError, ClientOptions};
use corekv_proto::client::{
    request::Op, response, Consistency, ErrorCode, Get, Put, Request, Role, ShardStatus,
};
use corekv_wal::inspect;

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// kill -9 the leader of shard 0 while 8 writers put distinct keys: the
/// survivors elect a new leader, writes resume, every acknowledged write is
/// readable, and the killed node comes back and catches up on every shard.
#[test]
fn kill9_leader_during_writes_loses_nothing_acknowledged() {
    let mut cluster = Cluster::start(3, 2);
    cluster.wait_for_leaders();
    let shard = 0;
    let before = wait_for_agreed_leaders(&mut cluster)[shard].clone();
    let (victim, term_before) = (before.leader_id, before.term);

    let acked = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let workload = Background::start({
        let (endpoints, acked) = (cluster.endpoints(), acked.clone());
        move |stop| distinct_puts(endpoints, 2, 8, acked, stop)
    });
    wait_for("200 acknowledged writes on each shard", DEADLINE, || {
        acked
            .iter()
            .all(|a| a.load(Ordering::SeqCst) >= 200)
            .then_some(())
    });

    let killed = Instant::now();
    cluster.node(victim).kill9();
    let survivors: Vec<u64> = (1..=3).filter(|&id| id != victim).collect();
    let (new_leader, failover) =
        measure("a new leader of shard 0 on the survivors", killed, || {
            agreed_leader(&cluster, &survivors, shard, victim)
        });
    println!(
        "kill -9 of leader {victim}: node {} leads shard {shard} at term {} after {failover:?}",
        new_leader.leader_id, new_leader.term
    );
    assert!(new_leader.term > term_before, "{new_leader:?}");

    let before = acked[shard].load(Ordering::SeqCst);
    wait_for("200 more acknowledged writes on shard 0", DEADLINE, || {
        (acked[shard].load(Ordering::SeqCst) >= before + 200).then_some(())
    });
    let log = workload.finish();
    println!(
        "{} writes acknowledged, {} failed (ambiguous)",
        log.acked.len(),
        log.failed
    );

    // Every acknowledged write reads back (a retried put may have applied
    // twice: same value, later version).
    let keys: Vec<String> = log.acked.iter().map(|(k, _)| k.clone()).collect();
    let found = read_all(&cluster.endpoints(), &keys);
    for (key, version) in &log.acked {
        let (value, read_version) = found[key]
            .clone()
            .unwrap_or_else(|| panic!("acknowledged write {key} (version {version}) is lost"));
        assert_eq!(value, value_of(key));
        assert!(
            read_version >= *version,
            "{key}: {read_version} < {version}"
        );
    }

    cluster.node(victim).start();
    wait_caught_up(&mut cluster, victim);
    let local = stale_read_all(cluster.node(victim), 2, &keys);
    for key in &keys {
        assert_eq!(
            local[key].as_ref().map(|(v, _)| v.clone()),
            Some(value_of(key)),
            "the restarted node lacks {key}"
        );
    }
}

/// kill -9 of the leader of shard 0 (1 shard, 3 nodes) ten times, restarting
/// it each time: prints the median and maximum time from the kill to a new
/// leader that both survivors agree on.
#[test]
fn failover_time_over_ten_leader_kills() {
    let mut cluster = Cluster::start(3, 1);
    cluster.wait_for_leaders();
    let mut times = Vec::new();
    let mut written = Vec::new();
    for round in 0..10 {
        let key = format!("round-{round}");
        put_one(&cluster.endpoints(), &key, &key);
        written.push(key);
        let before = wait_for_agreed_leaders(&mut cluster)[0].clone();
        let (leader, term) = (before.leader_id, before.term);

        let killed = Instant::now();
        cluster.node(leader).kill9();
        let survivors: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
        let (new_leader, took) = measure("a new leader after the kill", killed, || {
            agreed_leader(&cluster, &survivors, 0, leader)
        });
        assert!(new_leader.term > term);
        println!(
            "round {round}: killed {leader}, node {} leads at term {} after {took:?}",
            new_leader.leader_id, new_leader.term
        );
        times.push(took);

        cluster.node(leader).start();
        wait_caught_up(&mut cluster, leader);
    }
    times.sort();
    let median = (times[4] + times[5]) / 2;
    let max = times[9];
    println!(
        "failover over {} kills: median {median:?}, max {max:?}",
        times.len()
    );
    assert!(
        median < Duration::from_secs(3),
        "median failover {median:?}"
    );

    let found = read_all(&cluster.endpoints(), &written);
    for key in &written {
        assert_eq!(
            found[key].as_ref().map(|(v, _)| v.as_str()),
            Some(key.as_str())
        );
    }
}

/// For 60 s, kill -9 a node every few seconds (every other time a leader)
/// and restart it, never two down at once, under puts and CAS increments on
/// 288 keys. At the end every acknowledged put is there with its value or a
/// later one, every counter equals its acknowledged increments exactly (plus
/// at most its OUTCOME_UNKNOWN ones, which exactly-once writes make rare),
/// and all replicas hold the same data.
#[test]
fn chaos_kill9_random_nodes_for_60_seconds() {
    const CHAOS: Duration = Duration::from_secs(60);
    let mut cluster = Cluster::start(3, 2);
    cluster.wait_for_leaders();
    let progress = Arc::new(AtomicU64::new(0));
    let seed = Rng::seed("chaos");
    let workload = Background::start({
        let (endpoints, progress) = (cluster.endpoints(), progress.clone());
        move |stop| chaos_workload(endpoints, seed, progress, stop)
    });
    wait_for("the workload to get going", DEADLINE, || {
        (progress.load(Ordering::SeqCst) >= 50).then_some(())
    });

    let mut rng = Rng::new(seed ^ 0x9e37_79b9_7f4a_7c15);
    let started = Instant::now();
    let mut kills = Vec::new();
    while started.elapsed() < CHAOS && kills.len() < 60 {
        // The schedule's pause between faults, not a wait for a condition.
        std::thread::sleep(Duration::from_millis(1000 + rng.below(1500)));
        let leaders = wait_for_agreed_leaders(&mut cluster);
        let victim = if kills.len() % 2 == 0 {
            leaders[rng.below(leaders.len() as u64) as usize].leader_id
        } else {
            1 + rng.below(3)
        };
        let before = progress.load(Ordering::SeqCst);
        cluster.node(victim).kill9();
        std::thread::sleep(Duration::from_millis(200 + rng.below(1300)));
        cluster.node(victim).start();
        wait_for_agreed_leaders(&mut cluster);
        cluster.nodes.iter_mut().for_each(assert_no_panic);
        kills.push((victim, progress.load(Ordering::SeqCst) - before));
    }
    let ledger = workload.finish();
    println!("chaos: kills (node, ops acknowledged meanwhile): {kills:?}");
    println!("{}", ledger.summary());
    assert!(kills.len() >= 6, "only {} kills in {CHAOS:?}", kills.len());
    assert!(ledger.acked_puts() >= 200, "{}", ledger.summary());
    assert!(ledger.acked_increments() >= 50, "{}", ledger.summary());
    assert!(ledger.unexpected.is_empty(), "{:?}", ledger.unexpected);

    wait_for_agreed_leaders(&mut cluster);
    let keys: Vec<String> = ledger
        .puts
        .keys()
        .chain(ledger.counters.keys())
        .cloned()
        .collect();
    let found = read_all(&cluster.endpoints(), &keys);
    let mut problems = Vec::new();
    for (key, put) in &ledger.puts {
        let seq = found[key].as_ref().map(|(v, _)| v.parse::<u64>().unwrap());
        if let Err(why) = put.check(seq) {
            problems.push(format!("{key}: {why}"));
        }
    }
    for (key, counter) in &ledger.counters {
        let value = found[key]
            .as_ref()
            .map_or(0, |(v, _)| v.parse::<u64>().unwrap());
        if value < counter.acked || value > counter.acked + counter.ambiguous {
            problems.push(format!(
                "{key}: counter is {value}, acknowledged increments {} + ambiguous {}",
                counter.acked, counter.ambiguous
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems: {problems:#?}",
        problems.len()
    );
    let unknown: u64 = ledger.counters.values().map(|c| c.ambiguous).sum();
    assert!(
        unknown * 10 <= ledger.acked_increments(),
        "exactly-once writes should leave few outcomes unknown: {}",
        ledger.summary()
    );

    // Replicas converge to the same state machine.
    for id in 1..=3 {
        wait_caught_up(&mut cluster, id);
    }
    for id in 1..=3 {
        let local = stale_read_all(cluster.node(id), 2, &keys);
        for key in &keys {
            assert_eq!(local[key], found[key], "node {id} diverges on {key}");
        }
    }
}

/// A follower crashes while a record is half written: after kill -9 its
/// newest WAL segment ends in a partial record (see [`Tear::AfterLastRecord`]).
/// It restarts, logs the repair, rejoins and catches up.
#[test]
fn torn_wal_tail_after_the_last_synced_record_is_repaired() {
    torn_tail_scenario(Tear::AfterLastRecord, Restart::Follower);
}

/// The whole cluster is killed -9, and one node's newest segment is torn at
/// a random offset inside its records ([`Tear::RandomOffset`]), losing
/// records it had synced. The other two still hold them: the cluster elects a
/// leader, and the torn node repairs its tail, rejoins and catches up.
#[test]
fn torn_wal_tail_at_a_random_offset_is_repaired_after_a_cluster_restart() {
    torn_tail_scenario(Tear::RandomOffset, Restart::Cluster);
}

/// Issue 5's torn-tail scenario exactly: one follower is killed -9, its
/// newest segment torn at a random offset inside its records, and it alone
/// restarts while the leader keeps running.
///
/// The tear may cut records the follower had synced and acknowledged, so
/// the leader's progress for it still says `matched = N` while its log now
/// ends at M < N (losing synced entries is outside raft's model). The node
/// must not die of it: it lowers its commit index at start-up, clamps the
/// leader's heartbeat commit to its log, and the leader resends the rest.
///
/// The leader's part: once the follower's link comes back, it forgets what
/// it believed the follower holds and probes from its log's end
/// (`Replica::peer_reconnected`); without that, raft-rs saw nothing to resend
/// (its `matched` for the follower was still past the follower's log) and
/// dropped the follower's rejections as stale.
#[test]
fn torn_wal_tail_at_a_random_offset_on_a_restarted_follower() {
    torn_tail_scenario(Tear::RandomOffset, Restart::Follower);
}

/// Who is down while a follower's WAL is torn.
#[derive(Clone, Copy, PartialEq)]
enum Restart {
    /// Only the torn follower; the leader keeps running.
    Follower,
    /// Every node is killed -9 and restarted.
    Cluster,
}

/// Writes, kills, tears the newest segment of each shard of a node that leads
/// nothing, restarts, and checks the repair, the rejoin and the data.
fn torn_tail_scenario(tear: Tear, restart: Restart) {
    let mut cluster = Cluster::start(3, 2);
    let leaders = cluster.wait_for_leaders();
    // With 2 shards on 3 nodes at least one node leads nothing.
    let follower = (1..=3).find(|id| !leaders.contains(id)).unwrap();
    let first: Vec<String> = (0..300).map(|i| format!("d/{i}")).collect();
    put_all(&cluster.endpoints(), &first);
    for id in 1..=3 {
        wait_caught_up(&mut cluster, id);
    }
    let down: Vec<u64> = match restart {
        Restart::Follower => vec![follower],
        Restart::Cluster => vec![1, 2, 3],
    };
    for &id in &down {
        cluster.node(id).kill9();
    }

    let mut rng = Rng::new(Rng::seed("torn tail"));
    let mut damaged = Vec::new();
    for shard in 0..2 {
        let wal = cluster.nodes[follower as usize - 1]
            .data_dir
            .join(format!("shard-{shard:03}"))
            .join("wal");
        // The newest segment with a header: a preallocated successor stays
        // all zeros until its predecessor is durable.
        let newest = segments(&wal)
            .into_iter()
            .rfind(|p| has_header(p))
            .expect("a WAL segment with a header");
        let offset = tear_tail(&newest, &mut rng, tear);
        // A tear that leaves a clean end at a record boundary (the bytes
        // after it zeroed, or garbage behind a zero length) reads as a
        // shorter log in a version 2 segment, whose bytes past the end may
        // be a reused file's old ones: nothing to repair, nothing reported.
        let torn = inspect::Records::new(&std::fs::read(&newest).unwrap()).any(|r| r.is_err());
        println!(
            "shard {shard}: tore {} at offset {offset} ({})",
            newest.display(),
            if torn { "a torn record" } else { "a clean end" }
        );
        if torn {
            damaged.push(newest);
        }
    }

    for &id in &down {
        cluster.node(id).start();
    }
    let repaired = wait_for("the follower to report its repairs", DEADLINE, || {
        let log = cluster.nodes[follower as usize - 1].log();
        let lines: Vec<String> = log
            .lines()
            .filter(|l| l.contains("WAL tail repaired"))
            .map(String::from)
            .collect();
        (lines.len() >= damaged.len()).then_some(lines)
    });
    for segment in &damaged {
        let name = segment.display().to_string();
        assert!(
            repaired.iter().any(|l| l.contains(&name)),
            "no repair of {name} in {repaired:#?}"
        );
    }
    assert_running(cluster.node(follower));
    wait_caught_up(&mut cluster, follower);

    let second: Vec<String> = (0..100).map(|i| format!("d2/{i}")).collect();
    put_all(&cluster.endpoints(), &second);
    for &id in &down {
        wait_caught_up(&mut cluster, id);
    }
    assert_running(cluster.node(follower));
    let keys: Vec<String> = first.iter().chain(&second).cloned().collect();
    let found = read_all(&cluster.endpoints(), &keys);
    let local = stale_read_all(cluster.node(follower), 2, &keys);
    for key in &keys {
        let expected = Some(key.as_str());
        assert_eq!(found[key].as_ref().map(|(v, _)| v.as_str()), expected);
        assert_eq!(
            local[key].as_ref().map(|(v, _)| v.as_str()),
            expected,
            "the repaired follower lacks {key}"
        );
    }
}

/// A flipped byte inside a record of a WAL segment that is not the newest is
/// corruption: the node refuses to start, exits non-zero, and names the
/// segment file and the record's offset.
#[test]
fn corrupt_record_in_an_older_wal_segment_refuses_to_start() {
    let mut cluster = Cluster::configure(1, 1, "");
    set_config(&cluster.nodes[0], "wal_segment_bytes", "1048576");
    cluster.node(1).start();
    wait_for_agreed_leaders(&mut cluster);
    // 24 values of 200 KiB: about 5 MiB, so at least 4 segments of 1 MiB.
    let value = "x".repeat(200 * 1024);
    for i in 0..24 {
        put_one(&cluster.endpoints(), &format!("big/{i}"), &value);
    }
    // kill -9: the test needs the files, not a clean stop.
    cluster.node(1).kill9();

    let wal = cluster.nodes[0].data_dir.join("shard-000").join("wal");
    let mut all: Vec<PathBuf> = segments(&wal)
        .into_iter()
        .filter(|p| has_header(p))
        .collect();
    assert!(all.len() >= 4, "expected several segments: {all:?}");
    all.pop(); // the newest may end in a torn tail; leave it alone
    let target = all[all.len() / 2].clone();
    let offset = flip_byte_in_large_record(&target);
    println!(
        "flipped a byte in the record at {}:{offset}",
        target.display()
    );

    let (status, output) = run_until_exit(&cluster.nodes[0], &cluster.dir.path().join("e.log"));
    assert!(
        !status.success(),
        "started on a corrupt WAL: {status}\n{output}"
    );
    let name = target.display().to_string();
    assert!(
        output.contains(&name) && output.contains(&format!("corrupt at offset {offset}")),
        "the error must name {name} and offset {offset}:\n{output}"
    );
}

/// A data directory written in another data format (a later build, or one
/// from before the format file existed) is refused at start-up with both
/// versions named, and nothing in it is touched.
#[test]
fn a_data_dir_of_another_format_refuses_to_start() {
    let mut cluster = Cluster::configure(1, 1, "");
    cluster.node(1).start();
    wait_for_agreed_leaders(&mut cluster);
    put_one(&cluster.endpoints(), "kept", "1");
    cluster.node(1).terminate();

    let format = cluster.nodes[0].data_dir.join("FORMAT");
    let written = std::fs::read_to_string(&format).expect("a started node records its format");
    assert_eq!(
        written,
        format!("corekv data format {}\n", corekv_proto::DATA_FORMAT_VERSION)
    );
    std::fs::write(&format, "corekv data format 99\n").unwrap();
    let (status, output) = run_until_exit(&cluster.nodes[0], &cluster.dir.path().join("f.log"));
    assert!(
        !status.success(),
        "started on format 99: {status}\n{output}"
    );
    assert!(
        output.contains("holds data format 99")
            && output.contains(&format!(
                "reads format {}",
                corekv_proto::DATA_FORMAT_VERSION
            )),
        "the error must name both formats:\n{output}"
    );

    // Shard data without a format file: written before the file existed.
    std::fs::remove_file(&format).unwrap();
    let (status, output) = run_until_exit(&cluster.nodes[0], &cluster.dir.path().join("g.log"));
    assert!(!status.success(), "started on format 1: {status}\n{output}");
    assert!(output.contains("holds data format 1"), "{output}");
}

/// SIGTERM right after writes of 200 KiB values (so a WAL sync is likely in
/// flight), four times: the node must exit 0 each time and keep every write
/// it acknowledged.
///
/// A regression test: at commit 48dad3b about half of such stops exited 1
/// after the 5 s shutdown grace with `WAL sync already in flight: finish it
/// before beginning another`, because `Shard::run` returned into `shutdown()`
/// mid-batch and dropped the `Input::Synced` drained in the same turn as the
/// shutdown; `shutdown()` then waited for it in vain. 334d233 handles the
/// whole batch first.
#[test]
fn sigterm_after_writes_exits_zero_and_keeps_what_it_acknowledged() {
    let mut cluster = Cluster::configure(1, 1, "");
    set_config(&cluster.nodes[0], "wal_segment_bytes", "1048576");
    let value = "x".repeat(200 * 1024);
    let mut written = Vec::new();
    for round in 0..4 {
        cluster.node(1).start();
        wait_for_agreed_leaders(&mut cluster);
        for i in 0..24 {
            let key = format!("big/{round}/{i}");
            put_one(&cluster.endpoints(), &key, &value);
            written.push(key);
        }
        let status = cluster.node(1).terminate();
        let errors: Vec<String> = cluster.nodes[0]
            .log()
            .lines()
            .filter(|l| l.contains("ERROR"))
            .map(String::from)
            .collect();
        assert_eq!(status.code(), Some(0), "round {round}: {errors:#?}");
    }
    cluster.node(1).start();
    wait_for_agreed_leaders(&mut cluster);
    let found = read_all(&cluster.endpoints(), &written);
    for key in &written {
        let found = found[key].as_ref().map(|(v, _)| v.as_str());
        assert_eq!(found, Some(value.as_str()), "{key} lost");
    }
}

/// Issue 5, point 5: isolate the leader of shard 0 with the partition proxy.
/// The majority elects a new leader and keeps serving; the isolated
/// ex-leader steps down and never answers a linearizable read or a write
/// successfully; after healing it rejoins without changing the majority's
/// terms (pre_vote).
#[test]
fn partitioned_leader_steps_down_serves_nothing_stale_and_rejoins_quietly() {
    let mut cluster = ProxiedCluster::start(3, 2);
    let leaders = cluster.wait_for_leaders();
    let shard = 0;
    let isolated = leaders[shard];
    let majority: Vec<u64> = (1..=3).filter(|&id| id != isolated).collect();
    let key = common::key_on_shard("part/", shard as u32, 2);
    put_one(&cluster.endpoints(), &key, "before");
    for id in 1..=3 {
        wait_caught_up(&mut cluster, id);
    }
    assert!(
        cluster.proxy.forwarded_bytes() > 0,
        "peer traffic must go through the proxy"
    );
    let old = wait_for_agreed_leaders(&mut cluster)[shard].clone();
    assert_eq!(old.leader_id, isolated, "leadership moved before the cut");
    let links_lost = |cluster: &ProxiedCluster| {
        let log = cluster.nodes[isolated as usize - 1].log();
        log.matches("connection lost").count()
    };
    let links_lost_before = links_lost(&cluster);

    let cut = Instant::now();
    cluster.isolate(isolated);
    let isolated_port = cluster.nodes[isolated as usize - 1].client_port + shard as u16;
    // Asked at once, while it may still believe it leads: a linearizable read
    // and a write must not succeed.
    let mut early = RawClient::connect(isolated_port).unwrap();
    early.send(&get_request(1, &key, true)).unwrap();
    early
        .send(&put_request(2, &key, "from-the-minority", true))
        .unwrap();

    // Both events are timed from the cut, in one polling loop.
    let (mut elected, mut stepped_down) = (None, None);
    let (new_leader, _) = measure("a new leader on the majority and a step-down", cut, || {
        if elected.is_none() {
            elected =
                agreed_leader(&cluster, &majority, shard, isolated).map(|s| (s, cut.elapsed()));
        }
        if stepped_down.is_none() {
            let role = shard_status(&cluster, isolated, shard)?.role;
            stepped_down = (role != Role::Leader as i32).then(|| cut.elapsed());
        }
        Some(elected.clone()?.0).filter(|_| stepped_down.is_some())
    });
    let (failover, step_down) = (elected.unwrap().1, stepped_down.unwrap());
    println!(
        "isolated {isolated}: node {} leads at term {} after {failover:?}; \
         the old leader stepped down after {step_down:?}",
        new_leader.leader_id, new_leader.term
    );
    assert!(step_down < Duration::from_secs(5), "{step_down:?}");
    assert_eq!(
        shard_status(&cluster, isolated, shard).unwrap().term,
        old.term,
        "pre_vote: the isolated node must not raise its term"
    );

    // The majority has a leader for every shard (the isolated node may have
    // led shard 1 too) and serves writes.
    for (s, &leader) in leaders.iter().enumerate() {
        let not = if leader == isolated { isolated } else { 0 };
        wait_for("a leader of every shard on the majority", DEADLINE, || {
            agreed_leader(&cluster, &majority, s, not)
        });
    }
    let majority_endpoints: String = majority
        .iter()
        .map(|&id| cluster.nodes[id as usize - 1].endpoint())
        .collect::<Vec<_>>()
        .join(",");
    put_one(&majority_endpoints, &key, "after");

    for _ in 0..2 {
        let response = early.recv().unwrap();
        assert_refused(&response, "a request sent right after the cut");
    }
    for no_forward in [true, false] {
        let mut raw = RawClient::connect(isolated_port).unwrap();
        let response = raw.call(get_request(3, &key, no_forward)).unwrap();
        assert_refused(
            &response,
            &format!("linearizable get, no_forward={no_forward}"),
        );
        let response = raw
            .call(put_request(4, &key, "minority", no_forward))
            .unwrap();
        assert_refused(&response, &format!("put, no_forward={no_forward}"));
    }
    assert!(
        cluster.proxy.discarded_bytes() > 0,
        "the cut swallowed nothing"
    );

    assert_eq!(
        links_lost(&cluster),
        links_lost_before,
        "a cut must look like a silent network, not a closed connection"
    );

    let terms_before: Vec<u64> = majority_terms(&cluster, &majority);
    cluster.proxy.heal();
    wait_caught_up(&mut cluster, isolated);
    let rejoined = shard_status(&cluster, isolated, shard).unwrap();
    assert_eq!(rejoined.leader_id, new_leader.leader_id, "{rejoined:?}");
    let terms_after = majority_terms(&cluster, &majority);
    assert_eq!(
        terms_before, terms_after,
        "healing changed a term on the majority"
    );
    assert_eq!(rejoined.term, terms_after[shard], "{rejoined:?}");
    let local = stale_read_all(cluster.node(isolated), 2, std::slice::from_ref(&key));
    assert_eq!(local[&key].as_ref().map(|(v, _)| v.as_str()), Some("after"));
}

// ---------------------------------------------------------------------------
// Cluster observation
// ---------------------------------------------------------------------------

/// Status of one shard on node `id`; None if `id` is 0 (no leader) or the
/// node does not answer.
fn shard_status(cluster: &Cluster, id: u64, shard: usize) -> Option<ShardStatus> {
    if id == 0 {
        return None;
    }
    cluster.status(id)?.shards.get(shard).cloned()
}

/// The status of the leader of `shard` once every node in `ids` names the
/// same leader, other than `not`, and that leader says it leads.
fn agreed_leader(cluster: &Cluster, ids: &[u64], shard: usize, not: u64) -> Option<ShardStatus> {
    let mut leader = 0;
    for &id in ids {
        let seen = shard_status(cluster, id, shard)?.leader_id;
        if seen == 0 || seen == not || (leader != 0 && seen != leader) {
            return None;
        }
        leader = seen;
    }
    let status = shard_status(cluster, leader, shard)?;
    (status.role == Role::Leader as i32).then_some(status)
}

/// The status of the leader of every shard, once every running node names
/// the same leader and it says it leads. Unlike `Cluster::wait_for_leaders`
/// this does not wait for leadership to move back to each shard's preferred
/// node, which the node holds off for 30 s after a failover: these tests
/// kill leaders faster. Fails at once if a running node's log shows a panic.
fn wait_for_agreed_leaders(cluster: &mut Cluster) -> Vec<ShardStatus> {
    let running: Vec<u64> = cluster
        .nodes
        .iter_mut()
        .filter_map(|n| n.is_running().then_some(n.id))
        .collect();
    let shards = cluster.shards as usize;
    let mut polls = 0u64;
    wait_for(
        "the running nodes to agree on every leader",
        DEADLINE,
        || {
            polls += 1;
            if polls % 20 == 0 {
                for &id in &running {
                    assert_no_panic(cluster.node(id));
                }
            }
            (0..shards)
                .map(|s| agreed_leader(cluster, &running, s, 0))
                .collect()
        },
    )
}

/// Term of every shard as the `ids` nodes agree on it.
fn majority_terms(cluster: &Cluster, ids: &[u64]) -> Vec<u64> {
    let statuses: Vec<Vec<u64>> = ids
        .iter()
        .map(|&id| {
            cluster
                .status(id)
                .unwrap()
                .shards
                .iter()
                .map(|s| s.term)
                .collect()
        })
        .collect();
    assert!(statuses.windows(2).all(|w| w[0] == w[1]), "{statuses:?}");
    statuses[0].clone()
}

/// Waits until node `id` has applied, on every shard, exactly what the
/// shard's leader has applied, and the leader has applied all it committed.
/// Fails at once, with the message, if the node's log shows a panic.
fn wait_caught_up(cluster: &mut Cluster, id: u64) {
    wait_for(
        &format!("node {id} to catch up on every shard"),
        DEADLINE,
        || {
            assert_no_panic(&mut cluster.nodes[id as usize - 1]);
            let mine = cluster.status(id)?;
            for (shard, me) in mine.shards.iter().enumerate() {
                let leader = shard_status(cluster, me.leader_id, shard)?;
                let caught_up = leader.role == Role::Leader as i32
                    && leader.applied_index == leader.commit_index
                    && me.applied_index == leader.applied_index;
                if !caught_up {
                    return None;
                }
            }
            Some(())
        },
    );
}

/// Panics with the panic message if a thread of the node panicked (a shard
/// thread can die while the process keeps running).
fn assert_no_panic(node: &mut Node) {
    let log = node.log();
    if let Some(at) = log.find("panicked at") {
        let message = log[at..].lines().take(2).collect::<Vec<_>>().join(" ");
        let running = node.is_running();
        panic!(
            "node {} panicked (process still running: {running}): {message}",
            node.id
        );
    }
}

/// Panics with the node's errors and panic message if it is not running.
fn assert_running(node: &mut Node) {
    if node.is_running() {
        return;
    }
    let log = node.log();
    let lines: Vec<&str> = log.lines().collect();
    let mut why = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.contains("ERROR") || line.contains("panicked at") {
            why.extend(lines[i..(i + 3).min(lines.len())].iter().copied());
        }
    }
    panic!("node {} exited:\n{}", node.id, why.join("\n"));
}

/// Polls `check` every 5 ms (finer than `wait_for`, for timings) until it
/// returns Some, within `DEADLINE` of `started`; returns the value and the
/// time since `started`.
fn measure<T>(what: &str, started: Instant, mut check: impl FnMut() -> Option<T>) -> (T, Duration) {
    loop {
        if let Some(value) = check() {
            return (value, started.elapsed());
        }
        assert!(
            started.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------
// Raw requests
// ---------------------------------------------------------------------------

fn get_request(id: u64, key: &str, no_forward: bool) -> Request {
    Request {
        id,
        no_forward,
        op: Some(Op::Get(Get {
            key: Bytes::copy_from_slice(key.as_bytes()),
            consistency: Consistency::Linearizable as i32,
            local: false,
        })),
        ..Default::default()
    }
}

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

/// A node that cannot vouch for its data must answer NOT_LEADER,
/// UNAVAILABLE or TIMEOUT; anything else (a value, a write) is a failure.
fn assert_refused(response: &corekv_proto::client::Response, what: &str) {
    let allowed = [
        ErrorCode::NotLeader,
        ErrorCode::Unavailable,
        ErrorCode::Timeout,
    ];
    match &response.result {
        Some(response::Result::Error(e)) if allowed.iter().any(|c| *c as i32 == e.code) => {}
        other => panic!("{what}: the isolated node answered {other:?}"),
    }
}

/// Reads `keys` at one node's own shard ports, STALE: what its state
/// machine holds. `None` = absent.
fn stale_read_all(
    node: &mut Node,
    shards: u32,
    keys: &[String],
) -> HashMap<String, Option<(String, u64)>> {
    let mut conns: Vec<RawClient> = (0..shards)
        .map(|s| RawClient::connect(node.client_port + s as u16).unwrap())
        .collect();
    let mut found = HashMap::new();
    for (i, key) in keys.iter().enumerate() {
        let request = Request {
            id: i as u64,
            no_forward: true,
            op: Some(Op::Get(Get {
                key: Bytes::copy_from_slice(key.as_bytes()),
                consistency: Consistency::Stale as i32,
                local: false,
            })),
            ..Default::default()
        };
        let response = conns[shard_of(key, shards) as usize].call(request).unwrap();
        let value = match response.result {
            Some(response::Result::Get(g)) if g.found => {
                Some((String::from_utf8_lossy(&g.value).into_owned(), g.version))
            }
            Some(response::Result::Get(_)) => None,
            other => panic!("stale get {key} at node {}: {other:?}", node.id),
        };
        found.insert(key.clone(), value);
    }
    found
}

// ---------------------------------------------------------------------------
// Client-library helpers
// ---------------------------------------------------------------------------

fn options(endpoints: &str, timeout: Duration) -> ClientOptions {
    ClientOptions {
        endpoints: endpoints.split(',').map(String::from).collect(),
        request_timeout: timeout,
        tls: common::client_tls(),
        ..Default::default()
    }
}

async fn connect(endpoints: &str) -> Client {
    Client::connect(options(endpoints, Duration::from_secs(20)))
        .await
        .unwrap_or_else(|e| panic!("connect to {endpoints}: {e}"))
}

/// One put that must succeed (within the client's retries).
fn put_one(endpoints: &str, key: &str, value: &str) {
    block_on(async {
        let client = connect(endpoints).await;
        let key_bytes = Bytes::from(key.to_string());
        client
            .put(key_bytes, Bytes::from(value.to_string()))
            .await
            .unwrap_or_else(|e| panic!("put {key}: {e}"));
    });
}

/// Puts every key with itself as the value, 16 at a time; all must succeed.
fn put_all(endpoints: &str, keys: &[String]) {
    block_on(async {
        let client = connect(endpoints).await;
        for chunk in keys.chunks(16) {
            let tasks: Vec<_> = chunk
                .iter()
                .map(|key| {
                    let (client, key) = (client.clone(), key.clone());
                    monoio::spawn(async move {
                        let bytes = Bytes::from(key.clone());
                        let result = client.put(bytes.clone(), bytes).await;
                        result.unwrap_or_else(|e| panic!("put {key}: {e}"));
                    })
                })
                .collect();
            for task in tasks {
                task.await;
            }
        }
    });
}

/// Linearizable reads of every key, 16 at a time; every read must succeed.
fn read_all(endpoints: &str, keys: &[String]) -> HashMap<String, Option<(String, u64)>> {
    block_on(async {
        let client = connect(endpoints).await;
        let mut found = HashMap::new();
        for chunk in keys.chunks(16) {
            let tasks: Vec<_> = chunk
                .iter()
                .map(|key| {
                    let (client, key) = (client.clone(), key.clone());
                    monoio::spawn(async move {
                        let bytes = Bytes::from(key.clone());
                        let read = client.get(bytes, Consistency::Linearizable).await;
                        let read = read.unwrap_or_else(|e| panic!("get {key}: {e}"));
                        let value = read.map(|(v, version)| {
                            (String::from_utf8_lossy(&v).into_owned(), version)
                        });
                        (key, value)
                    })
                })
                .collect();
            for task in tasks {
                let (key, value) = task.await;
                found.insert(key, value);
            }
        }
        found
    })
}

/// A workload on a thread of its own (the client library is single-threaded);
/// `finish` stops it and returns what it recorded. Dropped without
/// `finish` (a failing test), it is told to stop.
struct Background<T: Send + 'static> {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<T>>,
}

impl<T: Send + 'static> Background<T> {
    fn start(body: impl FnOnce(Arc<AtomicBool>) -> T + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || body(flag));
        Background {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> T {
        self.stop.store(true, Ordering::SeqCst);
        let thread = self.thread.take().unwrap();
        thread.join().expect("workload thread panicked")
    }
}

impl<T: Send + 'static> Drop for Background<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Upper bound on the operations one workload task issues.
const MAX_OPS_PER_TASK: u64 = 1_000_000;

/// What `distinct_puts` saw.
#[derive(Default)]
struct PutLog {
    /// Acknowledged keys with their versions.
    acked: Vec<(String, u64)>,
    /// Puts that failed (they may or may not have applied).
    failed: usize,
}

/// The value `distinct_puts` writes at `key`.
fn value_of(key: &str) -> String {
    format!("v-{key}")
}

/// `tasks` writers, each putting keys `a/{task}/{n}` = `value_of(key)` in turn,
/// until `stop`; counts acknowledged writes per shard in `acked`.
fn distinct_puts(
    endpoints: String,
    shards: u32,
    tasks: u64,
    acked: Arc<[AtomicU64; 2]>,
    stop: Arc<AtomicBool>,
) -> PutLog {
    block_on(async move {
        // A short deadline: a stopped workload ends within it.
        let client = Client::connect(options(&endpoints, Duration::from_secs(5)))
            .await
            .expect("connect");
        let log = Rc::new(RefCell::new(PutLog::default()));
        let handles: Vec<_> = (0..tasks)
            .map(|task| {
                let (client, log, acked, stop) =
                    (client.clone(), log.clone(), acked.clone(), stop.clone());
                monoio::spawn(async move {
                    for n in 0..MAX_OPS_PER_TASK {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let key = format!("a/{task}/{n}");
                        let value = Bytes::from(value_of(&key));
                        match client.put(Bytes::from(key.clone()), value).await {
                            Ok(version) => {
                                acked[shard_of(&key, shards) as usize]
                                    .fetch_add(1, Ordering::SeqCst);
                                log.borrow_mut().acked.push((key, version));
                            }
                            Err(_) => log.borrow_mut().failed += 1,
                        }
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.await;
        }
        Rc::try_unwrap(log).ok().unwrap().into_inner()
    })
}

/// A key written by exactly one task with values `1, 2, 3, ...` (its
/// sequence numbers), so "the acknowledged value or a later one" is
/// checkable.
#[derive(Default)]
struct PutKey {
    /// Highest sequence sent.
    attempted: u64,
    /// Highest sequence acknowledged.
    acked: u64,
    /// Puts acknowledged.
    acked_count: u64,
    /// Sequences whose put failed: they may apply, even late.
    ambiguous: BTreeSet<u64>,
}

impl PutKey {
    /// Whether `seq` (what the key holds, None = absent) is allowed: the
    /// last acknowledged value, one sent after it, or an ambiguous one
    /// (a failed put never completed, so it may take effect at any time).
    fn check(&self, seq: Option<u64>) -> Result<(), String> {
        let allowed =
            |s: u64| (s >= self.acked && s <= self.attempted) || self.ambiguous.contains(&s);
        match seq {
            None if self.acked == 0 => Ok(()),
            Some(s) if allowed(s) => Ok(()),
            _ => Err(format!(
                "holds {seq:?}; acknowledged up to {}, sent up to {}, ambiguous {:?}",
                self.acked, self.attempted, self.ambiguous
            )),
        }
    }
}

/// A counter incremented by exactly one task with read + CAS.
#[derive(Default)]
struct Counter {
    /// Increments acknowledged.
    acked: u64,
    /// Increments that failed in a way that may have applied, including
    /// VERSION_MISMATCH: with one writer and a fresh read it means an
    /// earlier attempt of this CAS (a retry inside the client) applied.
    ambiguous: u64,
}

#[derive(Default)]
struct Ledger {
    puts: BTreeMap<String, PutKey>,
    counters: BTreeMap<String, Counter>,
    /// Errors no fault should cause (INTERNAL, INVALID_ARGUMENT, ...).
    unexpected: Vec<String>,
    /// Failed reads before a CAS (the CAS was then not sent).
    failed_reads: u64,
}

impl Ledger {
    fn acked_puts(&self) -> u64 {
        self.puts.values().map(|p| p.acked_count).sum()
    }

    fn acked_increments(&self) -> u64 {
        self.counters.values().map(|c| c.acked).sum()
    }

    fn summary(&self) -> String {
        format!(
            "puts: {} acknowledged, {} ambiguous; increments: {} acknowledged, {} ambiguous; \
             {} failed reads",
            self.acked_puts(),
            self.puts.values().map(|p| p.ambiguous.len()).sum::<usize>(),
            self.acked_increments(),
            self.counters.values().map(|c| c.ambiguous).sum::<u64>(),
            self.failed_reads
        )
    }

    /// Records an error that is not an expected consequence of a fault.
    fn classify(&mut self, what: &str, error: &ClientError) {
        let expected = match error {
            ClientError::Timeout { .. }
            | ClientError::NoEndpoint(_)
            | ClientError::OutcomeUnknown { .. } => true,
            ClientError::Server { code, .. } => matches!(
                code,
                ErrorCode::Timeout
                    | ErrorCode::Unavailable
                    | ErrorCode::NotLeader
                    | ErrorCode::VersionMismatch
            ),
        };
        if !expected {
            self.unexpected.push(format!("{what}: {error}"));
        }
    }
}

/// Tasks of the chaos workload; each owns its keys.
const CHAOS_TASKS: u64 = 8;
/// Put keys `p/0 .. p/239` and counters `c/0 .. c/47`.
const PUT_KEYS: u64 = 240;
const COUNTERS: u64 = 48;

/// Puts (70 %) and read + CAS increments (30 %) on keys owned by one task
/// each, until `stop`. `progress` counts acknowledged operations.
fn chaos_workload(
    endpoints: String,
    seed: u64,
    progress: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Ledger {
    block_on(async move {
        let client = Client::connect(options(&endpoints, Duration::from_secs(5)))
            .await
            .expect("connect");
        let ledger = Rc::new(RefCell::new(Ledger::default()));
        let handles: Vec<_> = (0..CHAOS_TASKS)
            .map(|task| {
                let (client, ledger) = (client.clone(), ledger.clone());
                let (progress, stop) = (progress.clone(), stop.clone());
                let mut rng = Rng::new(seed.wrapping_add(task * 7919));
                monoio::spawn(async move {
                    let puts: Vec<String> = (task..PUT_KEYS)
                        .step_by(CHAOS_TASKS as usize)
                        .map(|i| format!("p/{i}"))
                        .collect();
                    let counters: Vec<String> = (task..COUNTERS)
                        .step_by(CHAOS_TASKS as usize)
                        .map(|i| format!("c/{i}"))
                        .collect();
                    for _ in 0..MAX_OPS_PER_TASK {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let done = if rng.below(10) < 7 {
                            let key = &puts[rng.below(puts.len() as u64) as usize];
                            chaos_put(&client, &ledger, key).await
                        } else {
                            let key = &counters[rng.below(counters.len() as u64) as usize];
                            chaos_increment(&client, &ledger, key).await
                        };
                        if done {
                            progress.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.await;
        }
        Rc::try_unwrap(ledger).ok().unwrap().into_inner()
    })
}

/// Puts the key's next sequence number; true if acknowledged.
async fn chaos_put(client: &Client, ledger: &Rc<RefCell<Ledger>>, key: &str) -> bool {
    let seq = {
        let mut ledger = ledger.borrow_mut();
        let entry = ledger.puts.entry(key.to_string()).or_default();
        entry.attempted += 1;
        entry.attempted
    };
    let result = client
        .put(Bytes::from(key.to_string()), Bytes::from(seq.to_string()))
        .await;
    let mut ledger = ledger.borrow_mut();
    match result {
        Ok(_) => {
            let entry = ledger.puts.get_mut(key).unwrap();
            entry.acked = seq;
            entry.acked_count += 1;
            true
        }
        Err(e) => {
            ledger.classify(&format!("put {key}={seq}"), &e);
            ledger.puts.get_mut(key).unwrap().ambiguous.insert(seq);
            false
        }
    }
}

/// Reads the counter and CASes it to value + 1; true if acknowledged.
async fn chaos_increment(client: &Client, ledger: &Rc<RefCell<Ledger>>, key: &str) -> bool {
    ledger
        .borrow_mut()
        .counters
        .entry(key.to_string())
        .or_default();
    let key_bytes = Bytes::from(key.to_string());
    let (value, version) = match client
        .get(key_bytes.clone(), Consistency::Linearizable)
        .await
    {
        Ok(Some((value, version))) => (
            String::from_utf8_lossy(&value).parse::<u64>().unwrap(),
            version,
        ),
        Ok(None) => (0, 0),
        Err(e) => {
            let mut ledger = ledger.borrow_mut();
            ledger.classify(&format!("get {key}"), &e);
            ledger.failed_reads += 1;
            return false;
        }
    };
    let next = Bytes::from((value + 1).to_string());
    let result = client.cas(key_bytes, version, next).await;
    let mut ledger = ledger.borrow_mut();
    match result {
        Ok(_) => {
            ledger.counters.get_mut(key).unwrap().acked += 1;
            true
        }
        Err(e) => {
            ledger.classify(&format!("cas {key}@{version}"), &e);
            // Exactly-once writes: only an unknown outcome may have applied.
            // A VERSION_MISMATCH is another writer's win, never our own
            // first attempt answered again.
            if matches!(e, ClientError::OutcomeUnknown { .. }) {
                ledger.counters.get_mut(key).unwrap().ambiguous += 1;
            }
            false
        }
    }
}

// ---------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------

/// Replaces (or adds) `key = value` at the top of a node's config file.
fn set_config(node: &Node, key: &str, value: &str) {
    let text = std::fs::read_to_string(&node.config_path).unwrap();
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with(&format!("{key} =")))
        .map(String::from)
        .collect();
    lines.insert(0, format!("{key} = {value}"));
    std::fs::write(&node.config_path, lines.join("\n") + "\n").unwrap();
}

/// The WAL segment files of a directory, oldest first.
fn segments(wal: &Path) -> Vec<PathBuf> {
    let mut all: Vec<PathBuf> = std::fs::read_dir(wal)
        .unwrap_or_else(|e| panic!("read {}: {e}", wal.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    all.sort();
    all
}

/// Whether a segment file has a valid header (a preallocated successor
/// stays all zeros until its predecessor is durable).
fn has_header(path: &Path) -> bool {
    let bytes = std::fs::read(path).unwrap();
    matches!(inspect::header(&bytes), inspect::Header::Valid { .. })
}

/// The records of a segment that check out, in order, read with the WAL's
/// own reader: (offset, bytes with padding, whether it holds entries, bytes
/// of kind and payload).
fn records(bytes: &[u8]) -> Vec<(usize, usize, bool, usize)> {
    inspect::Records::new(bytes)
        .map_while(Result::ok)
        .map(|r| {
            let entries = matches!(r.content, inspect::Content::Entries(_));
            (
                r.offset as usize,
                r.len as usize,
                entries,
                r.body_len as usize,
            )
        })
        .collect()
}

/// Where records start in a segment.
const FIRST_RECORD: usize = inspect::FIRST_RECORD_OFFSET as usize;
/// The kind byte of an entries record (wal/src/format.rs), only to make the
/// half-written record of a torn tail look like a real one.
const KIND_ENTRIES: u8 = 1;

/// How a test damages the newest WAL segment of a stopped node. The layout
/// (wal/src/format.rs): a 32-byte header, then 8-byte aligned records
/// `len u32 | crc32 u32 | kind u8 | payload`, then zeros up to the
/// preallocated size.
#[derive(Clone, Copy, Debug)]
enum Tear {
    /// A crash in the middle of an append: right after the last record, the
    /// first 512 bytes of a record that claims 4 KiB (len, a wrong crc, kind
    /// entries, random payload) and nothing after. No synced record is
    /// touched: the model a torn tail is meant for.
    AfterLastRecord,
    /// A random offset in `[32, end of the last record)` is chosen, the file
    /// is truncated there and extended back to its preallocated length (the
    /// unwritten tail of a preallocated file reads as zeros), then 16 bytes
    /// among the 512 after the offset are flipped (a half-written sector).
    /// This cuts records the node had synced and acknowledged: more than a
    /// real crash can do.
    RandomOffset,
}

/// Tears the tail of a segment; returns the offset where the damage starts.
fn tear_tail(path: &Path, rng: &mut Rng, tear: Tear) -> u64 {
    use std::os::unix::fs::FileExt;
    let bytes = std::fs::read(path).unwrap();
    let written = records(&bytes)
        .last()
        .map_or(FIRST_RECORD, |&(offset, len, _, _)| offset + len);
    assert!(written > FIRST_RECORD, "{} has no records", path.display());
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let (offset, garbage) = match tear {
        Tear::AfterLastRecord => {
            let offset = written.next_multiple_of(8);
            let mut partial = Vec::with_capacity(512);
            partial.extend_from_slice(&4096u32.to_le_bytes());
            partial.extend_from_slice(&(rng.next() as u32).to_le_bytes());
            partial.push(KIND_ENTRIES);
            while partial.len() < 512 {
                partial.push(rng.next() as u8);
            }
            (offset, partial)
        }
        Tear::RandomOffset => {
            let span = (written - FIRST_RECORD) as u64;
            let offset = FIRST_RECORD + rng.below(span) as usize;
            file.set_len(offset as u64).unwrap();
            file.set_len(bytes.len() as u64).unwrap();
            let mut flipped = vec![0u8; 512.min(bytes.len() - offset)];
            for _ in 0..16 {
                let at = rng.below(flipped.len() as u64) as usize;
                flipped[at] ^= 0xff;
            }
            (offset, flipped)
        }
    };
    assert!(offset + garbage.len() <= bytes.len(), "segment too small");
    file.write_all_at(&garbage, offset as u64).unwrap();
    file.sync_all().unwrap();
    offset as u64
}

/// Flips one byte in the middle of the payload of the first entries record
/// of over 64 KiB in `path`; returns the record's offset.
fn flip_byte_in_large_record(path: &Path) -> u64 {
    let mut bytes = std::fs::read(path).unwrap();
    let (offset, len) = records(&bytes)
        .into_iter()
        .find(|&(_, _, entries, body_len)| entries && body_len > 64 * 1024)
        .map(|(offset, len, _, _)| (offset, len))
        .unwrap_or_else(|| panic!("no large entries record in {}", path.display()));
    // Half of a record this large is well inside its payload.
    bytes[offset + len / 2] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
    offset as u64
}

/// Runs `corekv run` on a node's config until it exits by itself (killed
/// after `DEADLINE`); returns the status and everything it printed.
fn run_until_exit(node: &Node, output: &Path) -> (std::process::ExitStatus, String) {
    struct Reap(Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            if let Ok(None) = self.0.try_wait() {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
    }
    let file = std::fs::File::create(output).unwrap();
    let child = Command::new(COREKV)
        .arg("run")
        .arg("--config")
        .arg(&node.config_path)
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("spawn corekv");
    let mut child = Reap(child);
    let status = wait_for("corekv to exit on a corrupt WAL", DEADLINE, || {
        child.0.try_wait().unwrap()
    });
    (status, std::fs::read_to_string(output).unwrap())
}

// ---------------------------------------------------------------------------
// Randomness
// ---------------------------------------------------------------------------

/// xorshift64*: enough for schedules and offsets. Seeds are printed so a
/// failure can be replayed with `COREKV_TEST_SEED`.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// `COREKV_TEST_SEED` if set, else one from the clock; printed.
    fn seed(what: &str) -> u64 {
        let seed = std::env::var("COREKV_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        println!("{what}: seed {seed} (set COREKV_TEST_SEED to replay)");
        seed
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform enough in `[0, n)`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
