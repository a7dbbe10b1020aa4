//! What a RAFT peer link may hand the shard loop. Every frame is checked
//! against the link it arrived on before anything reaches the replica: a
//! raft message must come from the node that did the handshake, be meant for
//! this node, and be of a kind peers exchange (a snapshot travels only on a
//! snapshot link, after its file verified; local-only kinds never travel).
//! A forwarded request must name the link's node as its origin. What fails a
//! check is dropped and counted; nothing a peer sends can panic the node.

use corekv_proto::peer::{peer_frame, PeerFrame};
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};

use super::inputs::Input;

/// Why something a peer sent was dropped. Also the `reason` label of
/// `peer_messages_refused_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Bytes that are not a raft message.
    Undecodable,
    /// A raft message whose `from` is not the link's node.
    WrongFrom,
    /// A raft message for another node.
    WrongTo,
    /// A kind of raft message that does not travel on a RAFT link.
    WrongType,
    /// A raft message without a term: raft-rs takes those for local input.
    NoTerm,
    /// A raft message no correct node sends (raft-rs trusts its peers and
    /// would abort on it).
    Malformed,
    /// A forwarded request on behalf of another node.
    WrongOrigin,
    /// A frame kind a RAFT link does not carry.
    UnexpectedFrame,
}

impl Refusal {
    /// The metric label and log wording.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Refusal::Undecodable => "undecodable",
            Refusal::WrongFrom => "wrong_from",
            Refusal::WrongTo => "wrong_to",
            Refusal::WrongType => "wrong_type",
            Refusal::NoTerm => "no_term",
            Refusal::Malformed => "malformed",
            Refusal::WrongOrigin => "wrong_origin",
            Refusal::UnexpectedFrame => "unexpected_frame",
        }
    }
}

/// Who is at either end of a link.
#[derive(Clone, Copy, Debug)]
pub(super) struct LinkEnds {
    /// The node id the peer proved in its Hello.
    pub(super) peer: u64,
    /// This node's id.
    pub(super) me: u64,
}

/// The kinds of raft message our nodes send each other on a RAFT link. All
/// but MsgReadIndex are stamped with the sender's term. `MsgSnapshot` comes
/// only through the snapshot path with its verified file. MsgHup, MsgBeat,
/// MsgPropose, MsgUnreachable, MsgSnapStatus and MsgCheckQuorum are raft-rs's
/// local inputs. MsgTransferLeader travels only when a follower forwards it
/// to its leader, which ours never do (a transfer is only asked of a leader),
/// and raft-rs aborts when it forwards one that carries a term: a peer
/// sending it could stop the node.
fn travels_on_a_raft_link(kind: MessageType) -> bool {
    matches!(
        kind,
        MessageType::MsgAppend
            | MessageType::MsgAppendResponse
            | MessageType::MsgRequestVote
            | MessageType::MsgRequestVoteResponse
            | MessageType::MsgRequestPreVote
            | MessageType::MsgRequestPreVoteResponse
            | MessageType::MsgHeartbeat
            | MessageType::MsgHeartbeatResponse
            | MessageType::MsgTimeoutNow
            | MessageType::MsgReadIndex
            | MessageType::MsgReadIndexResp
    )
}

/// Checks one raft message against the link it came on.
pub(super) fn check_raft_message(message: &Message, link: LinkEnds) -> Result<(), Refusal> {
    if message.from != link.peer {
        return Err(Refusal::WrongFrom);
    }
    if message.to != link.me {
        return Err(Refusal::WrongTo);
    }
    if !travels_on_a_raft_link(message.get_msg_type()) {
        return Err(Refusal::WrongType);
    }
    match message.get_msg_type() {
        // A follower's read round forwarded to its leader: raft-rs sends it
        // without a term, and aborts if it has to forward one with a term
        // again (when this node no longer leads); a leader indexes its one
        // entry, the round's context, without looking.
        MessageType::MsgReadIndex => {
            if message.term != 0 {
                return Err(Refusal::Malformed);
            }
            if message.entries.len() != 1
                || message.entries[0].data.len() != crate::replica::READ_CONTEXT_BYTES
            {
                return Err(Refusal::Malformed);
            }
            return Ok(());
        }
        MessageType::MsgReadIndexResp if message.entries.len() != 1 => {
            return Err(Refusal::Malformed);
        }
        _ => {}
    }
    if message.term == 0 {
        return Err(Refusal::NoTerm);
    }
    if message.get_msg_type() == MessageType::MsgAppend && !append_is_well_formed(message) {
        return Err(Refusal::Malformed);
    }
    Ok(())
}

