//! corekv-node: the storage node, the server only.
//!
//! Owns configuration, the supervisor that starts and stops shard threads,
//! the shards (event loop, routing, connections, snapshots), the sans-IO Raft
//! replica, the state machine, snapshots, the admin server and metrics. It
//! never blocks a shard thread (no std fsync, no sleep, no DNS on a shard):
//! blocking work happens at start-up or on helper threads. Shard threads run
//! monoio only; tokio exists solely on the admin server's own thread (hyper).
//! It holds no client library and no command line: those are corekv-client
//! and the `corekv` binary.

pub mod admin;
pub mod command;
pub mod config;
pub mod data_dir;
mod helper;
mod inbox;
pub mod join;
pub mod layered_map;
mod log_limit;
pub mod log_store;
pub mod membership;
pub mod metrics;
mod pair_table;
pub mod progress;
mod raft_log;
pub mod replica;
pub mod sessions;
mod shard;
pub mod shared;
#[cfg(test)]
pub mod sim;
#[doc(hidden)]
pub mod sim_bugs;
pub mod snapshot;
mod snapshot_transfer;
pub mod state_machine;
mod storage;
pub mod stored;
pub mod supervisor;
pub mod tls;

pub use supervisor::run;
