//! Client writes as Raft log entries: the one place a client.proto operation
//! becomes a log.proto `Command`, and a log entry becomes a command again.
//!
//! Keeping the log's own message apart from the client's means a change to
//! the client protocol never changes what is on disk; a change to `Command`
//! is a change of `corekv_proto::DATA_FORMAT_VERSION`.

use bytes::Bytes;
use corekv_proto::client::request::Op;
use corekv_proto::log::{self, command};
use prost::Message as _;

use crate::sessions::SessionTag;

/// The log entry for a client write, with its session (`SessionTag::default()`
/// for none); `None` for an operation that is not a write (reads never enter
/// the log).
pub fn encode(op: &Op, tag: SessionTag) -> Option<Bytes> {
    encode_owned(op.clone(), tag)
}

/// [`encode`], taking the operation: its key and value move into the
/// command instead of being shared once more (each share of a request's
/// `Bytes` is an atomic increment on the read buffer it came in: 3 % of a
/// leader's samples under pipelined puts, perf).
pub fn encode_owned(op: Op, tag: SessionTag) -> Option<Bytes> {
    let op = match op {
        Op::Put(put) => command::Op::Put(log::Put {
            key: put.key,
            value: put.value,
        }),
        Op::Delete(delete) => command::Op::Delete(log::Delete {
            key: delete.key,
            expected_version: delete.expected_version,
        }),
        Op::Cas(cas) => command::Op::Cas(log::CompareAndSwap {
            key: cas.key,
            expected_version: cas.expected_version,
            value: cas.value,
        }),
        Op::OpenSession(_) => command::Op::OpenSession(log::OpenSession {}),
        Op::Get(_)
        | Op::Scan(_)
        | Op::Topology(_)
        | Op::Status(_)
        | Op::TransferLeader(_)
        | Op::ChangeMembership(_) => return None,
    };
    let command = log::Command {
        op: Some(op),
        session_id: tag.session_id,
        sequence: tag.sequence,
        acked_below: tag.acked_below,
    };
    Some(Bytes::from(command.encode_to_vec()))
}

/// Why a log entry holds no command the state machine can apply.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not a `Command`.
    #[error("undecodable log entry: {0}")]
    Protobuf(#[from] prost::DecodeError),
    /// A `Command` without an operation (written by a newer build, or damaged).
    #[error("log entry without an operation")]
    Empty,
}

/// The command in a log entry's data, with its session. The values share the
/// entry's buffer.
pub fn decode(data: &Bytes) -> Result<(command::Op, SessionTag), DecodeError> {
    let command = log::Command::decode(data.clone())?;
    let tag = SessionTag {
        session_id: command.session_id,
        sequence: command.sequence,
        acked_below: command.acked_below,
    };
    Ok((command.op.ok_or(DecodeError::Empty)?, tag))
}

/// The session a client request names.
pub fn tag_of(request: &corekv_proto::client::Request) -> SessionTag {
    SessionTag {
        session_id: request.session_id,
        sequence: request.sequence,
        acked_below: request.acked_below,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corekv_proto::client::{CompareAndSwap, Delete, Get, Put};

    #[test]
    fn writes_round_trip_and_reads_never_enter_the_log() {
        let put = Op::Put(Put {
            key: Bytes::from_static(b"k"),
            value: Bytes::from_static(b"v"),
        });
        let Ok(command::Op::Put(p)) =
            decode(&encode(&put, SessionTag::default()).unwrap()).map(|(op, _)| op)
        else {
            panic!("put did not round-trip");
        };
        assert_eq!((&p.key[..], &p.value[..]), (&b"k"[..], &b"v"[..]));

        let delete = Op::Delete(Delete {
            key: Bytes::from_static(b"k"),
            expected_version: Some(7),
        });
        let Ok(command::Op::Delete(d)) =
            decode(&encode(&delete, SessionTag::default()).unwrap()).map(|(op, _)| op)
        else {
            panic!("delete did not round-trip");
        };
        assert_eq!(d.expected_version, Some(7));

        let cas = Op::Cas(CompareAndSwap {
            key: Bytes::from_static(b"k"),
            expected_version: 0,
            value: Bytes::from_static(b"v"),
        });
        assert!(matches!(
            decode(&encode(&cas, SessionTag::default()).unwrap()).map(|(op, _)| op),
            Ok(command::Op::Cas(_))
        ));

        let get = Op::Get(Get {
            key: Bytes::from_static(b"k"),
            consistency: 0,
            local: false,
        });
        assert!(encode(&get, SessionTag::default()).is_none());
        let tag = SessionTag {
            session_id: 3,
            sequence: 9,
            acked_below: 4,
        };
        assert_eq!(decode(&encode(&put, tag).unwrap()).unwrap().1, tag);
    }

    #[test]
    fn garbage_and_empty_entries_are_errors_not_panics() {
        assert!(matches!(decode(&Bytes::new()), Err(DecodeError::Empty)));
        assert!(matches!(
            decode(&Bytes::from_static(&[0xff, 0xff, 0xff])),
            Err(DecodeError::Protobuf(_))
        ));
    }
}
