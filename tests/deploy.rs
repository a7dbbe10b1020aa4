//! The operator kit under deploy/: the Grafana dashboard and the Prometheus
//! alerting rules query only series a real node exports, every rule says
//! how long and how bad, the README's "Alert on:" list and the rules agree,
//! the systemd unit carries what production needs and systemd accepts it,
//! and the example config loads.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{Cluster, COREKV};
use corekv::scrape;
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

const DASHBOARD: &str = "deploy/grafana/corekv.json";
const ALERTS: &str = "deploy/prometheus/alerts.yml";
const ALERTS_TEST: &str = "deploy/prometheus/alerts_test.yml";
const UNIT: &str = "deploy/systemd/corekv.service";
const EXAMPLE_CONFIG: &str = "deploy/systemd/corekv.toml.example";
const README: &str = "README.md";

/// Series the rules may query that no node exports, and who writes them.
const NOT_FROM_A_NODE: &[(&str, &str)] = &[
    ("up", "Prometheus, for every scrape target"),
    (
        "probe_success",
        "the blackbox exporter probing /health/ready",
    ),
];

/// What the dashboard must show (issue 17): dropping a panel for one of
/// these fails here, not in front of an operator.
const DASHBOARD_MUST_SHOW: &[&str] = &[
    "raft_node_state",
    "raft_current_term",
    "raft_leader_changes_total",
    "raft_commit_index",
    "raft_applied_index",
    "raft_proposals_total",
    "raft_proposals_dropped_total",
    "client_requests_total",
    "client_request_seconds_bucket",
    "wal_fsync_seconds_bucket",
    "shard_loop_turn_seconds_bucket",
    "transport_reconnects_total",
    "transport_frames_dropped_total",
    "raft_snapshots_sent_total",
    "raft_snapshots_received_total",
    "snapshots_written_total",
    "snapshot_bytes_written_total",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "process_open_fds",
    "state_machine_bytes",
    "state_machine_keys",
    "raft_voters",
    "raft_learners",
    "raft_removed",
    "wal_disk_full",
];

