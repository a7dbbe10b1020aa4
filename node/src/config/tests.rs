//! End-to-end tests of loading: flags, environment and file merged, resolved
//! against this node's `peers` entry, and the table held to the README and the
//! help text. The fixtures here are shared with `validate`'s tests.

use std::collections::{BTreeMap, HashMap};

use clap::{CommandFactory, Parser};

use super::*;

/// `corekv run`'s flags as the binary would mount them.
#[derive(Parser, Debug)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    move |name| map.get(name).cloned()
}

fn load_text(
    args: &RunArgs,
    env: &[(&str, &str)],
    file: Option<&str>,
) -> Result<Config, ConfigError> {
    load_from(
        args,
        env_of(env),
        file.map(|text| (Path::new("test.toml"), text)),
    )
}

fn args(flags: &[&str]) -> RunArgs {
    let mut argv = vec!["corekv"];
    argv.extend_from_slice(flags);
    Cli::try_parse_from(argv).expect("flags parse").run
}

/// Asserts that `text` is refused for `key` with a message containing
/// every one of `parts`.
pub(super) fn assert_refused(text: &str, key: &str, parts: &[&str]) {
    let error = Config::from_toml_str(text).expect_err(text);
    let message = error.to_string();
    assert_eq!(error.key(), Some(key), "{message}");
    assert!(
        message.contains(&format!("config key `{key}`")),
        "{message}"
    );
    for part in parts {
        assert!(message.contains(part), "{message:?} lacks {part:?}");
    }
}

pub(super) const THREE_NODES: &str = r#"
        node_id = 2
        shards = 4
        [[peers]]
        id = 1
        host = "127.0.0.1"
        client_port = 7100
        peer_port = 7150
        admin_port = 7190
        [[peers]]
        id = 2
        host = "127.0.0.1"
        client_port = 7200
        peer_port = 7250
        admin_port = 7290
        [[peers]]
        id = 3
        host = "127.0.0.1"
        client_port = 7300
        peer_port = 7350
        admin_port = 7390
    "#;

#[test]
fn clap_flags_are_kebab_case_and_consistent() {
    Cli::command().debug_assert();
    let parsed = args(&[
        "--node-id",
        "3",
        "--keepalive-idle-ms",
        "2000",
        "--peers",
        "3=h:1:2",
        "--log-format",
        "json",
    ]);
    assert_eq!(parsed.node_id, Some(3));
    assert_eq!(parsed.keepalive_idle_ms, Some(2000));
    assert_eq!(parsed.peers.as_deref(), Some("3=h:1:2"));
    let help = Cli::command().render_help().to_string();
    assert!(help.contains("COREKV_NODE_ID"), "{help}");
    assert!(help.contains("COREKV_PEERS"), "{help}");
}

#[test]
fn defaults_make_a_single_node_cluster() {
    let config = Config::from_toml_str("node_id = 1").unwrap();
    assert_eq!(config.cluster_id, 1);
    assert_eq!(config.data_dir, PathBuf::from("./corekv-data"));
    assert_eq!(config.listen_host, "127.0.0.1");
    assert_eq!(config.advertise_host, "127.0.0.1");
    assert_eq!(
        (config.client_port, config.peer_port, config.admin_port),
        (7100, 7150, 7190)
    );
    assert_eq!(config.shards, default_shards());
    assert!(config.shards >= 1);
    assert_eq!(
        config.peers,
        vec![PeerConfig {
            id: 1,
            host: "127.0.0.1".to_string(),
            client_port: 7100,
            peer_port: 7150,
            admin_port: Some(7190),
        }]
    );
    assert_eq!(config.me().id, 1);
    assert_eq!(
        (
            config.tick_ms,
            config.heartbeat_ticks,
            config.election_ticks
        ),
        (10, 3, 30)
    );
    assert_eq!(
        (
            config.keepalive_idle_ms,
            config.keepalive_interval_ms,
            config.keepalive_count
        ),
        (10_000, 5_000, 3)
    );
    assert_eq!(config.connect_timeout_ms, 3_000);
    assert_eq!(config.wal_segment_bytes, 64 * MIB);
    assert_eq!(
        (config.snapshot_entries, config.snapshot_bytes),
        (1_000_000, 64 * MIB)
    );
    assert_eq!(config.max_frame_bytes, 16 << 20);
    assert_eq!(
        (config.max_key_bytes, config.max_value_bytes),
        (4096, 1 << 20)
    );
    assert_eq!(
        (config.request_timeout_ms, config.slow_fsync_ms),
        (5_000, 100)
    );
    assert_eq!(config.log_level, "info");
    assert_eq!(config.log_format, LogFormat::Text);
}

