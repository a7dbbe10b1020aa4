//! Histories generated from a reference store: each step takes effect at
//! its own instant, in step order, and its client's interval is drawn
//! around that instant, so the step order is a linearization. Correct ones
//! must pass; one impossible answer planted in them must be flagged.

use proptest::prelude::*;

use super::excerpt::Window;
use super::search::SearchResult;
use super::*;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Put,
    /// Cas from the key's current version, or from a wrong one.
    Cas {
        hit: bool,
    },
    /// Delete with no condition, or at the current version (true) or a
    /// wrong one (false).
    Delete {
        expected: Option<bool>,
    },
    Get(Consistency),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Answered,
    /// Applied, answer lost.
    LostApplied,
    /// Never applied, no answer.
    LostNotApplied,
    /// Not applied, and the client was told so.
    Failed,
}

#[derive(Clone, Copy, Debug)]
struct Step {
    client: u64,
    key: u8,
    kind: Kind,
    fate: Fate,
    /// Ticks between invocation and taking effect.
    lead: u64,
    /// Ticks between taking effect and the answer (or giving up).
    lag: u64,
    /// Which old state a stale read returns.
    pick: u64,
}

#[derive(Clone, Debug)]
enum PlannedEnd {
    Answer { outcome: Outcome, time: u64 },
    GaveUp { time: u64 },
    Pending,
}

/// A step as its client saw it.
#[derive(Clone, Debug)]
struct Planned {
    client: u64,
    op: Op,
    invoked: u64,
    end: PlannedEnd,
}

type State = Option<(Bytes, u64)>;

/// The store's rules, written apart from the checker's model.
fn reference_write(current: &State, op: &Op, index: u64) -> (Outcome, Option<State>) {
    let version = current.as_ref().map_or(0, |(_, version)| *version);
    match op {
        Op::Put { value, .. } => (
            Outcome::Written { version: index },
            Some(Some((value.clone(), index))),
        ),
        Op::Cas {
            expected_version,
            value,
            ..
        } => {
            if *expected_version == version {
                (
                    Outcome::Written { version: index },
                    Some(Some((value.clone(), index))),
                )
            } else {
                (
                    Outcome::Mismatch {
                        current_version: version,
                    },
                    None,
                )
            }
        }
        Op::Delete {
            expected_version, ..
        } => match expected_version {
            Some(expected) if *expected != version => (
                Outcome::Mismatch {
                    current_version: version,
                },
                None,
            ),
            _ => (
                Outcome::Deleted {
                    found: current.is_some(),
                },
                Some(None),
            ),
        },
        Op::Get { .. } => unreachable!("reads are not writes"),
    }
}

fn read_outcome(state: &State) -> Outcome {
    match state {
        Some((value, version)) => Outcome::Found {
            value: value.clone(),
            version: *version,
        },
        None => Outcome::NotFound,
    }
}

fn execute(steps: &[Step]) -> Vec<Planned> {
    // Every write takes a log index, applied or not, as in Raft.
    let mut index = 0;
    // Each key's states in log order; the last is the current one.
    let mut states: BTreeMap<u8, Vec<State>> = BTreeMap::new();
    // The newest state position each client's stale reads returned.
    let mut stale_seen: BTreeMap<(u64, u8), usize> = BTreeMap::new();
    let mut planned = Vec::with_capacity(steps.len());
    for (number, step) in steps.iter().enumerate() {
        let instant = 1_000 + 10 * number as u64;
        let history = states.entry(step.key).or_insert_with(|| vec![None]);
        let current = history.last().expect("starts absent").clone();
        let version = current.as_ref().map_or(0, |(_, version)| *version);
        let key = Bytes::from(format!("k{}", step.key));
        let value = Bytes::from(format!("v{number}"));
        let applies = matches!(step.fate, Fate::Answered | Fate::LostApplied);
        let (op, outcome) = match step.kind {
            Kind::Get(consistency) => {
                let op = Op::Get { key, consistency };
                if consistency != Consistency::Stale {
                    (op, read_outcome(&current))
                } else {
                    let seen = stale_seen.entry((step.client, step.key)).or_insert(0);
                    let position = *seen + step.pick as usize % (history.len() - *seen);
                    if step.fate == Fate::Answered {
                        *seen = position;
                    }
                    (op, read_outcome(&history[position]))
                }
            }
            kind => {
                let op = match kind {
                    Kind::Put => Op::Put { key, value },
                    Kind::Cas { hit } => Op::Cas {
                        key,
                        expected_version: if hit {
                            version
                        } else {
                            version + 1 + step.pick % 3
                        },
                        value,
                    },
                    Kind::Delete { expected } => Op::Delete {
                        key,
                        expected_version: expected
                            .map(|hit| if hit { version } else { version + 1 }),
                    },
                    Kind::Get(_) => unreachable!("matched above"),
                };
                index += 1;
                let (outcome, next) = reference_write(&current, &op, index);
                if let (true, Some(next)) = (applies, next) {
                    history.push(next);
                }
                (op, outcome)
            }
        };
        // Unanswered operations may have started long before.
        let lead = if step.fate == Fate::Answered {
            step.lead
        } else {
            4 * step.lead
        };
        let invoked = instant - lead;
        let end = match step.fate {
            Fate::Answered => PlannedEnd::Answer {
                outcome,
                time: instant + step.lag,
            },
            Fate::Failed => PlannedEnd::Answer {
                outcome: Outcome::Failed,
                time: instant + step.lag,
            },
            // Giving up may come before the write is applied.
            Fate::LostApplied | Fate::LostNotApplied if step.lag % 3 != 0 => PlannedEnd::GaveUp {
                time: invoked + step.lag,
            },
            Fate::LostApplied | Fate::LostNotApplied => PlannedEnd::Pending,
        };
        planned.push(Planned {
            client: step.client,
            op,
            invoked,
            end,
        });
    }
    planned
}

