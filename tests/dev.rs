//! `corekv dev`: the README's "run it" command, end to end.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{wait_for, COREKV, DEADLINE};

/// A port base for `corekv dev` (node i on base + 100 i), reserved
/// against the other tests' clusters for as long as the reservation lives.
fn free_base() -> (u16, common::PortReservation) {
    let (first_node, reservation) = common::free_port_base(3, 2);
    (first_node - 100, reservation)
}

/// Kills `corekv dev` (and so its nodes) by pid when dropped; on a panic,
/// prints its stderr and the tail of every node's log.
struct Guard(u32, std::path::PathBuf);

impl Drop for Guard {
    fn drop(&mut self) {
        // SIGTERM first: `corekv dev` stops its nodes on it, while a SIGKILL
        // would leave them running. SIGKILL only if it does not exit.
        let pid = self.0 as i32;
        // SAFETY: kill(2) and waitpid(2) on the pid of our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut status = 0;
        while unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == 0
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        unsafe { libc::kill(pid, libc::SIGKILL) };
        if std::thread::panicking() {
            let err = std::fs::read_to_string(self.1.join("dev.err")).unwrap_or_default();
            eprintln!("---- corekv dev stderr ----\n{err}");
            for i in 1..=3 {
                let log = self.1.join(format!("node{i}/corekv.log"));
                let log = std::fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                eprintln!("---- node {i} log (tail) ----");
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// Starts `corekv dev` with 2 shards on `base` in `dir` (plus `extra`
/// flags) and waits until it reports the cluster up; returns it, its
/// guard and every line it printed.
fn start_dev(
    dir: &std::path::Path,
    base: u16,
    extra: &[&str],
) -> (std::process::Child, Guard, Vec<String>) {
    let mut dev = Command::new(COREKV)
        .args(["dev", "--shards", "2", "--port-base", &base.to_string()])
        .args(extra)
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("dev.err")).unwrap())
        .spawn()
        .unwrap();
    let guard = Guard(dev.id(), dir.to_path_buf());
    let (tx, rx) = mpsc::channel();
    let stdout = dev.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut printed = Vec::new();
    wait_for("corekv dev to report the cluster up", DEADLINE, || {
        while let Ok(line) = rx.try_recv() {
            printed.push(line);
        }
        printed
            .iter()
            .any(|l| l.contains("cluster is up"))
            .then_some(())
    });
    (dev, guard, printed)
}

#[test]
fn dev_starts_a_cluster_that_serves_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _ports) = free_base();
    let (mut dev, _guard, printed) = start_dev(dir.path(), base, &[]);
    let pid = dev.id();
    let endpoint = format!("127.0.0.1:{}", base + 100);
    assert!(printed.iter().any(|l| l.contains(&endpoint)), "{printed:?}");
    assert!(printed.iter().any(|l| l.contains("put a 1")), "{printed:?}");
    let cli = |args: &[&str]| {
        let out = Command::new(COREKV)
            .arg("--endpoints")
            .arg(&endpoint)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    assert_eq!(cli(&["put", "a", "1"]).0, Some(0));
    assert_eq!(cli(&["get", "a"]), (Some(0), "1\n".to_string()));
    let (code, status) = cli(&["--json", "status"]);
    assert_eq!(code, Some(0));
    let status: serde_json::Value = serde_json::from_str(status.trim()).unwrap();
    assert_eq!(status["nodes"].as_array().unwrap().len(), 3);
    for i in 1..=3 {
        assert!(dir.path().join(format!("node{i}/corekv.toml")).exists());
    }

    // SIGTERM stops the children too: their ports come free.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = wait_for("corekv dev to exit", DEADLINE, || dev.try_wait().unwrap());
    assert!(status.success(), "{status}");
    wait_for(
        "the nodes' ports to be free",
        Duration::from_secs(30),
        || {
            (1..=3u16)
                .all(|i| TcpListener::bind(("127.0.0.1", base + 100 * i)).is_ok())
                .then_some(())
        },
    );

    // A second run resumes with the data.
    let mut again = Command::new(COREKV)
        .args([
            "dev",
            "--shards",
            "2",
            "--port-base",
            &base.to_string(),
            "--dir",
        ])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _guard2 = Guard(again.id(), dir.path().to_path_buf());
    let value = wait_for("the resumed cluster to serve the old key", DEADLINE, || {
        let (code, out) = cli(&["--timeout", "1s", "get", "a"]);
        (code == Some(0)).then_some(out)
    });
    assert_eq!(value, "1\n");
    // SAFETY: as above.
    unsafe { libc::kill(again.id() as i32, libc::SIGTERM) };
    let status = wait_for("the resumed dev to exit", DEADLINE, || {
        again.try_wait().unwrap()
    });
    assert!(status.success());
}

#[test]
fn dev_tls_runs_a_tls_cluster_and_prints_the_client_flags() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _ports) = free_base();
    let (_dev, _guard, printed) = start_dev(dir.path(), base, &["--tls"]);
    let flags: Vec<String> = printed
        .iter()
        .find_map(|l| l.strip_prefix("TLS on: pass "))
        .and_then(|rest| rest.split(" (or").next())
        .expect("the TLS client flags are printed")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(flags.len(), 6, "{flags:?}");
    assert!(
        printed.iter().any(|l| l.contains("admin https://")),
        "{printed:?}"
    );
    let endpoint = format!("127.0.0.1:{}", base + 100);
    let cli = |tls: &[String], args: &[&str]| {
        let out = Command::new(COREKV)
            .args(["--endpoints", &endpoint, "--timeout", "5s"])
            .args(tls)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    assert_eq!(cli(&flags, &["put", "a", "1"]).0, Some(0));
    assert_eq!(cli(&flags, &["get", "a"]), (Some(0), "1\n".to_string()));
    // Without the flags the same command is refused.
    assert_ne!(cli(&[], &["get", "a"]).0, Some(0));
}
