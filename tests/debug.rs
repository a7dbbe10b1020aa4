//! `corekv debug wal` and `corekv debug snapshot` on the files of a real
//! cluster: what was written shows up, nothing on disk changes, and damage
//! is named by file and offset (exit code 1) while `--skip-corrupt` reads
//! on past it.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use common::{files_under, wait_for, Cluster, RawClient, COREKV, DEADLINE};
use corekv_proto::client::{request::Op, response, Put, Request};
use corekv_wal::inspect::{self, Content, Header, Records};
use serde_json::Value;

/// One snapshot after 200 entries. The next needs 125 % of the state's keys
/// more (snapshot_log_percent), so the 350 writes below make exactly one,
/// and the WAL, compacted only up to the snapshot before the newest, keeps
/// the whole log. 1 MiB segments: 350 values of 4 KiB fill two.
const CONFIG: &str = "snapshot_entries = 200\nwal_segment_bytes = 1048576\n";
const BULK_WRITES: u64 = 350;

#[test]
fn debug_commands_read_a_stopped_nodes_wal_and_snapshot() {
    let mut cluster = Cluster::configure(3, 1, CONFIG);
    for node in &mut cluster.nodes {
        node.start();
    }
    let leader = cluster.wait_for_leaders()[0];
    let keys: Vec<String> = (0..5).map(|i| format!("debug/key-{i}")).collect();
    for (i, key) in keys.iter().enumerate() {
        let (code, stdout, stderr) = cluster.cli(&["put", key, &format!("value-{i}")]);
        assert_eq!(code, 0, "put {key}: {stdout}{stderr}");
    }
    write_bulk(cluster.nodes[leader as usize - 1].client_port, BULK_WRITES);
    wait_for("node 1 to apply everything and snapshot", DEADLINE, || {
        let commit = cluster.status(leader)?.shards[0].commit_index;
        let applied = cluster.status(1)?.shards[0].applied_index;
        let log = cluster.nodes[0].log();
        (applied >= commit && log.contains("snapshot created")).then_some(())
    });
    for id in 1..=3 {
        assert!(cluster.node(id).terminate().success(), "node {id} exit");
    }

    let data_dir = cluster.nodes[0].data_dir.clone();
    let wal_dir = data_dir.join("shard-000").join("wal");
    let before = snapshot_of_files(&data_dir);

    // Every record, as text: the bootstrap voters with their ports, then
    // the writes.
    let (code, text, stderr) = debug(&["wal", path(&wal_dir)]);
    assert_eq!(code, 0, "{stderr}");
    for node in &cluster.nodes {
        let id = node.id;
        let line = format!(
            "entry index={id} term=1 conf-change-v2 add-voter {id} [{id} 127.0.0.1 client={} peer={} admin={}]",
            node.client_port, node.peer_port, node.admin_port
        );
        assert!(text.contains(&line), "no `{line}` in:\n{}", head(&text));
    }
    for (i, key) in keys.iter().enumerate() {
        let put = format!(
            "normal put key=\"{key}\" value_bytes={}",
            format!("value-{i}").len()
        );
        assert!(text.contains(&put), "no `{put}` in:\n{}", head(&text));
    }
    assert!(text.contains("hard-state term="), "{}", head(&text));
    assert!(text.contains("0000000000000002.wal:"), "a second segment");

    // The same as JSON lines, which agree with the text.
    let (code, json, stderr) = debug(&["--json", "wal", path(&wal_dir)]);
    assert_eq!(code, 0, "{stderr}");
    let lines = parse_lines(&json);
    let entries: Vec<&Value> = lines.iter().filter(|l| l["kind"] == "entry").collect();
    let bootstrap = entries.iter().find(|e| e["index"] == 2).unwrap();
    assert_eq!(bootstrap["entry_type"], "conf_change_v2");
    assert_eq!(bootstrap["changes"][0]["op"], "add_voter");
    assert_eq!(bootstrap["changes"][0]["node_id"], 2);
    assert_eq!(
        bootstrap["members"][0]["peer_port"],
        cluster.nodes[1].peer_port
    );
    let puts: BTreeMap<String, u64> = entries
        .iter()
        .filter(|e| e["op"] == "put")
        .map(|e| {
            (
                e["key"].as_str().unwrap().to_string(),
                e["index"].as_u64().unwrap(),
            )
        })
        .collect();
    for key in &keys {
        assert!(puts.contains_key(key), "{key} not among the put entries");
    }
    assert_eq!(puts.len() as u64, keys.len() as u64 + BULK_WRITES);
    let records = lines
        .iter()
        .filter(|l| {
            ["hard_state", "conf_state", "snapshot_marker", "seal"]
                .contains(&l["kind"].as_str().unwrap())
        })
        .count() as u64;
    let entry_records: std::collections::BTreeSet<(String, u64)> = entries
        .iter()
        .map(|e| {
            (
                e["segment"].as_str().unwrap().to_string(),
                e["offset"].as_u64().unwrap(),
            )
        })
        .collect();

    // --summary: counts per segment and in total, matching the listing.
    let (code, summary, stderr) = debug(&["--json", "wal", "--summary", path(&wal_dir)]);
    assert_eq!(code, 0, "{stderr}");
    let summary = parse_lines(&summary);
    let total = summary.iter().find(|l| l["kind"] == "total").unwrap();
    assert_eq!(total["entries"], entries.len() as u64);
    assert_eq!(total["records"], records + entry_records.len() as u64);
    assert_eq!(total["first_index"], 1);
    assert_eq!(total["last_index"], entries.last().unwrap()["index"]);
    assert_eq!(total["corrupt"], 0);
    assert!(total["torn_tail"].is_null(), "{total}");
    let per_segment: u64 = summary
        .iter()
        .filter(|l| l["kind"] == "segment_summary")
        .map(|l| l["entries"].as_u64().unwrap())
        .sum();
    assert_eq!(per_segment, entries.len() as u64);
    let (code, text, _) = debug(&["wal", "--summary", path(&wal_dir)]);
    assert_eq!(code, 0);
    assert!(text.contains("total segments="), "{text}");

    // A data directory: every shard's WAL, and it says which it found.
    let (code, _, stderr) = debug(&["wal", "--summary", path(&data_dir)]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("found shard directories shard-000"),
        "{stderr}"
    );

    // The snapshot: metadata, and as many pairs as distinct keys were put
    // up to its index.
    let snap = files_under(&data_dir.join("shard-000").join("snap"))
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "snap"))
        .expect("a snapshot file");
    let (code, text, stderr) = debug(&["snapshot", path(&snap)]);
    assert_eq!(code, 0, "{stderr}");
    assert!(text.contains("format 4, shard 0, index "), "{text}");
    assert!(
        text.contains("voters [1, 2, 3]") && text.contains("checksum ok"),
        "{text}"
    );
    let (code, json, stderr) = debug(&["--json", "snapshot", "--keys", path(&snap)]);
    assert_eq!(code, 0, "{stderr}");
    let lines = parse_lines(&json);
    let meta = lines.last().unwrap();
    assert_eq!(meta["kind"], "snapshot");
    let index = meta["index"].as_u64().unwrap();
    let name = snap.file_name().unwrap().to_str().unwrap();
    assert!(
        name.starts_with(&format!("{index:020}-")),
        "{name} vs {meta}"
    );
    assert_eq!(meta["shard"], 0);
    assert_eq!(meta["membership"]["voters"], serde_json::json!([1, 2, 3]));
    assert_eq!(
        meta["membership"]["members"][2]["client_port"],
        cluster.nodes[2].client_port
    );
    let expected_pairs = puts.values().filter(|&&i| i <= index).count() as u64;
    assert_eq!(meta["pairs"], expected_pairs, "{meta}");
    let pairs = lines.iter().filter(|l| l["kind"] == "pair").count() as u64;
    assert_eq!(pairs, expected_pairs);
    assert!(lines
        .iter()
        .any(|l| l["key"] == "debug/key-0" && l["value_bytes"] == 7));

    assert_eq!(
        snapshot_of_files(&data_dir),
        before,
        "a debug command changed a file"
    );

    // Half a record after the last one of the newest segment: a torn tail,
    // which recovery cuts, so not corruption.
    let newest = wal_dir.join("0000000000000002.wal");
    let end = tear_after_last_record(&newest);
    let (code, summary, stderr) = debug(&["--json", "wal", "--summary", path(&wal_dir)]);
    assert_eq!(code, 0, "{stderr}");
    let total = parse_lines(&summary).pop().unwrap();
    assert_eq!(total["torn_tail"], format!("0000000000000002.wal:{end}"));
    assert_eq!(total["corrupt"], 0);
    let (_, text, _) = debug(&["wal", path(&wal_dir)]);
    assert!(
        text.contains(&format!("0000000000000002.wal:{end} torn tail: ")),
        "{}",
        tail(&text)
    );

    // A flipped byte in the middle of the older segment: exit 1, naming the
    // file and the record's offset; --skip-corrupt reads on past it.
    let first = wal_dir.join("0000000000000001.wal");
    let (offset, len) = flip_byte_in_middle_record(&first);
    let (code, text, stderr) = debug(&["wal", path(&wal_dir)]);
    assert_eq!(code, 1, "{stderr}");
    let message = format!("0000000000000001.wal is corrupt at offset {offset}: checksum expected");
    assert!(stderr.contains(&message), "no `{message}` in {stderr}");
    assert!(
        text.contains("entry index=1 term=1"),
        "what came before is printed"
    );
    assert!(
        !text.contains("0000000000000002.wal:"),
        "reading stops at the damage"
    );
    let (code, text, stderr) = debug(&["wal", "--skip-corrupt", path(&wal_dir)]);
    assert_eq!(code, 1, "{stderr}");
    let skipped = format!(
        "skipped {len} bytes to the next good record at offset {}",
        offset + len
    );
    assert!(
        text.contains(&skipped),
        "no `{skipped}` in:\n{}",
        tail(&text)
    );
    assert!(
        text.contains("0000000000000002.wal:"),
        "reads on into the next segment"
    );
    assert!(
        text.contains(&format!("put key=\"bulk/{}\"", BULK_WRITES - 1)),
        "the last write is read"
    );

    // A damaged snapshot: exit 1, naming the file and an offset.
    let mut bytes = std::fs::read(&snap).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    let damaged = cluster.dir.path().join("damaged.snap");
    std::fs::write(&damaged, bytes).unwrap();
    let (code, _, stderr) = debug(&["snapshot", path(&damaged)]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("damaged.snap is corrupt at offset")
            && stderr.contains("checksum expected"),
        "{stderr}"
    );

    // What is not there is a usage error.
    let missing = cluster.dir.path().join("missing");
    assert_eq!(debug(&["wal", path(&missing)]).0, 2);
    assert_eq!(debug(&["snapshot", path(&missing)]).0, 2);
}

