//! Known mistakes, planted one at a time so the simulator can show that it
//! finds them (`--features sim-bugs`). Without the feature `planted` is
//! always false and compiles away: production code carries only the calls.

/// A mistake the replica can be told to make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    /// Report a Ready persisted (and so send its acks and count its
    /// entries) when its sync starts, not when it finishes.
    AckBeforeSync,
    /// Serve a lease read from the local state machine whenever this
    /// replica believes it leads, without checking the lease.
    LeaseWithoutCheck,
    /// Persist the hard state without its vote.
    ForgetVote,
    /// Answer a write as soon as it is in the leader's log, before it
    /// commits.
    AckBeforeCommit,
}

impl Bug {
    /// Every planted mistake.
    pub const ALL: [Bug; 4] = [
        Bug::AckBeforeSync,
        Bug::LeaseWithoutCheck,
        Bug::ForgetVote,
        Bug::AckBeforeCommit,
    ];
}

#[cfg(feature = "sim-bugs")]
thread_local! {
    static PLANTED: std::cell::Cell<Option<Bug>> = const { std::cell::Cell::new(None) };
}

/// Plants `bug` (or none) for replicas run on this thread.
#[cfg(feature = "sim-bugs")]
pub fn plant(bug: Option<Bug>) {
    PLANTED.with(|planted| planted.set(bug));
}

/// True if `bug` is planted on this thread.
#[inline]
pub fn planted(bug: Bug) -> bool {
    #[cfg(feature = "sim-bugs")]
    {
        PLANTED.with(|planted| planted.get() == Some(bug))
    }
    #[cfg(not(feature = "sim-bugs"))]
    {
        let _ = bug;
        false
    }
}
