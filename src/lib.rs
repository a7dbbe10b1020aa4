//! corekv: the command line over the node and the client library.
//!
//! Owns what an operator types: `corekv run` (hands the configuration to
//! corekv-node), `corekv dev` (a local cluster of child processes), the
//! client commands (through corekv-client), `corekv bench` and `corekv
//! debug` (a stopped node's files, read-only), and the throwaway
//! certificates of `corekv dev --tls` and the tests (`certs`). It never
//! reaches into a node's internals: a running node is only ever spoken to
//! over its client and admin ports, like any other program would; `scrape`
//! is the one reader of an admin port, shared by bench and the integration
//! tests.

pub mod bench;
pub mod certs;
pub mod cli;
pub mod cpu;
mod debug;
pub mod dev;
mod duration;
mod member;
pub mod read_from;
pub mod scrape;
mod top;