#[test]
fn precedence_is_flag_then_env_then_file_then_default() {
    let file = "node_id = 1\nclient_port = 7001\ndata_dir = \"/file\"";
    let env = [("COREKV_CLIENT_PORT", "7002"), ("COREKV_DATA_DIR", "/env")];
    let flags = args(&["--client-port", "7003", "--data-dir", "/flag"]);

    let config = load_text(&flags, &env, Some(file)).unwrap();
    assert_eq!(
        (config.client_port, config.data_dir.to_str()),
        (7003, Some("/flag"))
    );

    let config = load_text(&RunArgs::default(), &env, Some(file)).unwrap();
    assert_eq!(
        (config.client_port, config.data_dir.to_str()),
        (7002, Some("/env"))
    );

    let config = load_text(&RunArgs::default(), &[], Some(file)).unwrap();
    assert_eq!(
        (config.client_port, config.data_dir.to_str()),
        (7001, Some("/file"))
    );

    let config = load_text(&args(&["--node-id", "1"]), &[], None).unwrap();
    assert_eq!(
        (config.client_port, config.data_dir.to_str()),
        (7100, Some("./corekv-data"))
    );
}

#[test]
fn layers_merge_key_by_key() {
    // Each key comes from the highest layer that sets it.
    let file = "node_id = 1\ntick_ms = 20\nshards = 2";
    let env = [("COREKV_SHARDS", "3"), ("COREKV_NODE_ID", "5")];
    let config = load_text(&args(&["--node-id", "7"]), &env, Some(file)).unwrap();
    assert_eq!((config.node_id, config.shards, config.tick_ms), (7, 3, 20));
}

#[test]
fn cpus_come_from_file_env_or_flag_and_default_to_none() {
    let file = "node_id = 1\ncpus = [1, 0]";
    let config = load_text(&RunArgs::default(), &[], Some(file)).unwrap();
    assert_eq!(config.cpus, vec![1, 0]);
    assert!(config.to_toml_string().contains("cpus = [1, 0]"));
    let env = [("COREKV_CPUS", " 2, 3 ")];
    let config = load_text(&RunArgs::default(), &env, Some(file)).unwrap();
    assert_eq!(config.cpus, vec![2, 3]);
    let config = load_text(&args(&["--cpus", "4"]), &env, Some(file)).unwrap();
    assert_eq!(config.cpus, vec![4]);
    let config = load_text(&args(&["--node-id", "1"]), &[], None).unwrap();
    assert!(config.cpus.is_empty());
    assert!(!config.to_toml_string().contains("cpus"));

    let error = load_text(&RunArgs::default(), &[("COREKV_CPUS", "0,x")], Some(file))
        .expect_err("a CPU id must be a number");
    let message = error.to_string();
    assert_eq!(error.key(), Some("cpus"), "{message}");
    assert!(
        message.contains("COREKV_CPUS") && message.contains("`x`"),
        "{message}"
    );
}

#[test]
fn peers_list_comes_whole_from_one_layer() {
    let file = "node_id = 1\n[[peers]]\nid = 1\nhost = \"a\"\nclient_port = 7100\npeer_port = 7150";
    let env = [("COREKV_PEERS", "1=b:7100:7150,2=c:7100:7150")];
    let config = load_text(&RunArgs::default(), &env, Some(file)).unwrap();
    assert_eq!(config.peer_ids(), vec![1, 2]);
    assert_eq!(config.advertise_host, "b");
    let config = load_text(&args(&["--peers", "1=d:7100:7150"]), &env, Some(file)).unwrap();
    assert_eq!(config.peer_ids(), vec![1]);
    assert_eq!(config.advertise_host, "d");
}

