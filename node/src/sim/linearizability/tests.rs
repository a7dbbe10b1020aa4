//! Hand-written histories: ones a correct store cannot produce, which must
//! be flagged, and tricky ones it can, which must pass.

use super::*;

fn bytes(text: &str) -> Bytes {
    Bytes::copy_from_slice(text.as_bytes())
}

fn put(key: &str, value: &str) -> Op {
    Op::Put {
        key: bytes(key),
        value: bytes(value),
    }
}

fn cas(key: &str, expected_version: u64, value: &str) -> Op {
    Op::Cas {
        key: bytes(key),
        expected_version,
        value: bytes(value),
    }
}

fn delete(key: &str, expected_version: Option<u64>) -> Op {
    Op::Delete {
        key: bytes(key),
        expected_version,
    }
}

fn read(key: &str, consistency: Consistency) -> Op {
    Op::Get {
        key: bytes(key),
        consistency,
    }
}

fn get(key: &str) -> Op {
    read(key, Consistency::Linearizable)
}

fn stale(key: &str) -> Op {
    read(key, Consistency::Stale)
}

fn written(version: u64) -> Option<Outcome> {
    Some(Outcome::Written { version })
}

fn found(value: &str, version: u64) -> Option<Outcome> {
    Some(Outcome::Found {
        value: bytes(value),
        version,
    })
}

fn mismatch(current_version: u64) -> Option<Outcome> {
    Some(Outcome::Mismatch { current_version })
}

fn deleted(found: bool) -> Option<Outcome> {
    Some(Outcome::Deleted { found })
}

const NOT_FOUND: Option<Outcome> = Some(Outcome::NotFound);
const FAILED: Option<Outcome> = Some(Outcome::Failed);
/// No answer: the client gave up.
const UNKNOWN: Option<Outcome> = None;

/// Each operation runs alone, one after the other, client 1 unless the
/// tuple says otherwise.
fn sequential(steps: Vec<(ClientId, Op, Option<Outcome>)>) -> History {
    let mut history = History::new();
    for (index, (client, op, outcome)) in steps.into_iter().enumerate() {
        let time = 10 * index as u64;
        let id = history.invoke(client, op, time);
        match outcome {
            Some(outcome) => history.complete(id, outcome, time + 5),
            None => history.unknown(id, time + 5),
        }
    }
    history
}

fn reason(history: &History) -> Reason {
    match check(history) {
        Err(CheckError::Violation(violation)) => violation.reason,
        other => panic!("expected a violation, got {other:?}"),
    }
}

fn violation(history: &History) -> Violation {
    match check(history) {
        Err(CheckError::Violation(violation)) => violation,
        other => panic!("expected a violation, got {other:?}"),
    }
}

#[test]
fn a_linearizable_read_of_an_overwritten_value_is_flagged() {
    for consistency in [Consistency::Linearizable, Consistency::Lease] {
        let history = sequential(vec![
            (1, put("k", "a"), written(1)),
            (2, put("k", "b"), written(2)),
            (3, read("k", consistency), found("a", 1)),
        ]);
        let violation = violation(&history);
        assert!(
            matches!(
                violation.reason,
                Reason::NotLinearizable {
                    placed: 2,
                    answered: 3,
                    ..
                }
            ),
            "{violation}"
        );
        assert_eq!(violation.excerpt.records.len(), 3, "{violation}");
    }
}

#[test]
fn the_same_read_as_a_stale_read_passes() {
    let history = sequential(vec![
        (1, put("k", "a"), written(1)),
        (2, put("k", "b"), written(2)),
        (3, stale("k"), found("a", 1)),
    ]);
    assert_eq!(check(&history), Ok(()));
}

#[test]
fn a_read_of_a_value_never_written_is_flagged() {
    let history = sequential(vec![
        (1, put("k", "a"), written(1)),
        (2, get("k"), found("z", 1)),
    ]);
    assert_eq!(
        reason(&history),
        Reason::NeverWritten {
            read: history.records()[1].id
        }
    );
    // Nor by a write that failed, or a cas that did not match.
    let history = sequential(vec![
        (1, put("k", "a"), FAILED),
        (1, cas("k", 7, "b"), mismatch(0)),
        (2, stale("k"), found("b", 3)),
    ]);
    assert!(matches!(reason(&history), Reason::NeverWritten { .. }));
    let history = sequential(vec![
        (1, put("k", "a"), FAILED),
        (2, stale("k"), found("a", 3)),
    ]);
    assert!(matches!(reason(&history), Reason::NeverWritten { .. }));
}

