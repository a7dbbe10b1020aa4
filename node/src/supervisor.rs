//! The supervisor: locks the data directory, starts the admin server and one
//! pinned thread per shard, and stops them all on SIGTERM/SIGINT or when one
//! shard fails.

use std::sync::atomic::AtomicUsize;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use corekv_proto::client::ShardStatus;

use crate::config::Config;
use crate::data_dir::{self, DataDirLock};
use crate::metrics::Metrics;
use crate::shared::{CrossCore, NodeShared, CROSS_CORE_QUEUE};

enum Event {
    Signal(i32),
    ShardExited(u32, anyhow::Result<()>),
}

/// Runs the node until SIGTERM/SIGINT (exit 0) or a shard fails (error).
/// `joining`: the members a joining node learned from the cluster (see
/// [`crate::join::check`]), the addresses it answers the leader that adds it
/// at before its log names any member.
pub fn run(config: Config, joining: Vec<corekv_proto::client::NodeInfo>) -> anyhow::Result<()> {
    let _lock = DataDirLock::acquire(&config.data_dir)?;
    data_dir::check_format(&config.data_dir)?;
    let shards = config.shards;
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    for _ in 0..shards {
        let (tx, rx) = flume::bounded(CROSS_CORE_QUEUE);
        senders.push(tx);
        receivers.push(rx);
    }
    let tls = crate::tls::NodeTls::load(&config).context("cannot load the TLS files")?;
    let node = Arc::new(NodeShared {
        tls,
        shard_membership: (0..shards)
            .map(|s| {
                Mutex::new(corekv_proto::client::ShardMembership {
                    shard: s,
                    ..Default::default()
                })
            })
            .collect(),
        shard_status: (0..shards)
            .map(|s| {
                Mutex::new(ShardStatus {
                    shard: s,
                    ..Default::default()
                })
            })
            .collect(),
        cross: senders,
        metrics: Metrics::new(),
        client_connections: AtomicUsize::new(0),
        joining,
        config,
    });
    crate::admin::start(node.clone())?;
    tracing::info!(
        node_id = node.config.node_id,
        shards,
        data_dir = %node.config.data_dir.display(),
        "corekv node starting"
    );

    // A write past a file size limit (RLIMIT_FSIZE, set by an operator or a
    // test) then fails with EFBIG, which the WAL handles like a full disk,
    // instead of killing the process.
    // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let (events_tx, events_rx) = mpsc::channel::<Event>();
    let mut signals =
        signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT, libc::SIGHUP])
            .context("cannot install signal handlers")?;
    let signal_handle = signals.handle();
    {
        let events_tx = events_tx.clone();
        std::thread::Builder::new()
            .name("corekv-signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    if events_tx.send(Event::Signal(signal)).is_err() {
                        break;
                    }
                }
            })?;
    }

    let cores = shard_cores(&node.config.cpus)?;
    let mut threads = Vec::new();
    for (shard, rx) in (0..shards).zip(receivers) {
        let node = node.clone();
        let events_tx = events_tx.clone();
        let core = (!cores.is_empty()).then(|| cores[shard as usize % cores.len()]);
        let thread = std::thread::Builder::new()
            .name(format!("corekv-shard-{shard}"))
            .spawn(move || {
                if let Some(core) = core {
                    core_affinity::set_for_current(core);
                }
                // A panicking shard must stop the node loudly, not leave a
                // process that looks alive with a dead shard.
                let run = std::panic::AssertUnwindSafe(|| run_shard(shard, node, rx));
                let result = std::panic::catch_unwind(run).unwrap_or_else(|panic| {
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "unknown panic".to_string());
                    Err(anyhow::anyhow!("shard thread panicked: {message}"))
                });
                let _ = events_tx.send(Event::ShardExited(shard, result));
            })
            .context("cannot start shard thread")?;
        threads.push(thread);
    }
    drop(events_tx);

    let mut result = Ok(());
    let mut running = shards;
    let mut stopping = false;
    while running > 0 {
        match events_rx.recv() {
            Ok(Event::Signal(libc::SIGHUP)) => reload_tls(&node),
            Ok(Event::Signal(signal)) => {
                if stopping {
                    continue;
                }
                stopping = true;
                tracing::info!(signal, "shutting down");
                for tx in &node.cross {
                    let _ = tx.send(CrossCore::Shutdown);
                }
            }
            Ok(Event::ShardExited(shard, exit)) => {
                running -= 1;
                if let Err(e) = exit {
                    tracing::error!(shard, error = %format!("{e:#}"), "shard failed; stopping the node");
                    if result.is_ok() {
                        result = Err(e.context(format!("shard {shard} failed")));
                    }
                    if !stopping {
                        stopping = true;
                        for tx in &node.cross {
                            let _ = tx.send(CrossCore::Shutdown);
                        }
                    }
                }
            }
            Err(_) => break,
        }
    }
    signal_handle.close();
    for thread in threads {
        let _ = thread.join();
    }
    tracing::info!("corekv node stopped");
    result
}

/// SIGHUP: read the TLS files again. New connections use them; open ones
/// keep the certificate they started with. A file that fails to load
/// leaves the old certificate in use.
fn reload_tls(node: &NodeShared) {
    let Some(tls) = &node.tls else {
        tracing::info!("SIGHUP: TLS is off, nothing to reload");
        return;
    };
    match tls.reload() {
        Ok(()) => tracing::info!("SIGHUP: TLS certificate, key and CA reloaded"),
        Err(e) => {
            tracing::warn!(error = %e, "SIGHUP: TLS reload failed; the previous certificate stays in use")
        }
    }
}

/// The CPUs shard threads are pinned to, in shard order (shard `s` gets
/// entry `s % len`): `cpus` if the config names any, else every CPU this
/// process may use. Empty when the platform cannot tell (then nothing is pinned).
fn shard_cores(cpus: &[usize]) -> anyhow::Result<Vec<core_affinity::CoreId>> {
    let available = core_affinity::get_core_ids().unwrap_or_default();
    if cpus.is_empty() {
        return Ok(available);
    }
    cpus.iter()
        .map(|&id| {
            available
                .iter()
                .find(|core| core.id == id)
                .copied()
                .ok_or_else(|| {
                    let ids: Vec<usize> = available.iter().map(|core| core.id).collect();
                    anyhow::anyhow!(
                        "config key `cpus`: CPU {id} is not available to this process (available: {ids:?})"
                    )
                })
        })
        .collect()
}

fn run_shard(
    shard: u32,
    node: Arc<NodeShared>,
    rx: flume::Receiver<CrossCore>,
) -> anyhow::Result<()> {
    let mut runtime = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .uring_builder(corekv_transport::uring_builder())
        .enable_timer()
        .build()
        .context("cannot build the shard runtime")?;
    runtime.block_on(crate::shard::run(shard, node, rx))
}
