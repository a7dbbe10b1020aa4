//! Exactly-once writes: the client sessions of one shard (Ongaro's thesis,
//! 6.3).
//!
//! A client opens a session on a shard (a log entry; its index is the
//! session id) and numbers its writes 1, 2, 3, ... A retry carries the same
//! number. When a write is applied the shard keeps its result under its
//! number; a later entry with a number it has a result for is answered with
//! that result and not applied again. Each write also says below which
//! number the client has every answer, so results are forgotten as soon as
//! the client no longer needs them; the shard keeps the highest such mark,
//! and a write numbered below it is a copy the client already has the
//! answer to (a resent write whose first attempt committed later): refused,
//! never applied again.
//!
//! Everything here changes only by applying log entries, in log order, so
//! every replica holds the same sessions; they travel in snapshots.
//! Bounded: at most [`MAX_SESSIONS`] per shard (opening one more evicts the
//! least recently used [`EVICTED_AT_ONCE`]) and [`MAX_RESULTS_PER_SESSION`] unforgotten results
//! per session.

use std::collections::VecDeque;

use corekv_proto::client::{response, ErrorCode};
use corekv_proto::error_result as error;
use imbl::OrdMap;

/// Sessions a shard keeps; opening one more evicts the least recently used
/// [`EVICTED_AT_ONCE`].
pub const MAX_SESSIONS: usize = 16 * 1024;
/// Sessions evicted together when a full shard opens one more: finding the
/// least recently used takes a pass over all of them, so one pass frees
/// room for many opens instead of one (an open then costs O(8) amortised,
/// and no write has to keep an order of sessions by last use).
pub const EVICTED_AT_ONCE: usize = MAX_SESSIONS / 8;
/// Results of one session the client has not yet acknowledged; a write past
/// it is refused (a client pipelines at most
/// `max_requests_in_flight_per_connection` writes anyway).
pub const MAX_RESULTS_PER_SESSION: usize = 1024;

/// What a write entry says about its session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionTag {
    /// The session; 0 = none.
    pub session_id: u64,
    /// The write's number in the session (from 1).
    pub sequence: u64,
    /// Every write numbered below this has been answered.
    pub acked_below: u64,
}

/// One session.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Session {
    /// Results of applied writes the client may still ask again, ordered by
    /// number. A short deque, not a map: a client acknowledges in order, so
    /// forgetting is popping a prefix and a new result usually goes last.
    pub(crate) results: VecDeque<(u64, response::Result)>,
    /// Index of the last entry that used the session.
    pub last_used: u64,
    /// The highest `acked_below` its writes carried: every write numbered
    /// below it was answered, so one arriving now is a late copy.
    pub acked_below: u64,
}

impl Session {
    /// The results kept, by number in ascending order.
    pub fn results(&self) -> impl ExactSizeIterator<Item = (u64, &response::Result)> {
        self.results
            .iter()
            .map(|(sequence, result)| (*sequence, result))
    }

    /// Keeps `result` for write `sequence` (replacing one kept for it).
    pub fn keep(&mut self, sequence: u64, result: response::Result) {
        match self.position(sequence) {
            Ok(at) => self.results[at].1 = result,
            Err(at) => self.results.insert(at, (sequence, result)),
        }
    }

    fn position(&self, sequence: u64) -> Result<usize, usize> {
        // New numbers are the largest: check the back before searching.
        match self.results.back() {
            None => Err(0),
            Some((last, _)) if *last < sequence => Err(self.results.len()),
            Some(_) => self.results.binary_search_by_key(&sequence, |(s, _)| *s),
        }
    }
}

/// The sessions of a shard. Cloning is O(1) (a snapshot takes a view).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sessions {
    by_id: OrdMap<u64, Session>,
}

/// What to do with a write of a session.
#[derive(Debug)]
pub enum Admission {
    /// Apply it and [`Sessions::record`] its result.
    Apply,
    /// It was applied before: answer this, do not apply it again.
    Repeat(response::Result),
    /// Refuse it with this answer (unknown session, too many results).
    Refuse(response::Result),
}

