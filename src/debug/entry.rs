//! What a log entry holds, as a line of text and as JSON fields: a client
//! write (log.proto `Command`), a configuration change (raft-rs
//! ConfChangeV2 with a log.proto `MembershipContext`), or a new leader's
//! empty entry. Decoded by the node's own functions, so this shows what a
//! replica would apply.

use bytes::Bytes;
use corekv_node::membership::{self, ChangeStep};
use corekv_proto::log::{command::Op, Member};
use corekv_wal::EntryRef;
use serde_json::{json, Map, Value};

use super::escape;

/// raft-rs's `EntryType` numbers (eraftpb.proto), which the node stores as
/// the WAL's entry type byte.
const ENTRY_NORMAL: u8 = 0;
const ENTRY_CONF_CHANGE: u8 = 1;
const ENTRY_CONF_CHANGE_V2: u8 = 2;

/// The entry's type and content: JSON fields, and the same as text.
pub(super) fn describe(entry: &EntryRef<'_>) -> (Map<String, Value>, String) {
    let mut fields = Map::new();
    let text = match entry.entry_type {
        ENTRY_NORMAL => {
            fields.insert("entry_type".into(), "normal".into());
            format!("normal {}", command(entry.data, &mut fields))
        }
        ENTRY_CONF_CHANGE_V2 => {
            fields.insert("entry_type".into(), "conf_change_v2".into());
            format!("conf-change-v2 {}", conf_change(entry.data, &mut fields))
        }
        ENTRY_CONF_CHANGE => {
            fields.insert("entry_type".into(), "conf_change".into());
            "conf-change (version 1: corekv never proposes one, a replica skips it)".into()
        }
        other => {
            fields.insert("entry_type".into(), other.into());
            format!("entry type {other} (unknown to this build)")
        }
    };
    (fields, text)
}

fn command(data: &[u8], fields: &mut Map<String, Value>) -> String {
    if data.is_empty() {
        fields.insert("op".into(), "empty".into());
        return "empty (a new leader's first entry)".into();
    }
    let (op, tag) = match corekv_node::command::decode(&Bytes::copy_from_slice(data)) {
        Ok(decoded) => decoded,
        Err(e) => {
            fields.insert("op".into(), "undecodable".into());
            fields.insert("error".into(), e.to_string().into());
            return format!("undecodable: {e}");
        }
    };
    let mut text = match op {
        Op::Put(put) => {
            insert_all(
                fields,
                json!({ "op": "put", "key": escape(&put.key), "value_bytes": put.value.len() }),
            );
            format!(
                "put key=\"{}\" value_bytes={}",
                escape(&put.key),
                put.value.len()
            )
        }
        Op::Delete(delete) => {
            insert_all(
                fields,
                json!({ "op": "delete", "key": escape(&delete.key), "expected_version": delete.expected_version }),
            );
            let expected = delete
                .expected_version
                .map_or(String::new(), |v| format!(" expected_version={v}"));
            format!("delete key=\"{}\"{expected}", escape(&delete.key))
        }
        Op::Cas(cas) => {
            insert_all(
                fields,
                json!({
                    "op": "cas",
                    "key": escape(&cas.key),
                    "expected_version": cas.expected_version,
                    "value_bytes": cas.value.len(),
                }),
            );
            format!(
                "cas key=\"{}\" expected_version={} value_bytes={}",
                escape(&cas.key),
                cas.expected_version,
                cas.value.len()
            )
        }
        Op::OpenSession(_) => {
            fields.insert("op".into(), "open_session".into());
            "open-session".into()
        }
    };
    if tag.session_id != 0 {
        insert_all(
            fields,
            json!({ "session_id": tag.session_id, "sequence": tag.sequence, "acked_below": tag.acked_below }),
        );
        text.push_str(&format!(
            " session={} sequence={} acked_below={}",
            tag.session_id, tag.sequence, tag.acked_below
        ));
    }
    text
}