#[test]
fn a_lost_acknowledged_write_is_flagged() {
    let history = sequential(vec![
        (1, put("k", "a"), written(4)),
        (2, get("k"), NOT_FOUND),
    ]);
    assert!(matches!(reason(&history), Reason::NotLinearizable { .. }));
}

#[test]
fn two_cas_from_one_version_cannot_both_succeed() {
    let mut history = History::new();
    let first = history.invoke(1, put("k", "a"), 0);
    history.complete(first, Outcome::Written { version: 1 }, 1);
    let b = history.invoke(2, cas("k", 1, "b"), 2);
    let c = history.invoke(3, cas("k", 1, "c"), 3);
    history.complete(b, Outcome::Written { version: 2 }, 4);
    history.complete(c, Outcome::Written { version: 3 }, 5);
    assert!(matches!(reason(&history), Reason::NotLinearizable { .. }));
}

#[test]
fn versions_going_backwards_are_flagged() {
    let history = sequential(vec![
        (1, put("k", "a"), written(5)),
        (2, put("k", "b"), written(3)),
    ]);
    assert!(matches!(reason(&history), Reason::NotLinearizable { .. }));
    // After a delete a lower version is fine: the checker assumes no
    // more than "above the current version".
    let history = sequential(vec![
        (1, put("k", "a"), written(5)),
        (1, delete("k", None), deleted(true)),
        (2, put("k", "b"), written(3)),
        (2, get("k"), found("b", 3)),
    ]);
    assert_eq!(check(&history), Ok(()));
}

#[test]
fn a_read_of_a_write_invoked_after_it_finished_is_flagged() {
    let history = sequential(vec![
        (1, get("k"), found("a", 1)),
        (2, put("k", "a"), written(1)),
    ]);
    let (read, write) = (history.records()[0].id, history.records()[1].id);
    assert_eq!(reason(&history), Reason::ReadFromFuture { read, write });
    let history = sequential(vec![
        (1, stale("k"), found("a", 1)),
        (2, put("k", "a"), UNKNOWN),
    ]);
    assert!(matches!(reason(&history), Reason::ReadFromFuture { .. }));
}

#[test]
fn a_write_has_one_version_and_no_other_write_has_it() {
    let history = sequential(vec![
        (1, put("k", "a"), written(4)),
        (2, put("k", "b"), written(4)),
    ]);
    assert!(matches!(
        reason(&history),
        Reason::DuplicateVersion { version: 4, .. }
    ));
    let history = sequential(vec![
        (1, put("k", "a"), written(4)),
        (2, stale("k"), found("a", 5)),
    ]);
    assert!(matches!(reason(&history), Reason::VersionConflict { .. }));
    // An unanswered write seen with two versions.
    let history = sequential(vec![
        (1, put("k", "a"), UNKNOWN),
        (2, get("k"), found("a", 4)),
        (2, get("k"), found("a", 6)),
    ]);
    assert!(matches!(reason(&history), Reason::VersionConflict { .. }));
    let history = sequential(vec![
        (1, put("k", "a"), UNKNOWN),
        (2, stale("k"), found("a", 0)),
    ]);
    assert!(matches!(reason(&history), Reason::ZeroVersion { .. }));
}

#[test]
fn an_unanswered_write_cannot_take_a_version_another_write_owns() {
    // "a" is unknown; the cas says the key was at v2 when it ran, but v2
    // belongs to "b", which the reads show came and went after "a".
    let history = sequential(vec![
        (1, put("k", "a"), UNKNOWN),
        (2, get("k"), found("a", 1)),
        (2, put("k", "b"), written(2)),
        (2, delete("k", None), deleted(true)),
        (3, put("k", "c"), UNKNOWN),
        (2, cas("k", 9, "d"), mismatch(2)),
    ]);
    assert!(matches!(reason(&history), Reason::NotLinearizable { .. }));
}

