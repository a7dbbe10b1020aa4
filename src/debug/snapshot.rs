//! `corekv debug snapshot FILE`: a snapshot file's metadata and counts, and
//! with `--keys` every pair, read in one pass without keeping the state
//! (a snapshot can be as large as the node's data).

use std::path::PathBuf;

use clap::Args;
use corekv_node::sessions::Session;
use corekv_node::snapshot::{self, SnapshotError, SnapshotMeta, Visitor};
use serde_json::json;

use super::{entry, escape, Out, Verdict};

/// `corekv debug snapshot`.
#[derive(Args, Debug)]
pub struct SnapshotArgs {
    /// A snapshot file (DATA_DIR/shard-NNN/snap/INDEX-TERM.snap).
    file: PathBuf,
    /// Also print every key (escaped where not printable), the size of its
    /// value and its version.
    #[arg(long)]
    keys: bool,
}

pub(super) fn run(args: &SnapshotArgs, out: &mut Out) -> anyhow::Result<Verdict> {
    let name = args.file.display().to_string();
    let file_bytes = std::fs::metadata(&args.file)
        .map_err(|e| anyhow::anyhow!("cannot read snapshot {name}: {e}"))?
        .len();
    let mut reader = Reader {
        out,
        name: &name,
        keys: args.keys,
        file_bytes,
        counts: Counts::default(),
        failed: None,
    };
    let result = snapshot::visit(&args.file, &mut reader);
    if let Some(e) = reader.failed.take() {
        return Err(e);
    }
    let counts = reader.counts.clone();
    match result {
        Ok(meta) => {
            print_summary(out, &name, file_bytes, &meta, &counts)?;
            Ok(Verdict::Clean)
        }
        Err(SnapshotError::Corrupt { offset, reason, .. }) => {
            let message = corrupt_message(&args.file, offset, &reason);
            let value =
                json!({ "kind": "corrupt", "file": name, "offset": offset, "reason": reason });
            out.corrupt(value, &message)?;
            Ok(Verdict::Corrupt)
        }
        Err(e @ SnapshotError::Io { .. }) => Err(e.into()),
    }
}

/// The node's own wording of the error.
fn corrupt_message(file: &std::path::Path, offset: u64, reason: &str) -> String {
    SnapshotError::Corrupt {
        path: file.to_path_buf(),
        offset,
        reason: reason.to_string(),
    }
    .to_string()
}

#[derive(Clone, Debug, Default)]
struct Counts {
    format_version: u32,
    pairs: u64,
    key_bytes: u64,
    value_bytes: u64,
    sessions: u64,
    session_results: u64,
    session_bytes: u64,
}

/// Prints as the decoder reads: the header at once, keys as they come.
struct Reader<'a> {
    out: &'a mut Out,
    name: &'a str,
    keys: bool,
    file_bytes: u64,
    counts: Counts,
    /// A failed write to stdout: the visitor cannot return it, so it is kept
    /// for after the read.
    failed: Option<anyhow::Error>,
}

impl Reader<'_> {
    fn keep(&mut self, result: anyhow::Result<()>) {
        if let (Err(e), None) = (result, &self.failed) {
            self.failed = Some(e);
        }
    }
}

impl Visitor for Reader<'_> {
    fn header(&mut self, meta: &SnapshotMeta, format_version: u32, pairs: u64) {
        self.counts.format_version = format_version;
        let value = json!({
            "kind": "header",
            "file": self.name,
            "file_bytes": self.file_bytes,
            "format_version": format_version,
            "shard": meta.shard,
            "index": meta.index,
            "term": meta.term,
            "pairs": pairs,
        });
        let result = self.out.line(value, || {
            format!(
                "snapshot {} ({} bytes): format {format_version}, shard {}, index {}, term {}, {pairs} pairs",
                self.name, self.file_bytes, meta.shard, meta.index, meta.term
            )
        });
        self.keep(result);
    }

    fn pair(&mut self, key: &[u8], value: Vec<u8>, version: u64) {
        self.counts.pairs += 1;
        self.counts.key_bytes += key.len() as u64;
        self.counts.value_bytes += value.len() as u64;
        if self.keys && self.failed.is_none() {
            let key = escape(key);
            let line = json!({ "kind": "pair", "key": key, "value_bytes": value.len(), "version": version });
            let result = self.out.line(line, || {
                format!(
                    "key \"{key}\" value_bytes={} version={version}",
                    value.len()
                )
            });
            self.keep(result);
        }
    }

    fn session(&mut self, _: u64, session: Session, bytes: u64) {
        self.counts.sessions += 1;
        self.counts.session_results += session.results().len() as u64;
        self.counts.session_bytes += bytes;
    }
}

fn print_summary(
    out: &mut Out,
    name: &str,
    file_bytes: u64,
    meta: &SnapshotMeta,
    counts: &Counts,
) -> anyhow::Result<()> {
    let m = &meta.membership;
    let value = json!({
        "kind": "snapshot",
        "file": name,
        "file_bytes": file_bytes,
        "format_version": counts.format_version,
        "shard": meta.shard,
        "index": meta.index,
        "term": meta.term,
        "membership": {
            "voters": m.voters,
            "learners": m.learners,
            "voters_outgoing": m.voters_outgoing,
            "learners_next": m.learners_next,
            "auto_leave": m.auto_leave,
            "members": m.members.iter().map(entry::member_json).collect::<Vec<_>>(),
            "removed": m.removed,
        },
        "pairs": counts.pairs,
        "key_bytes": counts.key_bytes,
        "value_bytes": counts.value_bytes,
        "sessions": counts.sessions,
        "session_results": counts.session_results,
        "session_bytes": counts.session_bytes,
        "checksum": "ok",
    });
    out.line(value, || {
        let mut lines = vec![format!(
            "voters {:?} learners {:?} removed {:?}",
            m.voters, m.learners, m.removed
        )];
        if !m.voters_outgoing.is_empty() {
            lines.push(format!(
                "joint: outgoing voters {:?}, learners next {:?}, auto leave {}",
                m.voters_outgoing, m.learners_next, m.auto_leave
            ));
        }
        for member in &m.members {
            lines.push(format!("member {}", entry::member_text(member)));
        }
        lines.push(format!(
            "pairs {} (keys {} bytes, values {} bytes)",
            counts.pairs, counts.key_bytes, counts.value_bytes
        ));
        lines.push(format!(
            "sessions {} (results {}, {} bytes)",
            counts.sessions, counts.session_results, counts.session_bytes
        ));
        lines.push("checksum ok".into());
        lines.join("\n")
    })
}