/// Runs `corekv debug ARGS`; returns (exit code, stdout, stderr).
fn debug(args: &[&str]) -> (i32, String, String) {
    let (global, rest): (Vec<&str>, Vec<&str>) = args.iter().partition(|a| **a == "--json");
    let output = Command::new(COREKV)
        .args(global)
        .arg("debug")
        .args(rest)
        .output()
        .expect("run corekv debug");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn path(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temp path")
}

fn parse_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn head(text: &str) -> String {
    text.lines().take(40).collect::<Vec<_>>().join("\n")
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Every file under `dir` with its bytes.
fn snapshot_of_files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    files_under(dir)
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

/// Writes `count` keys `bulk/{i}` with 4 KiB values through `port`, 50
/// pipelined at a time.
fn write_bulk(port: u16, count: u64) {
    let mut raw = RawClient::connect(port).unwrap();
    let value = Bytes::from(vec![b'v'; 4096]);
    for start in (0..count).step_by(50) {
        let end = (start + 50).min(count);
        for i in start..end {
            let put = Put {
                key: Bytes::from(format!("bulk/{i}")),
                value: value.clone(),
            };
            let request = Request {
                id: i,
                op: Some(Op::Put(put)),
                ..Default::default()
            };
            raw.send(&request).unwrap();
        }
        for _ in start..end {
            let response = raw.recv().unwrap();
            assert!(
                matches!(response.result, Some(response::Result::Write(_))),
                "{response:?}"
            );
        }
    }
}

/// Writes the first bytes of a record that claims more than follows right
/// after the last record of `segment`; returns where the records end.
fn tear_after_last_record(segment: &Path) -> u64 {
    use std::os::unix::fs::FileExt as _;
    let bytes = std::fs::read(segment).unwrap();
    let mut records = Records::new(&bytes);
    records.by_ref().for_each(|r| {
        r.unwrap();
    });
    let end = records.offset();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(segment)
        .unwrap();
    let mut partial = 4096u32.to_le_bytes().to_vec();
    partial.extend_from_slice(&[0xab; 60]);
    file.write_all_at(&partial, end).unwrap();
    end
}

/// Flips a byte in the payload of the middle entries record of a segment,
/// found with the WAL's own reader; returns the record's offset and length.
fn flip_byte_in_middle_record(segment: &Path) -> (u64, u64) {
    let mut bytes = std::fs::read(segment).unwrap();
    assert!(matches!(inspect::header(&bytes), Header::Valid { .. }));
    let (offset, len, body_len) = {
        let entries: Vec<_> = Records::new(&bytes)
            .map(Result::unwrap)
            .filter(|r| matches!(r.content, Content::Entries(_)))
            .collect();
        let middle = &entries[entries.len() / 2];
        (middle.offset, middle.len, middle.body_len)
    };
    bytes[(offset + 8 + body_len / 2) as usize] ^= 0x01;
    std::fs::write(segment, bytes).unwrap();
    (offset, len)
}