#[test]
fn empty_env_value_counts_as_unset() {
    let env = [
        ("COREKV_NODE_ID", "4"),
        ("COREKV_ADVERTISE_HOST", ""),
        ("COREKV_PEERS", " "),
    ];
    let config = load_text(&RunArgs::default(), &env, None).unwrap();
    assert_eq!(config.node_id, 4);
    assert_eq!(config.advertise_host, "127.0.0.1");
}

#[test]
fn log_level_reads_corekv_log_level_before_rust_log() {
    let base = [("COREKV_NODE_ID", "1"), ("RUST_LOG", "debug")];
    let config = load_text(&RunArgs::default(), &base, None).unwrap();
    assert_eq!(config.log_level, "debug");
    let both = [base[0], base[1], ("COREKV_LOG_LEVEL", "warn")];
    let config = load_text(&RunArgs::default(), &both, None).unwrap();
    assert_eq!(config.log_level, "warn");
    let config = load_text(&args(&["--log-level", "trace"]), &both, None).unwrap();
    assert_eq!(config.log_level, "trace");
}

#[test]
fn bad_env_value_names_key_and_variable() {
    let error = load_text(
        &RunArgs::default(),
        &[("COREKV_CLIENT_PORT", "70000")],
        None,
    )
    .unwrap_err();
    let message = error.to_string();
    assert_eq!(error.key(), Some("client_port"));
    assert!(message.contains("env COREKV_CLIENT_PORT"), "{message}");
    assert!(message.contains("\"70000\""), "{message}");
    assert!(message.contains("u16"), "{message}");
}

#[test]
fn log_format_is_text_or_json_in_every_layer() {
    let config = load_text(
        &args(&["--node-id", "1", "--log-format", "JSON"]),
        &[],
        None,
    )
    .unwrap();
    assert_eq!(config.log_format, LogFormat::Json);

    let error =
        load_text(&args(&["--node-id", "1", "--log-format", "xml"]), &[], None).unwrap_err();
    assert_eq!(error.key(), Some("log_format"));
    assert!(error.to_string().contains("flag --log-format"), "{error}");
    assert!(error.to_string().contains("`text` or `json`"), "{error}");

    let error = load_text(
        &args(&["--node-id", "1"]),
        &[("COREKV_LOG_FORMAT", "xml")],
        None,
    )
    .unwrap_err();
    assert!(
        error.to_string().contains("env COREKV_LOG_FORMAT"),
        "{error}"
    );

    let error = Config::from_toml_str("node_id = 1\nlog_format = \"xml\"").unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("log_format") && message.contains("xml"),
        "{message}"
    );
}

#[test]
fn load_reads_the_config_file_named_by_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corekv.toml");
    std::fs::write(&path, "node_id = 9\nclient_port = 7400\npeer_port = 7450").unwrap();
    let mut run = args(&["--peer-port", "7460"]);
    run.config = Some(path.clone());
    // node_id and client_port come from the file unless the process
    // environment sets them, so only assert what a flag fixes or what
    // the file sets that CI would not.
    let config = Config::load(&run).unwrap();
    assert_eq!(config.peer_port, 7460);

    run.config = Some(dir.path().join("missing.toml"));
    let error = Config::load(&run).unwrap_err();
    assert!(matches!(error, ConfigError::ReadFile { .. }), "{error}");
    assert!(error.to_string().contains("missing.toml"), "{error}");
}

#[test]
fn unknown_file_key_is_refused_by_name() {
    let error = Config::from_toml_str("node_id = 1\nclient_prot = 7100").unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, ConfigError::File { .. }), "{message}");
    assert!(message.contains("client_prot"), "{message}");

    let error = Config::from_toml_str(
        "node_id = 1\n[[peers]]\nid = 1\nhost = \"h\"\nclient_port = 1\npeer_port = 2\nrole = \"x\"",
    )
    .unwrap_err();
    assert!(error.to_string().contains("role"), "{error}");
}

#[test]
fn wrong_type_in_file_is_refused_with_the_key() {
    let error = Config::from_toml_str("node_id = 1\nclient_port = 70000").unwrap_err();
    let message = error.to_string();
    assert!(message.contains("client_port"), "{message}");
}

