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
//! least recently used) and [`MAX_RESULTS_PER_SESSION`] unforgotten results
//! per session.

use corekv_proto::client::{response, ErrorCode};
use corekv_proto::error_result as error;
use imbl::OrdMap;

/// Sessions a shard keeps; opening one more evicts the least recently used.
pub const MAX_SESSIONS: usize = 16 * 1024;
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
    /// Results of applied writes the client may still ask again, by number.
    pub results: OrdMap<u64, response::Result>,
    /// Index of the last entry that used the session.
    pub last_used: u64,
    /// The highest `acked_below` its writes carried: every write numbered
    /// below it was answered, so one arriving now is a late copy.
    pub acked_below: u64,
}

/// The sessions of a shard. Cloning is O(1) (a snapshot takes a view).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sessions {
    by_id: OrdMap<u64, Session>,
    /// Session ids by last use, for eviction.
    by_last_used: OrdMap<u64, u64>,
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
        while self.by_id.len() >= MAX_SESSIONS {
            let Some((last_used, id)) = self.by_last_used.get_min().map(|(k, v)| (*k, *v)) else {
                break;
            };
            self.by_last_used.remove(&last_used);
            self.by_id.remove(&id);
        }
        self.by_id.insert(
            index,
            Session {
                results: OrdMap::new(),
                last_used: index,
                acked_below: 0,
            },
        );
        self.by_last_used.insert(index, index);
        index
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
        self.by_last_used.remove(&session.last_used);
        session.last_used = index;
        self.by_last_used.insert(index, tag.session_id);
        // A copy of an older write carries an older mark: the session's
        // mark only grows.
        session.acked_below = session.acked_below.max(tag.acked_below);
        // Results are kept in order: the forgotten ones are a prefix.
        while let Some(oldest) = session.results.get_min().map(|(sequence, _)| *sequence) {
            if oldest >= session.acked_below {
                break;
            }
            session.results.remove(&oldest);
        }
        if let Some(result) = session.results.get(&tag.sequence) {
            Admission::Repeat(result.clone())
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
            session.results.insert(tag.sequence, result.clone());
        }
    }

    /// Every session, by id (for snapshots).
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Session)> {
        self.by_id.iter().map(|(id, session)| (*id, session))
    }

    /// Rebuilds from what a snapshot holds.
    pub fn from_sessions(sessions: impl IntoIterator<Item = (u64, Session)>) -> Sessions {
        let mut restored = Sessions::default();
        for (id, session) in sessions {
            restored.by_last_used.insert(session.last_used, id);
            restored.by_id.insert(id, session);
        }
        restored
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
        for index in 1..=MAX_SESSIONS as u64 {
            sessions.open(index);
        }
        // Session 1 is used again, so session 2 is now the oldest.
        assert!(matches!(
            sessions.admit(MAX_SESSIONS as u64 + 1, tag(1, 1, 1)),
            Admission::Apply
        ));
        sessions.open(MAX_SESSIONS as u64 + 2);
        assert_eq!(sessions.len(), MAX_SESSIONS);
        assert!(matches!(
            sessions.admit(MAX_SESSIONS as u64 + 3, tag(2, 1, 1)),
            Admission::Refuse(_)
        ));
        assert!(matches!(
            sessions.admit(MAX_SESSIONS as u64 + 4, tag(1, 2, 2)),
            Admission::Apply
        ));
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
