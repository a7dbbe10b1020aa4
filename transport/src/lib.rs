//! corekv-transport: frames and connections.
//!
//! Owns the length-prefixed frame codec, socket options, outbound peer links
//! (reconnect, batching, bounded queues) and the peer handshake. It never
//! knows Raft state or the key-value semantics; it moves frames.