/// What every append of a correct leader satisfies: it names the term of
/// the entry before its entries (no entry has term 0), its entries follow
/// that index one by one, and their terms never fall and never pass the
/// leader's. raft-rs takes an append's word for these and panics on a log
/// that breaks them.
fn append_is_well_formed(message: &Message) -> bool {
    if (message.index == 0) != (message.log_term == 0) || message.log_term > message.term {
        return false;
    }
    let mut previous_term = message.log_term;
    for (offset, entry) in message.entries.iter().enumerate() {
        let expected_index = message.index + 1 + offset as u64;
        if entry.index != expected_index
            || entry.term == 0
            || entry.term < previous_term
            || entry.term > message.term
        {
            return false;
        }
        previous_term = entry.term;
    }
    true
}

/// The shard inputs one frame of a RAFT link turns into, in order; each
/// dropped part is reported to `refused`.
pub(super) fn inputs_of_frame(
    frame: PeerFrame,
    link: LinkEnds,
    mut refused: impl FnMut(Refusal),
) -> Vec<Input> {
    let mut inputs = Vec::new();
    match frame.msg {
        Some(peer_frame::Msg::Raft(batch)) => {
            for bytes in batch.messages {
                let message = match Message::parse_from_carllerche_bytes(&bytes) {
                    Ok(message) => message,
                    Err(_) => {
                        refused(Refusal::Undecodable);
                        continue;
                    }
                };
                match check_raft_message(&message, link) {
                    Ok(()) => inputs.push(Input::Raft(Box::new(message))),
                    Err(refusal) => refused(refusal),
                }
            }
        }
        Some(peer_frame::Msg::Forward(forward)) => {
            if forward.origin_node != link.peer {
                refused(Refusal::WrongOrigin);
            } else if let Some(request) = forward.request {
                inputs.push(Input::Forward {
                    origin_node: forward.origin_node,
                    request,
                });
            }
        }
        Some(peer_frame::Msg::ForwardReply(reply)) => {
            if let Some(response) = reply.response {
                inputs.push(Input::ForwardReply(response));
            }
        }
        _ => refused(Refusal::UnexpectedFrame),
    }
    inputs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log_store::memory::{MemDisk, MemLogStore, MemSyncJob};
    use crate::replica::{Output, Replica, ReplicaOptions};
    use bytes::Bytes;
    use corekv_proto::peer::RaftBatch;
    use proptest::prelude::*;
    use protobuf::ProtobufEnum as _;
    use raft::prelude::{Entry, EntryType, Snapshot};

    const LINK: LinkEnds = LinkEnds { peer: 2, me: 1 };

    fn message(kind: MessageType, from: u64, to: u64) -> Message {
        let mut m = Message::default();
        m.set_msg_type(kind);
        m.from = from;
        m.to = to;
        m
    }

    /// `m` with `count` entries of `data_len` bytes each.
    fn with_entries(mut m: Message, count: usize, data_len: usize) -> Message {
        let entry = Entry {
            data: vec![7; data_len].into(),
            ..Default::default()
        };
        m.set_entries(vec![entry; count].into());
        m
    }

    fn frame_of(messages: Vec<Message>) -> PeerFrame {
        let messages = messages
            .iter()
            .map(|m| Bytes::from(m.write_to_bytes().unwrap()))
            .collect();
        PeerFrame {
            msg: Some(peer_frame::Msg::Raft(RaftBatch { messages })),
        }
    }

    fn refusals(frame: PeerFrame) -> (usize, Vec<Refusal>) {
        let mut refused = Vec::new();
        let inputs = inputs_of_frame(frame, LINK, |r| refused.push(r));
        (inputs.len(), refused)
    }

    #[test]
    fn only_peer_messages_from_the_link_node_to_us_pass() {
        let mut ok = message(MessageType::MsgHeartbeat, 2, 1);
        ok.term = 1;
        assert_eq!(refusals(frame_of(vec![ok])), (1, vec![]));
        let round = with_entries(message(MessageType::MsgReadIndex, 2, 1), 1, 16);
        assert_eq!(refusals(frame_of(vec![round.clone()])), (1, vec![]));
        let mut with_term = round;
        with_term.term = 1;
        let cases = [
            (with_term, Refusal::Malformed),
            (message(MessageType::MsgHeartbeat, 3, 1), Refusal::WrongFrom),
            (message(MessageType::MsgAppend, 2, 3), Refusal::WrongTo),
            (message(MessageType::MsgSnapshot, 2, 1), Refusal::WrongType),
            (message(MessageType::MsgHup, 2, 1), Refusal::WrongType),
            (message(MessageType::MsgPropose, 2, 1), Refusal::WrongType),
            (
                message(MessageType::MsgUnreachable, 2, 1),
                Refusal::WrongType,
            ),
            (
                message(MessageType::MsgTransferLeader, 2, 1),
                Refusal::WrongType,
            ),
            (message(MessageType::MsgHeartbeat, 2, 1), Refusal::NoTerm),
            // A forwarded read round: no term, exactly one context entry.
            (message(MessageType::MsgReadIndex, 2, 1), Refusal::Malformed),
            (
                with_entries(message(MessageType::MsgReadIndex, 2, 1), 1, 8),
                Refusal::Malformed,
            ),
            (
                with_entries(message(MessageType::MsgReadIndexResp, 2, 1), 2, 16),
                Refusal::Malformed,
            ),
        ];
        for (m, why) in cases {
            assert_eq!(refusals(frame_of(vec![m])), (0, vec![why]));
        }
        let garbage = PeerFrame {
            msg: Some(peer_frame::Msg::Raft(RaftBatch {
                messages: vec![Bytes::from_static(&[0xff; 9])],
            })),
        };
        assert_eq!(refusals(garbage), (0, vec![Refusal::Undecodable]));
    }

    #[test]
    fn a_forward_on_behalf_of_another_node_is_refused() {
        let forward = |origin_node| PeerFrame {
            msg: Some(peer_frame::Msg::Forward(corekv_proto::peer::Forward {
                origin_node,
                request: Some(Default::default()),
            })),
        };
        assert_eq!(refusals(forward(2)), (1, vec![]));
        assert_eq!(refusals(forward(3)), (0, vec![Refusal::WrongOrigin]));
    }

    /// A follower replica (node 1 of voters 1, 2, 3) on the in-memory store.
    fn follower() -> (Replica<MemLogStore>, Output<MemSyncJob>) {
        let options = ReplicaOptions {
            node_id: 1,
            shard: 0,
            bootstrap: crate::membership::loopback_members([1, 2, 3]),
            heartbeat_ticks: 3,
            election_ticks: 30,
            max_election_ticks: 0,
            request_timeout_ticks: 500,
            liveness_ticks: 30,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 1,
            snapshot_entries: 1_000_000,
            snapshot_bytes: 1 << 30,
            snapshot_log_percent: 100,
            max_state_bytes: 0,
        };
        let disk = MemDisk::new();
        let mut r = Replica::open(disk.open(), options, None).unwrap();
        let mut out = Output::default();
        r.handle_ready(&mut out).unwrap();
        (r, out)
    }

    /// Node 1 as the leader of voters 1, 2, 3: node 2 granted its votes.
    fn leader() -> (Replica<MemLogStore>, Output<MemSyncJob>) {
        let (mut r, mut out) = follower();
        let settle = |r: &mut Replica<MemLogStore>, out: &mut Output<MemSyncJob>| {
            r.handle_ready(out).unwrap();
            while let Some(job) = out.sync.take() {
                r.on_synced(job.run(), out).unwrap();
            }
        };
        for _ in 0..200 {
            if r.is_leader() {
                break;
            }
            r.tick(&mut out);
            settle(&mut r, &mut out);
            let asks: Vec<Message> = out.messages.drain(..).filter(|m| m.to == 2).collect();
            for ask in asks {
                let kind = match ask.get_msg_type() {
                    MessageType::MsgRequestPreVote => MessageType::MsgRequestPreVoteResponse,
                    MessageType::MsgRequestVote => MessageType::MsgRequestVoteResponse,
                    _ => continue,
                };
                let mut grant = message(kind, 2, 1);
                grant.term = ask.term;
                r.step(grant);
                settle(&mut r, &mut out);
            }
        }
        assert!(r.is_leader(), "node 1 did not win with node 2's votes");
        out.messages.clear();
        (r, out)
    }

    fn arbitrary_kind() -> impl Strategy<Value = MessageType> {
        (0i32..20).prop_map(|n| MessageType::from_i32(n).unwrap_or(MessageType::MsgHeartbeat))
    }

    prop_compose! {
        /// A decodable raft message with fields all over the place: any kind,
        /// any term, index and commit, entries of any type, a snapshot.
        fn arbitrary_message()(
            kind in arbitrary_kind(),
            from in prop_oneof![3 => Just(LINK.peer), 1 => 0u64..5],
            to in prop_oneof![3 => Just(LINK.me), 1 => 0u64..3],
            term in 0u64..8,
            log_term in 0u64..8,
            index in 0u64..40,
            commit in 0u64..60,
            reject in any::<bool>(),
            entries in proptest::collection::vec((0u64..8, 0i32..3, any::<Vec<u8>>()), 0..4),
            snapshot_index in 0u64..50,
        ) -> Message {
            let mut m = message(kind, from, to);
            m.term = term;
            m.log_term = log_term;
            m.index = index;
            m.commit = commit;
            m.reject = reject;
            let entries: Vec<Entry> = entries
                .into_iter()
                .enumerate()
                .map(|(i, (term, kind, data))| {
                    let mut e = Entry {
                        index: index + 1 + i as u64,
                        term,
                        data: Bytes::from(data),
                        ..Default::default()
                    };
                    e.set_entry_type(EntryType::from_i32(kind).unwrap_or(EntryType::EntryNormal));
                    e
                })
                .collect();
            m.set_entries(entries.into());
            let mut snapshot = Snapshot::default();
            snapshot.mut_metadata().index = snapshot_index;
            snapshot.mut_metadata().term = term;
            m.set_snapshot(snapshot);
            m
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever a peer sends on a RAFT link, as raw frame bytes or as
        /// decodable raft messages with arbitrary fields, the replica behind
        /// the checks neither panics nor breaks its invariants.
        #[test]
        fn arbitrary_peer_input_never_panics_the_replica(
            as_leader in any::<bool>(),
            raw in proptest::collection::vec(any::<Vec<u8>>(), 0..4),
            messages in proptest::collection::vec(arbitrary_message(), 1..24),
        ) {
            let (mut r, mut out) = if as_leader { leader() } else { follower() };
            let mut frames: Vec<PeerFrame> = raw
                .iter()
                .filter_map(|bytes| corekv_transport::decode_message::<PeerFrame>(Bytes::from(bytes.clone())).ok())
                .collect();
            frames.extend(messages.chunks(3).map(|chunk| frame_of(chunk.to_vec())));
            for frame in frames {
                for input in inputs_of_frame(frame, LINK, |_| {}) {
                    if let Input::Raft(message) = input {
                        r.step(*message);
                    }
                }
                r.tick(&mut out);
                r.handle_ready(&mut out).unwrap();
                while let Some(job) = out.sync.take() {
                    r.on_synced(job.run(), &mut out).unwrap();
                }
                let status = r.status();
                prop_assert!(status.applied_index <= status.commit_index, "{status:?}");
                prop_assert!(status.commit_index <= status.last_index, "{status:?}");
            }
        }
    }
}
