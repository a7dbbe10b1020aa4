//! corekv-node: the storage node.
//!
//! Owns configuration, the shard threads, the sans-IO Raft replica, the state
//! machine, the client library, the admin server and the CLI. It never blocks
//! a shard thread (no std fsync, no sleep, no DNS on a shard): blocking work
//! happens at start-up or on helper threads.

pub mod admin;
pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod dev;
mod inbox;
pub mod metrics;
pub mod node;
mod raft_log;
pub mod replica;
mod shard;
pub mod snapshot;
mod snapshot_transfer;
pub mod state_machine;
mod storage;
