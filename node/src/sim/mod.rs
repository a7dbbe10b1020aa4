//! Test support: the deterministic cluster simulator, what it records of a
//! run and how that record is judged. Nothing here runs in a server; the
//! module is compiled for tests only.
//!
//! - `cluster`: the replicas, network, disks and clients of one seed.
//! - `history`: what the clients invoked and were told.
//! - `linearizability`: whether a correct store could have answered so.

pub mod cluster;
pub mod history;
pub mod linearizability;
#[cfg(test)]
mod tests;