/// Records the planned operations' events in time order (invocations
/// first within a tick, which only removes real-time constraints).
fn record(planned: &[Planned]) -> (History, Vec<OpId>) {
    let mut events: Vec<(u64, bool, usize)> = Vec::new();
    for (number, plan) in planned.iter().enumerate() {
        events.push((plan.invoked, false, number));
        match plan.end {
            PlannedEnd::Answer { time, .. } | PlannedEnd::GaveUp { time } => {
                events.push((time, true, number))
            }
            PlannedEnd::Pending => {}
        }
    }
    events.sort_unstable();
    let mut history = History::new();
    let mut ids = vec![None; planned.len()];
    for (time, is_end, number) in events {
        let plan = &planned[number];
        if !is_end {
            ids[number] = Some(history.invoke(plan.client, plan.op.clone(), time));
            continue;
        }
        let id = ids[number].expect("invoked first");
        match &plan.end {
            PlannedEnd::Answer { outcome, .. } => history.complete(id, outcome.clone(), time),
            PlannedEnd::GaveUp { .. } => history.unknown(id, time),
            PlannedEnd::Pending => unreachable!("no end event"),
        }
    }
    (
        history,
        ids.into_iter()
            .map(|id| id.expect("every step invoked"))
            .collect(),
    )
}

fn step_strategy(clients: u64, keys: u8) -> impl Strategy<Value = Step> {
    let kind = prop_oneof![
        3 => Just(Kind::Put),
        2 => any::<bool>().prop_map(|hit| Kind::Cas { hit }),
        1 => proptest::option::of(any::<bool>()).prop_map(|expected| Kind::Delete { expected }),
        2 => Just(Kind::Get(Consistency::Linearizable)),
        1 => Just(Kind::Get(Consistency::Lease)),
        2 => Just(Kind::Get(Consistency::Stale)),
    ];
    let fate = prop_oneof![
        14 => Just(Fate::Answered),
        2 => Just(Fate::LostApplied),
        2 => Just(Fate::LostNotApplied),
        1 => Just(Fate::Failed),
    ];
    (
        0..clients,
        0..keys,
        kind,
        fate,
        0..30u64,
        0..30u64,
        any::<u64>(),
    )
        .prop_map(|(client, key, kind, fate, lead, lag, pick)| Step {
            client,
            key,
            kind,
            fate,
            lead,
            lag,
            pick,
        })
}