fn conf_change(data: &[u8], fields: &mut Map<String, Value>) -> String {
    let Some((steps, context)) = membership::describe_change(data) else {
        fields.insert("change".into(), "undecodable".into());
        return "undecodable (a replica skips it)".into();
    };
    let (names, ids): (Vec<&str>, Vec<u64>) = steps
        .iter()
        .map(|step| match *step {
            ChangeStep::AddVoter(id) => ("add_voter", id),
            ChangeStep::AddLearner(id) => ("add_learner", id),
            ChangeStep::Remove(id) => ("remove", id),
        })
        .unzip();
    let changes: Vec<Value> = names
        .iter()
        .zip(&ids)
        .map(|(op, id)| json!({ "op": op, "node_id": id }))
        .collect();
    fields.insert("changes".into(), changes.into());
    let members: Vec<Value> = context.members.iter().map(member_json).collect();
    fields.insert("members".into(), members.into());
    let mut text = if steps.is_empty() {
        "leave-joint".to_string()
    } else {
        let said: Vec<String> = names
            .iter()
            .zip(&ids)
            .map(|(op, id)| format!("{} {id}", op.replace('_', "-")))
            .collect();
        said.join(", ")
    };
    for member in &context.members {
        text.push_str(&format!(" [{}]", member_text(member)));
    }
    text
}

/// A member's addresses as JSON (the log.proto field names).
pub(super) fn member_json(member: &Member) -> Value {
    json!({
        "id": member.id,
        "host": member.host,
        "client_port": member.client_port,
        "peer_port": member.peer_port,
        "admin_port": member.admin_port,
    })
}

/// A member's addresses as text.
pub(super) fn member_text(member: &Member) -> String {
    format!(
        "{} {} client={} peer={} admin={}",
        member.id, member.host, member.client_port, member.peer_port, member.admin_port
    )
}

fn insert_all(fields: &mut Map<String, Value>, value: Value) {
    if let Value::Object(more) = value {
        fields.extend(more);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corekv_node::sessions::SessionTag;
    use corekv_proto::client::{request, Put};
    use raft::prelude::EntryType;

    #[test]
    fn entry_type_numbers_are_raft_rs_ones() {
        assert_eq!(EntryType::EntryNormal as u8, ENTRY_NORMAL);
        assert_eq!(EntryType::EntryConfChange as u8, ENTRY_CONF_CHANGE);
        assert_eq!(EntryType::EntryConfChangeV2 as u8, ENTRY_CONF_CHANGE_V2);
    }

    fn entry(entry_type: u8, data: &[u8]) -> EntryRef<'_> {
        EntryRef {
            index: 5,
            term: 2,
            entry_type,
            data,
        }
    }

    #[test]
    fn a_put_names_its_key_and_value_size() {
        let op = request::Op::Put(Put {
            key: Bytes::from_static(b"k\x001"),
            value: Bytes::from_static(b"value"),
        });
        let tag = SessionTag {
            session_id: 3,
            sequence: 7,
            acked_below: 6,
        };
        let data = corekv_node::command::encode(&op, tag).unwrap();
        let (fields, text) = describe(&entry(ENTRY_NORMAL, &data));
        assert_eq!(
            text,
            "normal put key=\"k\\x001\" value_bytes=5 session=3 sequence=7 acked_below=6"
        );
        assert_eq!(fields["op"], "put");
        assert_eq!(fields["key"], "k\\x001");
        assert_eq!(fields["value_bytes"], 5);
        assert_eq!(fields["session_id"], 3);
    }

    #[test]
    fn empty_and_undecodable_entries_are_said_to_be_so() {
        let (fields, text) = describe(&entry(ENTRY_NORMAL, b""));
        assert_eq!(fields["op"], "empty");
        assert!(text.contains("new leader"), "{text}");
        let (fields, _) = describe(&entry(ENTRY_NORMAL, &[0xff, 0xff, 0xff]));
        assert_eq!(fields["op"], "undecodable");
        let (fields, text) = describe(&entry(ENTRY_CONF_CHANGE_V2, &[0xff, 0xff]));
        assert_eq!(fields["change"], "undecodable");
        assert!(text.contains("skips"), "{text}");
    }

    #[test]
    fn a_bootstrap_entry_adds_a_voter_with_its_addresses() {
        let member = Member {
            id: 2,
            host: "127.0.0.1".into(),
            client_port: 7200,
            peer_port: 7250,
            admin_port: 7290,
        };
        let entries = membership::bootstrap_entries(std::slice::from_ref(&member));
        let (fields, text) = describe(&entry(ENTRY_CONF_CHANGE_V2, &entries[0].data));
        assert_eq!(
            text,
            "conf-change-v2 add-voter 2 [2 127.0.0.1 client=7200 peer=7250 admin=7290]"
        );
        assert_eq!(fields["changes"][0]["op"], "add_voter");
        assert_eq!(fields["members"][0]["client_port"], 7200);
    }
}