#[test]
fn dashboard_alerts_and_readme_name_only_series_a_node_exports() {
    // Three nodes, so the per-peer series (raft messages, reconnects) have
    // samples and not only their family's declaration.
    let mut cluster = Cluster::start(3, 1);
    cluster.wait_for_leaders();
    assert_eq!(cluster.cli(&["put", "deploy", "1"]).0, 0, "one write");
    let metrics = scrape::get(&cluster.nodes[0].admin_addr(), "/metrics").expect("scrape node 1");
    assert!(
        !scrape::exposes(&metrics, "raft_leader_change_total"),
        "a misspelt name must fail the check"
    );

    let mut unknown = Vec::new();
    for (place, expr) in dashboard_queries(&read_json(DASHBOARD)) {
        for name in names_in(DASHBOARD, &place, &expr) {
            if !scrape::exposes(&metrics, &name) {
                unknown.push(format!("{DASHBOARD}, {place}: {name}"));
            }
        }
    }
    let rules = alert_rules(&read_yaml(ALERTS));
    for rule in &rules {
        for name in names_in(ALERTS, &rule.alert, &rule.expr) {
            let elsewhere = NOT_FROM_A_NODE.iter().any(|(series, _)| *series == name);
            if !elsewhere && !scrape::exposes(&metrics, &name) {
                unknown.push(format!("{ALERTS}, {}: {name}", rule.alert));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "series no node exports (scraped {}):\n{}",
        cluster.nodes[0].admin_addr(),
        unknown.join("\n")
    );

    readme_alerts_are_rules(&metrics, &rules);
}

/// Every metric the README's "Alert on:" paragraph names is queried by a
/// rule, and its `/health/ready` by the blackbox probe's rule. Names there
/// that a node does not export (`max_client_connections`) are settings.
fn readme_alerts_are_rules(metrics: &str, rules: &[AlertRule]) {
    let readme = read(README);
    let paragraph = readme
        .split("\n\n")
        .find(|p| p.starts_with("**Alert on:**"))
        .expect("README has an \"**Alert on:**\" paragraph");
    let ruled: Vec<String> = rules
        .iter()
        .flat_map(|rule| names_in(ALERTS, &rule.alert, &rule.expr))
        .collect();
    let families: Vec<String> = scrape::metric_families(metrics)
        .into_iter()
        .map(|(family, _)| family)
        .collect();
    for span in paragraph.split('`').skip(1).step_by(2) {
        if span == "/health/ready" {
            assert!(
                ruled.iter().any(|name| name == "probe_success"),
                "README alerts on /health/ready, no rule queries probe_success"
            );
            continue;
        }
        for name in names_in(README, "\"Alert on:\"", span) {
            if !scrape::exposes(metrics, &name) && !families.contains(&name) {
                continue;
            }
            let queried = ruled.iter().any(|used| {
                used == &name
                    || ["_total", "_bucket", "_sum", "_count"]
                        .iter()
                        .any(|suffix| *used == format!("{name}{suffix}"))
            });
            assert!(
                queried,
                "README alerts on `{span}`, but no rule in {ALERTS} queries {name}"
            );
        }
    }
}

#[test]
fn dashboard_is_templated_and_shows_every_part_of_a_node() {
    let dashboard = read_json(DASHBOARD);
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let variable = |name: &str| {
        variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("{DASHBOARD}: no variable `{name}`"))
    };
    let data_source = variable("DS_PROMETHEUS");
    assert_eq!(data_source["type"], "datasource");
    assert_eq!(data_source["query"], "prometheus");
    for name in ["job", "instance", "shard"] {
        assert_eq!(variable(name)["type"], "query", "variable {name}");
    }

    let mut ids = std::collections::BTreeSet::new();
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(
            ids.insert(panel["id"].to_string()),
            "panel id reused: {title}"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert!(!title.is_empty(), "a panel without a title: {panel}");
        let targets = panel["targets"].as_array().map_or(&[][..], Vec::as_slice);
        assert!(!targets.is_empty(), "panel \"{title}\" has no query");
        for uses in std::iter::once(panel).chain(targets) {
            assert_eq!(
                uses["datasource"]["uid"], "${DS_PROMETHEUS}",
                "panel \"{title}\" must query the chosen data source"
            );
        }
    }

    let shown: Vec<String> = dashboard_queries(&dashboard)
        .iter()
        .flat_map(|(place, expr)| names_in(DASHBOARD, place, expr))
        .collect();
    let missing: Vec<&&str> = DASHBOARD_MUST_SHOW
        .iter()
        .filter(|name| !shown.iter().any(|s| s == *name))
        .collect();
    assert!(missing.is_empty(), "{DASHBOARD} shows none of {missing:?}");
}

#[test]
fn every_alert_has_an_expr_a_for_a_severity_and_a_summary() {
    let rules = alert_rules(&read_yaml(ALERTS));
    assert!(!rules.is_empty(), "{ALERTS} has no alerting rule");
    let mut seen = std::collections::BTreeSet::new();
    for rule in &rules {
        let alert = &rule.alert;
        assert!(seen.insert(alert.clone()), "alert {alert} defined twice");
        assert!(!rule.expr.trim().is_empty(), "alert {alert}: empty expr");
        assert!(
            !names_in(ALERTS, alert, &rule.expr).is_empty(),
            "alert {alert}: its expr queries no series"
        );
        let for_ = rule
            .for_
            .as_deref()
            .unwrap_or_else(|| panic!("alert {alert}: no `for`"));
        assert!(
            is_prometheus_duration(for_),
            "alert {alert}: `for: {for_}` is not a duration"
        );
        let severity = rule.severity.as_deref().unwrap_or_default();
        assert!(
            ["critical", "warning"].contains(&severity),
            "alert {alert}: labels.severity is `{severity}`, not critical or warning"
        );
        assert!(
            rule.summary
                .as_deref()
                .is_some_and(|s| !s.trim().is_empty()),
            "alert {alert}: no annotations.summary"
        );
    }
}

#[test]
fn promtool_accepts_the_rules_their_tests_and_the_dashboard_queries() {
    if !on_path("promtool") {
        println!(
            "promtool is not on PATH: skipped `promtool check rules` and `promtool test rules`"
        );
        return;
    }
    expect_success(promtool(&[
        "check",
        "rules",
        &repo_path(ALERTS).display().to_string(),
    ]));
    expect_success(promtool(&[
        "test",
        "rules",
        &repo_path(ALERTS_TEST).display().to_string(),
    ]));

    // promtool parses PromQL only in rule files: each dashboard query becomes
    // a recording rule, with Grafana's interval variables made durations.
    let rules: Vec<Yaml> = dashboard_queries(&read_json(DASHBOARD))
        .into_iter()
        .enumerate()
        .map(|(i, (_, expr))| {
            let expr = expr
                .replace("$__rate_interval", "5m")
                .replace("$__interval", "1m")
                .replace("$__range", "1h");
            let mut rule = serde_yaml::Mapping::new();
            rule.insert("record".into(), format!("dashboard:query_{i}").into());
            rule.insert("expr".into(), expr.into());
            Yaml::Mapping(rule)
        })
        .collect();
    let mut group = serde_yaml::Mapping::new();
    group.insert("name".into(), "dashboard".into());
    group.insert("rules".into(), Yaml::Sequence(rules));
    let mut file = serde_yaml::Mapping::new();
    file.insert("groups".into(), Yaml::Sequence(vec![Yaml::Mapping(group)]));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dashboard-queries.yml");
    std::fs::write(&path, serde_yaml::to_string(&file).expect("yaml")).expect("write rules");
    expect_success(promtool(&["check", "rules", &path.display().to_string()]));
}

#[test]
fn systemd_unit_has_what_production_needs() {
    let text = read(UNIT);
    let header: String = text
        .lines()
        .take_while(|line| line.starts_with('#'))
        .collect();
    for word in ["Type=simple", "sd_notify", "/health/ready"] {
        assert!(
            header.contains(word),
            "{UNIT}: the opening comment should say why Type=simple (mention {word})"
        );
    }
    let entries = unit_entries(&text).unwrap_or_else(|e| panic!("{UNIT}: {e}"));
    let value = |section: &str, key: &str| {
        entries
            .iter()
            .rev()
            .find(|(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.as_str())
            .unwrap_or_else(|| panic!("{UNIT}: no {key}= in [{section}]"))
    };
    for (key, expected) in [
        ("Type", "simple"),
        (
            "ExecStart",
            "/usr/local/bin/corekv run --config /etc/corekv/corekv.toml",
        ),
        ("KillSignal", "SIGTERM"),
        ("Restart", "on-failure"),
        ("LimitMEMLOCK", "infinity"),
        ("User", "corekv"),
        ("Group", "corekv"),
        ("StateDirectory", "corekv"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
    ] {
        assert_eq!(value("Service", key), expected, "{UNIT}: {key}");
    }
    // The node hands its leaderships over for up to 3 s, then syncs.
    let stop = value("Service", "TimeoutStopSec");
    let stop_s: u64 = stop
        .trim_end_matches('s')
        .parse()
        .expect("TimeoutStopSec in seconds");
    assert!(
        stop_s >= 10,
        "{UNIT}: TimeoutStopSec={stop} leaves no time after the hand-over"
    );
    // max_client_connections defaults to 10,000, and each holds an fd.
    let files: u64 = value("Service", "LimitNOFILE")
        .parse()
        .expect("LimitNOFILE");
    assert!(
        files > 10_000,
        "{UNIT}: LimitNOFILE={files} is below max_client_connections"
    );
    assert!(
        !entries.iter().any(|(_, key, _)| key == "SystemCallFilter"),
        "{UNIT}: a SystemCallFilter may leave out io_uring_setup"
    );
    assert_eq!(value("Install", "WantedBy"), "multi-user.target");
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    if !on_path("systemd-analyze") {
        println!("systemd-analyze is not on PATH: skipped `systemd-analyze verify {UNIT}`");
        return;
    }
    // verify refuses an ExecStart whose binary does not exist: the binary
    // under test stands in for the installed one.
    let installed = "/usr/local/bin/corekv ";
    let text = read(UNIT);
    assert!(
        text.contains(installed),
        "{UNIT}: ExecStart runs {installed}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("corekv.service");
    std::fs::write(&path, text.replace(installed, &format!("{COREKV} "))).expect("write unit");
    let output = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("run systemd-analyze");
    // An unknown key or a bad value is only a warning naming the file, and
    // the exit code stays 0: those lines count as failures here.
    let stderr = String::from_utf8_lossy(&output.stderr);
    let about_unit: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("corekv.service"))
        .collect();
    assert!(
        output.status.success() && about_unit.is_empty(),
        "systemd-analyze verify {UNIT}: {}\n{stderr}",
        output.status
    );
}

#[test]
fn example_config_loads_and_keeps_its_data_in_the_state_directory() {
    let config = corekv_node::config::Config::from_toml_str(&read(EXAMPLE_CONFIG))
        .unwrap_or_else(|e| panic!("{EXAMPLE_CONFIG}: {e}"));
    assert!(
        config.data_dir.starts_with("/var/lib/corekv"),
        "{EXAMPLE_CONFIG}: data_dir {} is outside the unit's StateDirectory, which is all it may write",
        config.data_dir.display()
    );
}

#[test]
fn metric_names_skips_functions_labels_ranges_and_variables() {
    let expr = r#"histogram_quantile(0.99, sum by (job, instance, le) (rate(wal_fsync_seconds_bucket{job=~"$job", le!="}"}[$__rate_interval]))) > 0.05"#;
    assert_eq!(names(expr), ["wal_fsync_seconds_bucket"]);
    let expr = "max by (job, shard) (raft_commit_index) - on (job, shard) group_right raft_applied_index > 1000";
    assert_eq!(names(expr), ["raft_commit_index", "raft_applied_index"]);
    let expr = "increase(x_total[15m]) > 0 or (x_total unless x_total offset 15m) and BOOL y";
    assert_eq!(names(expr), ["x_total", "x_total", "x_total", "y"]);
    let expr = "count(raft_node_state{shard=~\"${shard}\"} == 2) or vector(0) # no leader: 0";
    assert_eq!(names(expr), ["raft_node_state"]);
    assert_eq!(
        names("rate(a:recorded:rate5m[1h:5m]) * 1e3"),
        ["a:recorded:rate5m"]
    );
}

#[test]
fn a_misspelt_metric_or_function_fails_and_broken_brackets_are_errors() {
    let text = "# TYPE raft_leader_changes counter\nraft_leader_changes_total{shard=\"0\"} 1\n";
    let exported = |expr: &str| names(expr).iter().all(|n| scrape::exposes(text, n));
    assert!(exported("rate(raft_leader_changes_total[5m])"));
    assert!(
        !exported("rate(raft_leader_change_total[5m])"),
        "misspelt metric"
    );
    assert!(
        !exported("rat(raft_leader_changes_total[5m])"),
        "misspelt function"
    );
    assert!(
        !exported("raft_leader_changes"),
        "a counter's family name is no series"
    );
    for broken in ["rate(x[5m]", "x{a=\"b\"", "sum(x))", "x{a=\"b}", "x]"] {
        assert!(metric_names(broken).is_err(), "`{broken}` is accepted");
    }
}

#[test]
fn unit_entries_reads_sections_keys_and_values() {
    let text = "# comment\n[Unit]\nDescription=a b\n\n[Service]\n; comment\nExecStart=/bin/x --y=z\nEnvironment=\n";
    assert_eq!(
        unit_entries(text).unwrap(),
        [
            ("Unit".into(), "Description".into(), "a b".into()),
            ("Service".into(), "ExecStart".into(), "/bin/x --y=z".into()),
            ("Service".into(), "Environment".into(), String::new()),
        ]
    );
    assert!(unit_entries("Key=before any section\n").is_err());
    assert!(unit_entries("[Service]\nno equals sign\n").is_err());
}

// ---------------------------------------------------------------- PromQL

/// PromQL words that are not metric names: the functions and aggregations
/// the deploy files use or are likely to, and the keywords. Compared without
/// case, as PromQL compares keywords.
const PROMQL_WORDS: &[&str] = &[
    "abs",
    "absent",
    "and",
    "avg",
    "avg_over_time",
    "bool",
    "bottomk",
    "by",
    "changes",
    "clamp_max",
    "clamp_min",
    "count",
    "delta",
    "deriv",
    "group_left",
    "group_right",
    "histogram_quantile",
    "ignoring",
    "increase",
    "inf",
    "irate",
    "label_replace",
    "max",
    "max_over_time",
    "min",
    "min_over_time",
    "nan",
    "offset",
    "on",
    "or",
    "quantile",
    "rate",
    "resets",
    "scalar",
    "sum",
    "time",
    "topk",
    "unless",
    "vector",
    "without",
];

/// Words followed by a parenthesised list of label names, not expressions.
const LABEL_LIST_WORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric names a PromQL expression selects, in order of appearance.
///
/// A name is a token `[a-zA-Z_:][a-zA-Z0-9_:]*` that is not one of
/// [`PROMQL_WORDS`], outside label matchers `{...}`, ranges and subqueries
/// `[...]`, strings, `#` comments, the label list after one of
/// [`LABEL_LIST_WORDS`], and Grafana variables (`$job`, `${job}`,
/// `$__rate_interval`). A token that starts with a digit (`0.99`, `15m`,
/// `1e3`) is a number or a duration. Every other word counts as a name, so a
/// misspelt function fails the exported-series check as a misspelt metric
/// does. Unbalanced brackets and unterminated strings are errors:
/// Prometheus would not parse the expression either.
fn metric_names(expr: &str) -> Result<Vec<String>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut open_parens = 0usize;
    let mut i = 0;
    while i < chars.len() {
        i = match chars[i] {
            '"' | '\'' | '`' => skip_string(&chars, i)?,
            '{' => skip_group(&chars, i, '}')?,
            '[' => skip_group(&chars, i, ']')?,
            '$' if chars.get(i + 1) == Some(&'{') => skip_group(&chars, i + 1, '}')?,
            '$' => skip_while(&chars, i + 1, |c| c.is_ascii_alphanumeric() || c == '_'),
            '#' => skip_while(&chars, i, |c| c != '\n'),
            '(' => {
                open_parens += 1;
                i + 1
            }
            ')' => {
                open_parens = open_parens
                    .checked_sub(1)
                    .ok_or_else(|| format!("`)` at {i} closes nothing"))?;
                i + 1
            }
            c @ ('}' | ']') => return Err(format!("`{c}` at {i} closes nothing")),
            c if c.is_ascii_digit() || c == '.' => skip_while(&chars, i, |c| {
                c.is_ascii_alphanumeric() || c == '.' || c == '_'
            }),
            c if is_name_start(c) => {
                let end = skip_while(&chars, i, is_name_char);
                let word: String = chars[i..end].iter().collect();
                let lower = word.to_ascii_lowercase();
                let next = skip_while(&chars, end, char::is_whitespace);
                if LABEL_LIST_WORDS.contains(&lower.as_str()) && chars.get(next) == Some(&'(') {
                    skip_group(&chars, next, ')')?
                } else {
                    if !PROMQL_WORDS.contains(&lower.as_str()) {
                        names.push(word);
                    }
                    end
                }
            }
            _ => i + 1,
        };
    }
    if open_parens > 0 {
        return Err(format!("{open_parens} `(` never closed"));
    }
    Ok(names)
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_name_char(c: char) -> bool {
    is_name_start(c) || c.is_ascii_digit()
}

/// The index of the first char at or after `from` that fails `keep`.
fn skip_while(chars: &[char], from: usize, keep: impl Fn(char) -> bool) -> usize {
    (from..chars.len())
        .find(|&i| !keep(chars[i]))
        .unwrap_or(chars.len())
}

/// The index just past the string that opens at `open`; a backslash escapes
/// in `"` and `'` strings, not in raw `` ` `` ones.
fn skip_string(chars: &[char], open: usize) -> Result<usize, String> {
    let quote = chars[open];
    let mut i = open + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' if quote != '`' => i += 2,
            c if c == quote => return Ok(i + 1),
            _ => i += 1,
        }
    }
    Err(format!("string opened at {open} never closed"))
}

/// The index just past the `close` that ends the group opening at `open`,
/// skipping strings inside it.
fn skip_group(chars: &[char], open: usize, close: char) -> Result<usize, String> {
    let mut i = open + 1;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => i = skip_string(chars, i)?,
            c if c == close => return Ok(i + 1),
            _ => i += 1,
        }
    }
    Err(format!("`{}` at {open} never closed", chars[open]))
}

/// [`metric_names`] of an expression that must parse.
fn names(expr: &str) -> Vec<String> {
    metric_names(expr).unwrap_or_else(|e| panic!("{e}: {expr}"))
}

/// [`metric_names`] of an expression at `place` in `file`, which must parse.
fn names_in(file: &str, place: &str, expr: &str) -> Vec<String> {
    metric_names(expr).unwrap_or_else(|e| panic!("{file}, {place}: {e}: {expr}"))
}

/// True for a Prometheus duration: one or more `<digits><unit>`, units
/// ms, s, m, h, d, w, y (`30s`, `1h30m`).
fn is_prometheus_duration(text: &str) -> bool {
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let unit = ["ms", "s", "m", "h", "d", "w", "y"]
            .into_iter()
            .find(|unit| rest.starts_with(unit));
        match unit {
            Some(unit) => rest = &rest[unit.len()..],
            None => return false,
        }
    }
    !text.is_empty()
}

// ---------------------------------------------------------------- files

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo_path(relative)).unwrap_or_else(|e| panic!("read {relative}: {e}"))
}

fn read_json(relative: &str) -> Json {
    serde_json::from_str(&read(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

fn read_yaml(relative: &str) -> Yaml {
    serde_yaml::from_str(&read(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// Every panel of a dashboard, those inside collapsed rows included.
fn panels(dashboard: &Json) -> Vec<&Json> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        out.push(panel);
        out.extend(panel["panels"].as_array().into_iter().flatten());
    }
    out
}

/// Every PromQL query of a dashboard, with where it is: panel targets, and
/// the selector of each `label_values(SELECTOR, label)` variable.
fn dashboard_queries(dashboard: &Json) -> Vec<(String, String)> {
    let mut queries = Vec::new();
    for panel in panels(dashboard) {
        let title = panel["title"].as_str().unwrap_or_default();
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(
                !expr.trim().is_empty(),
                "panel \"{title}\": a target without expr"
            );
            let ref_id = target["refId"].as_str().unwrap_or_default();
            let place = format!("panel \"{title}\" target {ref_id}");
            queries.push((place, expr.to_string()));
        }
    }
    let variables = dashboard["templating"]["list"].as_array();
    for variable in variables.into_iter().flatten() {
        if variable["type"] != "query" {
            continue;
        }
        let name = &variable["name"];
        // Grafana 10 keeps the query in an object, older ones as a string.
        let query = variable["query"]["query"]
            .as_str()
            .or(variable["query"].as_str())
            .unwrap_or_default();
        let selector = query
            .trim()
            .strip_prefix("label_values(")
            .and_then(|inner| inner.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable {name}: `{query}` is not label_values(...)"));
        // `label_values(label)` selects no metric; a label name has no comma.
        if let Some((selector, _label)) = selector.rsplit_once(',') {
            queries.push((format!("variable {name}"), selector.trim().to_string()));
        }
    }
    queries
}

/// One alerting rule, as much of it as the checks read.
struct AlertRule {
    alert: String,
    expr: String,
    for_: Option<String>,
    severity: Option<String>,
    summary: Option<String>,
}

/// The alerting rules of a Prometheus rule file (recording rules left out).
fn alert_rules(file: &Yaml) -> Vec<AlertRule> {
    let text = |value: &Yaml| value.as_str().map(str::to_string);
    let groups = file["groups"].as_sequence().expect("rule file has groups");
    let rules = groups
        .iter()
        .flat_map(|group| group["rules"].as_sequence().expect("group has rules"));
    rules
        .filter_map(|rule| {
            Some(AlertRule {
                alert: text(&rule["alert"])?,
                expr: text(&rule["expr"]).unwrap_or_default(),
                for_: text(&rule["for"]),
                severity: text(&rule["labels"]["severity"]),
                summary: text(&rule["annotations"]["summary"]),
            })
        })
        .collect()
}

/// `(section, key, value)` of every assignment in a systemd unit file, in
/// order. `#` and `;` lines are comments; the deploy unit continues no line
/// with `\`, so a continued line shows up here as a line without `=`.
fn unit_entries(text: &str) -> Result<Vec<(String, String, String)>, String> {
    let mut section: Option<&str> = None;
    let mut entries = Vec::new();
    for (number, line) in text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name);
            continue;
        }
        let section = section.ok_or_else(|| format!("line {number} is outside any section"))?;
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("line {number} is no `Key=value`: {line}"))?;
        entries.push((
            section.to_string(),
            key.trim().to_string(),
            value.trim().to_string(),
        ));
    }
    Ok(entries)
}

// ---------------------------------------------------------------- tools

/// True when `tool --version` runs: the optional checks need the tool, and
/// CI machines need not have it.
fn on_path(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success())
}

fn promtool(args: &[&str]) -> Output {
    Command::new("promtool")
        .args(args)
        .output()
        .expect("run promtool")
}

fn expect_success(output: Output) {
    assert!(
        output.status.success(),
        "{}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