/// A mutation of one answer that no correct store could give, chosen by
/// `choice` among the history's candidates; None if there is none.
fn illegal_mutation(
    history: &History,
    ids: &[OpId],
    mutation: u8,
    choice: usize,
) -> Option<(usize, Outcome)> {
    let record = |number: usize| history.record(ids[number]);
    let same_key = |a: usize, b: usize| record(a).op.key() == record(b).op.key();
    let answered_write =
        |number: usize| match (record(number).op.written_value(), record(number).answer()) {
            (Some(value), Some((Outcome::Written { version }, _))) => {
                Some((value.clone(), *version))
            }
            _ => None,
        };
    let effect = |number: usize| {
        answered_write(number).is_some()
            || matches!(
                record(number).answer(),
                Some((Outcome::Deleted { found: true }, _))
            )
    };
    let linearizable_read = |number: usize| {
        matches!(
            record(number).op,
            Op::Get {
                consistency: Consistency::Linearizable | Consistency::Lease,
                ..
            }
        ) && matches!(
            record(number).answer(),
            Some((Outcome::Found { .. } | Outcome::NotFound, _))
        )
    };
    let all = 0..ids.len();
    let candidates: Vec<(usize, Outcome)> = match mutation {
        // A value nobody wrote.
        0 => all
            .filter(|&read| matches!(record(read).answer(), Some((Outcome::Found { .. }, _))))
            .map(|read| {
                let outcome = Outcome::Found {
                    value: Bytes::from_static(b"never written"),
                    version: 1,
                };
                (read, outcome)
            })
            .collect(),
        // A value that an answered write or delete certainly replaced
        // before the read began.
        1 => all
            .clone()
            .filter(|&read| linearizable_read(read))
            .flat_map(|read| {
                all.clone().filter_map(move |old| {
                    let (value, version) = answered_write(old)?;
                    let replaced = (0..ids.len()).any(|later| {
                        later != old
                            && same_key(later, read)
                            && effect(later)
                            && record(old).precedes(record(later))
                            && record(later).precedes(record(read))
                    });
                    (same_key(old, read) && replaced)
                        .then_some((read, Outcome::Found { value, version }))
                })
            })
            .collect(),
        // Nothing, after an acknowledged write and with no delete
        // invoked before the read ended.
        2 => all
            .clone()
            .filter(|&read| linearizable_read(read))
            .filter(|&read| {
                let (_, read_end) = record(read).answer().expect("answered");
                let written_before = (0..ids.len()).any(|write| {
                    same_key(write, read)
                        && answered_write(write).is_some()
                        && record(write).precedes(record(read))
                });
                let maybe_deleted = (0..ids.len()).any(|delete| {
                    same_key(delete, read)
                        && matches!(record(delete).op, Op::Delete { .. })
                        && !matches!(
                            record(delete).answer(),
                            Some((Outcome::Failed | Outcome::Mismatch { .. }, _))
                        )
                        && record(delete).invoke_seq < read_end
                });
                written_before && !maybe_deleted
            })
            .map(|read| (read, Outcome::NotFound))
            .collect(),
        // A write acknowledged with another write's version.
        _ => all
            .clone()
            .flat_map(|write| {
                all.clone().filter_map(move |other| {
                    let (_, version) = answered_write(write)?;
                    let (_, taken) = answered_write(other)?;
                    (other != write && same_key(write, other) && taken != version)
                        .then_some((write, Outcome::Written { version: taken }))
                })
            })
            .collect(),
    };
    candidates.get(choice % candidates.len().max(1)).cloned()
}

proptest! {
    #[test]
    fn histories_of_a_correct_store_pass(
        steps in proptest::collection::vec(step_strategy(4, 2), 1..80),
    ) {
        let (history, _) = record(&execute(&steps));
        prop_assert_eq!(check(&history), Ok(()));
    }

    /// Windows are searched only for histories that fail, so the
    /// property above would not catch a window that fails wrongly.
    #[test]
    fn every_window_of_a_correct_history_passes(
        steps in proptest::collection::vec(step_strategy(4, 1), 1..60),
        cut in any::<proptest::sample::Index>(),
    ) {
        let (history, _) = record(&execute(&steps));
        let records: Vec<&Record> = history.records().iter().collect();
        let key = records[0].op.key().clone();
        let context = KeyContext::new(&history, &key, records).expect("the static rules hold");
        let whole = Window::whole(context.search_ops());
        let cuts: Vec<u64> = whole.ops.iter().filter_map(|op| op.ret).collect();
        // A history with no answer has no prefix to cut (not a reject: at
        // a few hundred thousand cases rejects pass proptest's limit).
        if cuts.is_empty() {
            return Ok(());
        }
        let prefix = whole.prefix(cuts[cut.index(cuts.len())]);
        for first in 0..prefix.ops.len() {
            let window = prefix.suffix(first);
            let result = window.search(&context.claims, 1_000_000);
            prop_assert!(!matches!(result, SearchResult::NotLinearizable(_)), "{:?}", window);
        }
    }

    #[test]
    fn an_impossible_answer_is_flagged(
        steps in proptest::collection::vec(step_strategy(4, 2), 1..80),
        mutation in 0..4u8,
        choice in any::<usize>(),
    ) {
        let mut planned = execute(&steps);
        let (history, ids) = record(&planned);
        let Some((number, outcome)) = illegal_mutation(&history, &ids, mutation, choice) else {
            return Ok(());
        };
        let PlannedEnd::Answer { time, .. } = planned[number].end else {
            unreachable!("only answers are mutated");
        };
        planned[number].end = PlannedEnd::Answer { outcome, time };
        let (mutated, _) = record(&planned);
        let result = check(&mutated);
        let Err(CheckError::Violation(violation)) = result else {
            return Err(TestCaseError::fail(format!(
                "mutation {mutation} of {} not flagged: {result:?}",
                history.record(ids[number])
            )));
        };
        // The excerpt alone shows the violation.
        prop_assert!(
            matches!(check(&replay(&violation.excerpt)), Err(CheckError::Violation(_))),
            "{}\nWHOLE:\n{}",
            violation, mutated.records().iter().filter(|r| r.op.key() == &violation.key).map(|r| format!("{r}\n")).collect::<String>()
        );
    }
}