impl Sessions {
    /// Sessions held.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// True when no session is held.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Opens the session of the entry at `index` (its id is `index`).
    pub fn open(&mut self, index: u64) -> u64 {
        if self.by_id.len() >= MAX_SESSIONS {
            self.evict_least_recently_used();
        }
        self.by_id.insert(
            index,
            Session {
                results: VecDeque::new(),
                last_used: index,
                acked_below: 0,
            },
        );
        index
    }

    /// Drops the [`EVICTED_AT_ONCE`] sessions used longest ago. Every
    /// replica drops the same ones: `last_used` is a log index, and no two
    /// sessions share one.
    fn evict_least_recently_used(&mut self) {
        let mut by_use: Vec<(u64, u64)> = self
            .by_id
            .iter()
            .map(|(id, session)| (session.last_used, *id))
            .collect();
        let evict = EVICTED_AT_ONCE.min(by_use.len());
        if evict == 0 {
            return;
        }
        if evict < by_use.len() {
            by_use.select_nth_unstable(evict - 1);
        }
        for (_, id) in &by_use[..evict] {
            self.by_id.remove(id);
        }
    }

    /// Decides about a write of a session, applied at `index`.
    pub fn admit(&mut self, index: u64, tag: SessionTag) -> Admission {
        let Some(session) = self.by_id.get_mut(&tag.session_id) else {
            return Admission::Refuse(error(
                ErrorCode::SessionExpired,
                &format!(
                    "session {} is unknown to this shard (expired or evicted); open a new one",
                    tag.session_id
                ),
            ));
        };
        session.last_used = index;
        // A copy of an older write carries an older mark: the session's
        // mark only grows.
        session.acked_below = session.acked_below.max(tag.acked_below);
        // Results are kept in order: the forgotten ones are a prefix.
        while session
            .results
            .front()
            .is_some_and(|(sequence, _)| *sequence < session.acked_below)
        {
            session.results.pop_front();
        }
        if let Ok(at) = session.position(tag.sequence) {
            Admission::Repeat(session.results[at].1.clone())
        } else if tag.sequence < session.acked_below {
            Admission::Refuse(error(
                ErrorCode::InvalidArgument,
                &format!(
                    "write {} of session {} is below its acknowledged mark {}: already answered",
                    tag.sequence, tag.session_id, session.acked_below
                ),
            ))
        } else if session.results.len() >= MAX_RESULTS_PER_SESSION {
            Admission::Refuse(error(
                ErrorCode::Unavailable,
                &format!(
                    "session {} has {MAX_RESULTS_PER_SESSION} unacknowledged writes; wait for answers",
                    tag.session_id
                ),
            ))
        } else {
            Admission::Apply
        }
    }

    /// Keeps the result of a write that was applied.
    pub fn record(&mut self, tag: SessionTag, result: &response::Result) {
        if let Some(session) = self.by_id.get_mut(&tag.session_id) {
            session.keep(tag.sequence, result.clone());
        }
    }

