//! `corekv bench` against a real cluster: the report on stdout, and the
//! files it writes beside it for the operator (--plot, --hdr).

mod common;

use std::path::Path;
use std::process::Command;

use common::{Cluster, COREKV};

/// The rows of an .hgrm file: (value ms, percentile, total count).
fn hgrm_rows(text: &str) -> Vec<(f64, f64, u64)> {
    text.lines()
        .skip(2)
        .take_while(|line| !line.starts_with('#'))
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert!(
                fields.len() == 4 || fields.len() == 3,
                "not an .hgrm row: {line:?}"
            );
            (
                fields[0].parse().unwrap(),
                fields[1].parse().unwrap(),
                fields[2].parse().unwrap(),
            )
        })
        .collect()
}

/// Checks an .hgrm file's shape; returns its total count.
fn check_hgrm(path: &Path) -> u64 {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let header = text.lines().next().unwrap_or_default();
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"],
        "{}:\n{text}",
        path.display()
    );
    let rows = hgrm_rows(&text);
    assert!(rows.len() > 10, "{}:\n{text}", path.display());
    assert!(
        rows.windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1 && w[0].2 <= w[1].2),
        "values, percentiles and counts ascend in {}:\n{text}",
        path.display()
    );
    let (_, last_percentile, total) = *rows.last().unwrap();
    assert_eq!(last_percentile, 1.0, "{}", path.display());
    assert!(text.contains("#[Mean    ="), "{}", path.display());
    assert!(
        text.contains(&format!("Total count    = {total:>12}]")),
        "{}:\n{text}",
        path.display()
    );
    total
}

#[test]
fn bench_plots_the_run_and_writes_its_latency_distribution() {
    let mut cluster = Cluster::start(3, 1);
    cluster.wait_for_leaders();
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("run.svg");
    let hgrm = dir.path().join("run.hgrm");

    // The default mix (puts and gets), with --json: the files come on top
    // of the report, which stays one JSON object on stdout.
    let (code, stdout, stderr) = cluster.cli(&[
        "--json",
        "bench",
        "--duration",
        "2s",
        "--clients",
        "2",
        "--plot",
        svg.to_str().unwrap(),
        "--hdr",
        hgrm.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {stdout}"));
    assert_eq!(report["config"]["plot"], svg.to_str().unwrap());
    assert_eq!(report["config"]["hdr"], hgrm.to_str().unwrap());
    let counted = report["total"]["count"].as_u64().unwrap();
    assert!(counted > 0, "{stdout}");
    // The load generator's own CPU in the window, and its machine's CPU
    // pressure where the kernel reports it.
    let generator = &report["load_generator"];
    assert!(generator["cpu_s"].as_f64().unwrap() > 0.0, "{stdout}");
    assert!(
        generator["cpu_us_per_op"].as_f64().unwrap() > 0.0,
        "{stdout}"
    );
    match generator["host_cpu_pressure"].as_f64() {
        Some(share) => assert!((0.0..=1.0).contains(&share), "{stdout}"),
        None => assert!(
            !Path::new("/proc/pressure/cpu").exists(),
            "this machine has PSI, the report has no pressure: {stdout}"
        ),
    }

    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg"), "{}", &plot[..plot.len().min(200)]);
    assert!(plot.trim_end().ends_with("</svg>"));
    for title in [
        "Throughput",
        "Latency per second",
        "Latency by percentile",
        "corekv bench, ",
        "2 clients x 1 in flight, mix put=50,get=50,cas=0, 256 B values",
    ] {
        assert!(plot.contains(title), "no {title:?} in the plot");
    }
    assert!(plot.contains("<polyline"), "the plot has no lines");

    // FILE holds every operation; with two types in the mix, one file each.
    let total = check_hgrm(&hgrm);
    assert_eq!(total, counted, "the .hgrm counts what the report counts");
    let puts = check_hgrm(&dir.path().join("run.put.hgrm"));
    let gets = check_hgrm(&dir.path().join("run.get.hgrm"));
    assert_eq!(puts + gets, total);
    assert_eq!(report["ops"]["put"]["count"].as_u64(), Some(puts));
    assert!(
        !dir.path().join("run.cas.hgrm").exists(),
        "cas is not in the mix"
    );
}

#[test]
fn an_unwritable_output_fails_before_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir").join("run.svg");
    // No cluster at all: the files are created before anything connects.
    let output = Command::new(COREKV)
        .args(["--endpoints", "127.0.0.1:1", "bench", "--duration", "30s"])
        .arg("--plot")
        .arg(&missing)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("cannot create the --plot file") && stderr.contains("run.svg"),
        "{stderr}"
    );
}
