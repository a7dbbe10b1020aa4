//! The rule for stale reads.

use std::collections::BTreeMap;

use super::{KeyContext, Reason, Violation};
use crate::sim::history::{ClientId, Consistency, End, Op, Outcome, Record};

/// The rule for stale reads, which are not linearizable by design.
///
/// A stale read returns the key as some replica had it after applying some
/// prefix of the log. The store promises (issue 12) that one client's stale
/// reads of a key never go back to an older prefix. Versions are only known
/// to grow between deletes, so the rule flags a later read (by real time)
/// that returns an older version, or nothing, than an earlier read of the
/// same client found, unless some delete could sit between the two in the
/// log: a delete that removed something or went unanswered, invoked before
/// the later read finished, and not finished before the earlier read's value
/// was written. This never flags a correct store: between the two states the
/// version can only drop through such a delete. A NotFound read constrains
/// nothing after it (absent is also the oldest state). The static checks
/// already refuse values that were never written or come from the future.
pub(super) fn stale_reads_of_key(context: &KeyContext) -> Result<(), Violation> {
    // Deletes that may have removed the key: (invoked, answered or never).
    let removals: Vec<(u64, u64)> = context
        .records
        .iter()
        .filter(|record| matches!(record.op, Op::Delete { .. }))
        .filter_map(|record| match &record.end {
            End::Answered {
                outcome: Outcome::Deleted { found: true },
                seq,
                ..
            } => Some((record.invoke_seq, *seq)),
            End::Answered { .. } => None,
            End::Pending | End::GaveUp { .. } => Some((record.invoke_seq, u64::MAX)),
        })
        .collect();
    let mut reads_by_client: BTreeMap<ClientId, Vec<&Record>> = BTreeMap::new();
    for record in &context.records {
        let stale = matches!(
            record.op,
            Op::Get {
                consistency: Consistency::Stale,
                ..
            }
        );
        if stale
            && matches!(
                record.answer(),
                Some((Outcome::Found { .. } | Outcome::NotFound, _))
            )
        {
            reads_by_client
                .entry(record.client)
                .or_default()
                .push(record);
        }
    }
    for (client, reads) in reads_by_client {
        let mut by_answer = reads.clone();
        by_answer.sort_by_key(|read| read.answer().map(|(_, seq)| seq));
        let mut answered = by_answer.iter().peekable();
        // The earlier read with the highest version, among those answered
        // before the current read was invoked.
        let mut newest: Option<(u64, &Record)> = None;
        for read in &reads {
            while let Some(earlier) = answered.next_if(|earlier| earlier.precedes(read)) {
                if let Some((Outcome::Found { version, .. }, _)) = earlier.answer() {
                    if newest.is_none_or(|(best, _)| *version > best) {
                        newest = Some((*version, earlier));
                    }
                }
            }
            let Some((newest_version, earlier)) = newest else {
                continue;
            };
            let (went_back, answered_seq) = match read.answer() {
                Some((Outcome::Found { version, .. }, seq)) => (*version < newest_version, seq),
                Some((_, seq)) => (true, seq),
                None => unreachable!("only answered reads are collected"),
            };
            if !went_back {
                continue;
            }
            let Some((Outcome::Found { value, .. }, _)) = earlier.answer() else {
                unreachable!("newest holds found reads only");
            };
            let earlier_write = context.writer_of[value];
            let written_at = context.history.record(earlier_write).invoke_seq;
            let explained = removals
                .iter()
                .any(|&(invoked, finished)| invoked < answered_seq && finished > written_at);
            if !explained {
                let mut ops = vec![earlier_write, earlier.id, read.id];
                if let Some((Outcome::Found { value, .. }, _)) = read.answer() {
                    ops.push(context.writer_of[value]);
                }
                let reason = Reason::StaleReadWentBack {
                    client,
                    earlier: earlier.id,
                    later: read.id,
                };
                return Err(context.violation(reason, ops));
            }
        }
    }
    Ok(())
}