/// A history of just the excerpt's operations, in their event order.
fn replay(excerpt: &Excerpt) -> History {
    let mut events: Vec<(u64, &Record)> = Vec::new();
    for record in &excerpt.records {
        events.push((record.invoke_seq, record));
        if let Some((_, seq)) = record.answer() {
            events.push((seq, record));
        }
    }
    events.sort_by_key(|(seq, _)| *seq);
    let mut history = History::new();
    let mut ids = BTreeMap::new();
    for (seq, record) in events {
        match &record.end {
            End::Answered { outcome, time, .. } if seq != record.invoke_seq => {
                history.complete(ids[&record.id], outcome.clone(), *time);
            }
            _ => {
                ids.insert(
                    record.id,
                    history.invoke(record.client, record.op.clone(), record.invoke_time),
                );
            }
        }
    }
    history
}

/// A fixed pseudo-random walk, for histories too long for proptest.
fn long_steps(count: usize, clients: u64, seed: u64) -> Vec<Step> {
    let mut state = seed;
    let mut next = move || {
        // xorshift64
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..count)
        .map(|_| {
            let kind = match next() % 10 {
                0..=2 => Kind::Put,
                3 | 4 => Kind::Cas {
                    hit: next() % 2 == 0,
                },
                5 => Kind::Delete {
                    expected: [None, Some(true), Some(false)][(next() % 3) as usize],
                },
                6 | 7 => Kind::Get(Consistency::Linearizable),
                8 => Kind::Get(Consistency::Lease),
                _ => Kind::Get(Consistency::Stale),
            };
            let fate = match next() % 40 {
                0 => Fate::LostApplied,
                1 => Fate::LostNotApplied,
                2 => Fate::Failed,
                _ => Fate::Answered,
            };
            Step {
                client: next() % clients,
                key: 0,
                kind,
                fate,
                // Up to ten operations in flight at once.
                lead: next() % 50,
                lag: next() % 50,
                pick: next(),
            }
        })
        .collect()
}

#[test]
fn a_long_history_of_ten_clients_on_one_key_passes() {
    let (history, _) = record(&execute(&long_steps(3_000, 10, 0x5eed)));
    assert_eq!(check(&history), Ok(()));
}

#[test]
fn a_violation_late_in_a_long_history_gets_a_short_excerpt() {
    let mut planned = execute(&long_steps(3_000, 10, 0xbad));
    let (history, ids) = record(&planned);
    // The last linearizable read returns the value of the first
    // acknowledged write, long overwritten.
    let answer = |number: usize| {
        history
            .record(ids[number])
            .answer()
            .map(|(outcome, _)| outcome.clone())
    };
    let first_write = (0..ids.len())
        .find(|&number| matches!(answer(number), Some(Outcome::Written { .. })))
        .expect("a write");
    let read = (0..ids.len())
        .rev()
        .find(|&number| {
            matches!(
                history.record(ids[number]).op,
                Op::Get {
                    consistency: Consistency::Linearizable,
                    ..
                }
            ) && matches!(
                answer(number),
                Some(Outcome::Found { .. } | Outcome::NotFound)
            )
        })
        .expect("a read");
    let Some(Outcome::Written { version }) = answer(first_write) else {
        unreachable!("found above");
    };
    let value = history
        .record(ids[first_write])
        .op
        .written_value()
        .expect("a write")
        .clone();
    let PlannedEnd::Answer { time, .. } = planned[read].end else {
        unreachable!("answered");
    };
    planned[read].end = PlannedEnd::Answer {
        outcome: Outcome::Found { value, version },
        time,
    };
    let (mutated, ids) = record(&planned);
    let Err(CheckError::Violation(violation)) = check(&mutated) else {
        panic!("expected a violation, got {:?}", check(&mutated));
    };
    assert!(
        matches!(violation.reason, Reason::NotLinearizable { .. }),
        "{violation}"
    );
    assert!(
        violation
            .excerpt
            .records
            .iter()
            .any(|record| record.id == ids[read]),
        "{violation}"
    );
    assert!(violation.excerpt.records.len() <= 8, "{violation}");
    assert!(
        matches!(
            check(&replay(&violation.excerpt)),
            Err(CheckError::Violation(_))
        ),
        "{violation}"
    );
}