    /// Every session, by id (for snapshots).
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Session)> {
        self.by_id.iter().map(|(id, session)| (*id, session))
    }

    /// Rebuilds from what a snapshot holds.
    pub fn from_sessions(sessions: impl IntoIterator<Item = (u64, Session)>) -> Sessions {
        Sessions {
            by_id: sessions.into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corekv_proto::client::WriteResult;

    fn write(version: u64) -> response::Result {
        response::Result::Write(WriteResult { version })
    }

    fn tag(session_id: u64, sequence: u64, acked_below: u64) -> SessionTag {
        SessionTag {
            session_id,
            sequence,
            acked_below,
        }
    }

    #[test]
    fn a_repeated_write_gets_its_first_result_until_acknowledged() {
        let mut sessions = Sessions::default();
        let id = sessions.open(5);
        assert!(matches!(sessions.admit(6, tag(id, 1, 1)), Admission::Apply));
        sessions.record(tag(id, 1, 1), &write(6));
        match sessions.admit(9, tag(id, 1, 1)) {
            Admission::Repeat(result) => assert_eq!(result, write(6)),
            other => panic!("expected the first result, got {other:?}"),
        }
        // Acknowledged: the result is forgotten, and an old number is refused.
        assert!(matches!(
            sessions.admit(10, tag(id, 2, 2)),
            Admission::Apply
        ));
        assert!(matches!(
            sessions.admit(11, tag(id, 1, 2)),
            Admission::Refuse(_)
        ));
    }

    #[test]
    fn a_late_copy_of_an_acknowledged_write_is_never_applied_again() {
        let mut sessions = Sessions::default();
        let id = sessions.open(5);
        // Write 1 was sent twice; the first copy commits and is answered.
        assert!(matches!(sessions.admit(6, tag(id, 1, 1)), Admission::Apply));
        sessions.record(tag(id, 1, 1), &write(6));
        // The client moves on: write 2 says it has every answer below 2.
        assert!(matches!(sessions.admit(7, tag(id, 2, 2)), Admission::Apply));
        sessions.record(tag(id, 2, 2), &write(7));
        // The second copy of write 1 commits after it, carrying the mark it
        // was sent with (1): it must not apply again.
        match sessions.admit(8, tag(id, 1, 1)) {
            Admission::Refuse(result) => {
                assert!(
                    format!("{result:?}").contains("below its acknowledged mark 2"),
                    "{result:?}"
                )
            }
            other => panic!("a late copy was admitted: {other:?}"),
        }
        // The newer write's result is still there for its own copies.
        assert!(matches!(
            sessions.admit(9, tag(id, 2, 1)),
            Admission::Repeat(_)
        ));
    }

    #[test]
    fn unknown_sessions_are_refused_and_the_least_recently_used_is_evicted() {
        let mut sessions = Sessions::default();
        assert!(matches!(
            sessions.admit(1, tag(77, 1, 1)),
            Admission::Refuse(_)
        ));
        let full = MAX_SESSIONS as u64;
        for index in 1..=full {
            sessions.open(index);
        }
        // Session 1 is used again, so sessions 2 .. EVICTED_AT_ONCE + 1 are
        // now the oldest.
        assert!(matches!(
            sessions.admit(full + 1, tag(1, 1, 1)),
            Admission::Apply
        ));
        sessions.open(full + 2);
        assert_eq!(sessions.len(), MAX_SESSIONS - EVICTED_AT_ONCE + 1);
        let newest_evicted = EVICTED_AT_ONCE as u64 + 1;
        for evicted in [2, newest_evicted] {
            assert!(matches!(
                sessions.admit(full + 3, tag(evicted, 1, 1)),
                Admission::Refuse(_)
            ));
        }
        for kept in [1, newest_evicted + 1, full, full + 2] {
            assert!(matches!(
                sessions.admit(full + 4, tag(kept, 2, 2)),
                Admission::Apply
            ));
        }
        // Room for more opens without another pass.
        sessions.open(full + 5);
        assert_eq!(sessions.len(), MAX_SESSIONS - EVICTED_AT_ONCE + 2);
    }

    #[test]
    fn unacknowledged_results_are_bounded() {
        let mut sessions = Sessions::default();
        let id = sessions.open(1);
        for sequence in 1..=MAX_RESULTS_PER_SESSION as u64 {
            let t = tag(id, sequence, 1);
            assert!(matches!(sessions.admit(1 + sequence, t), Admission::Apply));
            sessions.record(t, &write(sequence));
        }
        let over = tag(id, MAX_RESULTS_PER_SESSION as u64 + 1, 1);
        assert!(matches!(sessions.admit(5000, over), Admission::Refuse(_)));
    }
}