#[test]
fn concurrent_operations_may_take_effect_in_any_valid_order() {
    let mut history = History::new();
    let a = history.invoke(1, put("k", "a"), 0);
    let b = history.invoke(2, put("k", "b"), 1);
    let first = history.invoke(3, get("k"), 2);
    history.complete(
        first,
        Outcome::Found {
            value: bytes("b"),
            version: 6,
        },
        3,
    );
    let second = history.invoke(3, get("k"), 4);
    history.complete(
        second,
        Outcome::Found {
            value: bytes("a"),
            version: 7,
        },
        5,
    );
    history.complete(b, Outcome::Written { version: 6 }, 8);
    history.complete(a, Outcome::Written { version: 7 }, 9);
    let late = history.invoke(4, cas("k", 7, "c"), 10);
    let racing = history.invoke(5, cas("k", 7, "d"), 10);
    history.complete(racing, Outcome::Mismatch { current_version: 8 }, 11);
    history.complete(late, Outcome::Written { version: 8 }, 12);
    assert_eq!(check(&history), Ok(()));
}

#[test]
fn unanswered_writes_may_take_effect_late_or_never() {
    // "a" took effect long after its client gave up, with a version
    // only a read revealed; "b" never took effect.
    let history = sequential(vec![
        (1, put("k", "a"), UNKNOWN),
        (2, put("k", "b"), UNKNOWN),
        (3, get("k"), NOT_FOUND),
        (3, get("k"), found("a", 9)),
        (3, get("k"), found("a", 9)),
    ]);
    assert_eq!(check(&history), Ok(()));
    // An unanswered cas shown only by a later mismatch and read.
    let history = sequential(vec![
        (1, put("k", "a"), written(1)),
        (2, cas("k", 1, "b"), UNKNOWN),
        (3, cas("k", 1, "c"), mismatch(7)),
        (3, get("k"), found("b", 7)),
    ]);
    assert_eq!(check(&history), Ok(()));
    // An unanswered delete, shown by a cas from version 0.
    let history = sequential(vec![
        (1, put("k", "a"), written(1)),
        (2, delete("k", Some(1)), UNKNOWN),
        (3, cas("k", 0, "c"), written(5)),
    ]);
    assert_eq!(check(&history), Ok(()));
    // A failed write never takes effect.
    let history = sequential(vec![(1, put("k", "a"), FAILED), (2, get("k"), NOT_FOUND)]);
    assert_eq!(check(&history), Ok(()));
}

#[test]
fn a_mismatch_may_see_a_later_unanswered_write() {
    // The mismatch fits right after "a" (binding its version to 3), but
    // the cas needs "a" at version 1: the mismatch saw "c" instead.
    let mut history = History::new();
    let a = history.invoke(1, put("k", "a"), 0);
    let b = history.invoke(2, cas("k", 1, "b"), 10);
    let mismatched = history.invoke(3, cas("k", 4, "x"), 19);
    history.complete(b, Outcome::Written { version: 2 }, 19);
    let c = history.invoke(4, put("k", "c"), 20);
    history.complete(mismatched, Outcome::Mismatch { current_version: 3 }, 30);
    history.unknown(a, 40);
    history.unknown(c, 40);
    assert_eq!(check(&history), Ok(()));
}

#[test]
fn an_unanswered_write_cannot_take_effect_before_its_invocation() {
    let history = sequential(vec![
        (1, get("k"), NOT_FOUND),
        (2, put("k", "a"), UNKNOWN),
        (3, delete("k", Some(0)), deleted(false)),
    ]);
    assert_eq!(check(&history), Ok(()));
    let history = sequential(vec![
        (1, delete("k", None), deleted(true)),
        (2, put("k", "a"), UNKNOWN),
    ]);
    assert!(matches!(reason(&history), Reason::NotLinearizable { .. }));
}

#[test]
fn deletes_and_recreation() {
    let history = sequential(vec![
        (1, put("k", "a"), written(1)),
        (1, delete("k", None), deleted(true)),
        (2, get("k"), NOT_FOUND),
        (2, cas("k", 0, "b"), written(3)),
        (3, get("k"), found("b", 3)),
        (3, delete("k", Some(2)), mismatch(3)),
        (3, delete("k", Some(3)), deleted(true)),
        (1, delete("k", None), deleted(false)),
        (1, delete("k", Some(0)), deleted(false)),
        (2, cas("k", 3, "c"), mismatch(0)),
        (2, put("k", "d"), written(6)),
        (2, read("k", Consistency::Lease), found("d", 6)),
    ]);
    assert_eq!(check(&history), Ok(()));
    let history = sequential(vec![
        (1, put("k", "a"), written(1)),
        (1, delete("k", None), deleted(false)),
    ]);
    assert!(matches!(reason(&history), Reason::NotLinearizable { .. }));
}

