//! `--read-from`, shared by the get, scan and bench commands (a module of
//! its own so `cli` and `bench` do not import each other).

use clap::ValueEnum;
use corekv_client::ReadFrom;

/// `--read-from` of get, scan and bench.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ReadFromArg {
    /// The shard's leader.
    Leader,
    /// The shard's followers in turn.
    Follower,
    /// The first of --endpoints that is a member.
    Nearest,
}

impl ReadFromArg {
    /// As on the command line.
    pub(crate) fn name(self) -> &'static str {
        match self {
            ReadFromArg::Leader => "leader",
            ReadFromArg::Follower => "follower",
            ReadFromArg::Nearest => "nearest",
        }
    }
}

impl From<ReadFromArg> for ReadFrom {
    fn from(r: ReadFromArg) -> Self {
        match r {
            ReadFromArg::Leader => ReadFrom::Leader,
            ReadFromArg::Follower => ReadFrom::Follower,
            ReadFromArg::Nearest => ReadFrom::Nearest,
        }
    }
}