#[test]
fn toml_round_trips() {
    let config = Config::from_toml_str(THREE_NODES).unwrap();
    let text = config.to_toml_string();
    assert_eq!(Config::from_toml_str(&text).unwrap(), config, "{text}");

    let single = Config::from_toml_str("node_id = 1\nlog_format = \"json\"\nshards = 3").unwrap();
    let text = single.to_toml_string();
    assert!(text.contains("log_format = \"json\""), "{text}");
    assert_eq!(Config::from_toml_str(&text).unwrap(), single, "{text}");
}

#[test]
fn refuses_bad_peers_strings_with_the_reason() {
    let cases = [
        ("1:127.0.0.1:7100:7150", "missing `=`"),
        ("x=h:7100:7150", "node id `x`"),
        ("1=h", "missing ports"),
        ("1=h:7100", "expected 2 or 3 ports"),
        ("1=h:1:2:3:4", "expected 2 or 3 ports"),
        ("1=:7100:7150", "host is empty"),
        ("1=h:abc:7150", "client port `abc`"),
        ("1=h:7100:0", "peer port `0`"),
        ("1=h:7100:7150:99999", "admin port `99999`"),
        ("1=[::1:7100:7150", "missing `]`"),
        ("1=[::1]7100:7150", "expected `:` after `]`"),
        (",", "no peers listed"),
    ];
    for (text, reason) in cases {
        let error = load_text(&args(&["--node-id", "1", "--peers", text]), &[], None).unwrap_err();
        let message = error.to_string();
        assert_eq!(error.key(), Some("peers"), "{message}");
        assert!(message.contains("flag --peers"), "{message}");
        assert!(
            message.contains(reason),
            "{text}: {message:?} lacks {reason:?}"
        );
        assert!(message.contains(PEERS_SYNTAX), "{message}");
    }
    let error = load_text(
        &RunArgs::default(),
        &[("COREKV_NODE_ID", "1"), ("COREKV_PEERS", "1=h")],
        None,
    )
    .unwrap_err();
    assert!(error.to_string().contains("env COREKV_PEERS"), "{error}");
}

#[test]
fn own_ports_and_host_come_from_own_peers_entry() {
    let config = Config::from_toml_str(THREE_NODES).unwrap();
    assert_eq!(
        (config.client_port, config.peer_port, config.admin_port),
        (7200, 7250, 7290)
    );
    assert_eq!(config.me().client_port, 7200);
    assert_eq!(config.peer(3).map(|peer| peer.peer_port), Some(7350));
    assert_eq!(config.peer(4), None);
    assert_eq!(config.client_listen_addr(1), "127.0.0.1:7201");
    assert_eq!(config.peer_listen_addr(3), "127.0.0.1:7253");
    assert_eq!(config.admin_listen_addr(), "127.0.0.1:7290");
}

#[test]
fn own_admin_port_is_filled_into_own_entry() {
    let text = "node_id = 1\nadmin_port = 7191\n[[peers]]\nid = 1\nhost = \"h\"\nclient_port = 7100\npeer_port = 7150";
    let config = Config::from_toml_str(text).unwrap();
    assert_eq!(config.me().admin_port, Some(7191));
}

#[test]
fn explicit_own_port_must_match_peers_entry() {
    // Top-level keys go before the first [[peers]], hence the replacen.
    let text = THREE_NODES.replacen("node_id = 2", "node_id = 2\n        client_port = 7100", 1);
    assert_refused(
        &text,
        "client_port",
        &["7100 (client_port)", "7200", "node 2"],
    );
    let text = THREE_NODES.replacen("node_id = 2", "node_id = 2\n        admin_port = 7291", 1);
    assert_refused(&text, "admin_port", &["7291", "7290"]);
    let text = THREE_NODES.replacen("node_id = 2", "node_id = 2\n        client_port = 7200", 1);
    assert!(Config::from_toml_str(&text).is_ok());
}