#[test]
fn keys_are_checked_apart() {
    let history = sequential(vec![
        (1, put("j", "a"), written(1)),
        (1, put("k", "a"), written(2)),
        (2, get("j"), found("a", 1)),
        (2, get("k"), found("a", 2)),
        (2, get("i"), NOT_FOUND),
    ]);
    assert_eq!(check(&history), Ok(()));
}

#[test]
fn stale_reads_of_a_client_never_go_back() {
    let history = sequential(vec![
        (1, put("k", "a"), written(1)),
        (1, put("k", "b"), written(2)),
        (2, stale("k"), found("a", 1)),
        (2, stale("k"), found("b", 2)),
        (3, stale("k"), found("a", 1)),
        (3, stale("k"), NOT_FOUND),
    ]);
    let earlier = history.records()[4].id;
    let later = history.records()[5].id;
    assert_eq!(
        check_stale_reads(&history),
        Err(Violation {
            key: bytes("k"),
            reason: Reason::StaleReadWentBack {
                client: 3,
                earlier,
                later
            },
            excerpt: Excerpt::of(&history, [history.records()[0].id, earlier, later]),
            earlier_unanswered: Vec::new(),
        })
    );
    let history = sequential(vec![
        (1, put("k", "a"), written(1)),
        (1, put("k", "b"), written(2)),
        (2, stale("k"), found("b", 2)),
        (2, stale("k"), found("a", 1)),
    ]);
    assert!(matches!(
        reason(&history),
        Reason::StaleReadWentBack { client: 2, .. }
    ));
}

#[test]
fn a_delete_explains_a_stale_read_going_back() {
    let history = sequential(vec![
        (1, put("k", "a"), written(5)),
        (2, stale("k"), found("a", 5)),
        (1, delete("k", None), UNKNOWN),
        (2, stale("k"), NOT_FOUND),
        (1, put("k", "b"), written(2)),
        (2, stale("k"), found("b", 2)),
    ]);
    assert_eq!(check(&history), Ok(()));
    // A delete that finished before the value was written explains nothing.
    let history = sequential(vec![
        (1, delete("k", None), deleted(true)),
        (1, put("k", "a"), written(5)),
        (2, stale("k"), found("a", 5)),
        (2, stale("k"), NOT_FOUND),
    ]);
    assert!(matches!(reason(&history), Reason::StaleReadWentBack { .. }));
}

#[test]
fn an_exhausted_budget_is_inconclusive_not_a_verdict() {
    let steps = (0..20)
        .map(|i| (1, put("k", &format!("v{i}")), written(i + 1)))
        .collect();
    let history = sequential(steps);
    let limits = Limits {
        steps_per_key: 5,
        ..Limits::default()
    };
    assert_eq!(
        check_with(&history, &limits),
        Err(CheckError::Inconclusive(Inconclusive {
            key: bytes("k"),
            steps: 5,
            ops: 20
        }))
    );
    assert_eq!(check(&history), Ok(()));
}

#[test]
fn a_violation_prints_key_reason_and_excerpt() {
    let history = sequential(vec![
        (1, put("k", "a"), written(1)),
        (2, put("k", "b"), written(2)),
        (3, get("k"), found("a", 1)),
    ]);
    assert_eq!(
        check(&history).unwrap_err().to_string(),
        "key \"k\": not linearizable: at most 2 of 3 answered operations fit in one order; none fits #2 after them; \
         the excerpt admits no order whatever the key held before it\n\
         \x20 #0 client 1: put \"k\" \"a\" -> written v1 [t 0..5]\n\
         \x20 #1 client 2: put \"k\" \"b\" -> written v2 [t 10..15]\n\
         \x20 #2 client 3: get \"k\" -> found \"a\" v1 [t 20..25]\n"
    );
}
