//! corekv-wal: the write-ahead log of one shard.
//!
//! Owns the on-disk log: preallocated, memory-mapped segment files, record
//! encoding, group commit (sync) and crash recovery. It stores records, not
//! Raft types, and never depends on raft, the network or a runtime (the async
//! sync helper sits behind the `monoio` feature).