#[test]
fn advertise_host_rules() {
    assert_refused(
        "node_id = 1\nlisten_host = \"0.0.0.0\"",
        "advertise_host",
        &["required", "0.0.0.0"],
    );
    assert_refused(
        "node_id = 1\nlisten_host = \"::\"",
        "advertise_host",
        &["required", "::"],
    );
    let config = Config::from_toml_str(
        "node_id = 1\nlisten_host = \"0.0.0.0\"\nadvertise_host = \"10.0.0.1\"",
    )
    .unwrap();
    assert_eq!(config.me().host, "10.0.0.1");
    assert_eq!(config.client_listen_addr(0), "0.0.0.0:7100");

    let listed = THREE_NODES.replacen(
        "node_id = 2",
        "node_id = 2\n        listen_host = \"0.0.0.0\"",
        1,
    );
    assert_eq!(
        Config::from_toml_str(&listed).unwrap().advertise_host,
        "127.0.0.1"
    );

    let differs = THREE_NODES.replacen(
        "node_id = 2",
        "node_id = 2\n        advertise_host = \"localhost\"",
        1,
    );
    assert_refused(
        &differs,
        "advertise_host",
        &["localhost", "127.0.0.1", "node 2"],
    );
    assert_refused(
        "node_id = 1\nadvertise_host = \"0.0.0.0\"",
        "advertise_host",
        &["wildcard"],
    );
}

#[test]
fn duration_helpers_follow_the_ms_fields() {
    let config = Config::from_toml_str(
        "node_id = 1\ntick_ms = 20\nheartbeat_ticks = 2\nelection_ticks = 10\nslow_fsync_ms = 7\nslow_turn_ms = 9",
    )
    .unwrap();
    assert_eq!(config.tick(), Duration::from_millis(20));
    assert_eq!(config.heartbeat_interval(), Duration::from_millis(40));
    assert_eq!(config.election_timeout(), Duration::from_millis(200));
    assert_eq!(config.keepalive_idle(), Duration::from_secs(10));
    assert_eq!(config.keepalive_interval(), Duration::from_secs(5));
    assert_eq!(config.connect_timeout(), Duration::from_secs(3));
    assert_eq!(config.request_timeout(), Duration::from_secs(5));
    assert_eq!(config.slow_fsync(), Duration::from_millis(7));
    assert_eq!(config.slow_turn(), Duration::from_millis(9));
}
/// The configuration table of the README, key to its "env / flag" cell.
fn readme_rows() -> BTreeMap<String, String> {
    const README: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"));
    const HEADER: &str = "| key | env / flag | default | meaning |";
    let table = README
        .split_once(HEADER)
        .map(|(_, rest)| rest)
        .expect("README has the configuration table");
    table
        .lines()
        .skip(1)
        .skip_while(|line| line.starts_with("| ---"))
        .take_while(|line| line.starts_with('|'))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            (cells[1].trim_matches('`').to_string(), cells[2].to_string())
        })
        .collect()
}

#[test]
fn readme_has_a_row_for_every_key() {
    let rows = readme_rows();
    for names in KEYS {
        let key = names.key;
        let cell = rows
            .get(key)
            .unwrap_or_else(|| panic!("README configuration table has no row for `{key}`"));
        let flag = format!("`--{}`", key.replace('_', "-"));
        assert!(
            cell.contains(&flag),
            "README row `{key}` lacks {flag}: {cell}"
        );
        for env in names.env {
            assert!(
                cell.contains(&format!("`{env}`")),
                "README row `{key}` lacks `{env}`: {cell}"
            );
        }
    }
    for key in rows.keys() {
        assert!(
            KEYS.iter().any(|names| names.key == key),
            "README configuration table lists `{key}`, which is not a key"
        );
    }
}

#[test]
fn env_names_follow_the_keys() {
    for names in KEYS {
        let expected = format!("COREKV_{}", names.key.to_ascii_uppercase());
        assert_eq!(names.env[0], expected, "key `{}`", names.key);
    }
}

#[test]
fn help_names_each_keys_variables() {
    let help = Cli::command().render_help().to_string();
    for names in KEYS {
        let listed = format!("[env: {}]", names.env.join(", then "));
        assert!(help.contains(&listed), "{listed} missing from:\n{help}");
    }
}

#[test]
fn empty_peers_list_in_file_means_this_node_alone() {
    let config = Config::from_toml_str("node_id = 3\nclient_port = 7300\npeers = []").unwrap();
    assert_eq!(config.peer_ids(), vec![3]);
    assert_eq!(config.me().client_port, 7300);
}
