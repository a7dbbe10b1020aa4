//! corekv-node: the storage node.
//!
//! Owns configuration, the shard threads, the sans-IO Raft replica, the state
//! machine, the client library, the admin server and the CLI. It never blocks
//! a shard thread (no std fsync, no sleep, no DNS on a shard).

pub mod cli;
