//! `corekv debug wal DIR`: every record of a stopped shard's WAL.
//!
//! A bad record means what it means to recovery (wal/src/recovery.rs): in
//! the newest segment with a valid header it is a torn tail, records that
//! were being written when the node died and were never acknowledged
//! (reported, not an error); anywhere else it is corruption. Segments after
//! the newest valid one whose header was never written are leftovers that
//! recovery removes. What recovery checks across records (the log's
//! indexes being contiguous with the snapshot marker) is not checked here.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Args;
use corekv_node::data_dir;
use corekv_wal::inspect::{self, BadRecord, Content, Header, Record, Records};
use corekv_wal::WalError;
use serde_json::{json, Value};

use super::{entry, Out, Verdict};

/// `corekv debug wal`.
#[derive(Args, Debug)]
pub struct WalArgs {
    /// A shard's WAL directory (DATA_DIR/shard-NNN/wal); a shard directory
    /// or a data directory reads the WAL of every shard under it.
    dir: PathBuf,
    /// Only counts: per segment and in total.
    #[arg(long)]
    summary: bool,
    /// Read on past a bad record: scan forward to the next 8-byte aligned
    /// record whose length and checksum check out, and say how many bytes
    /// were skipped. The exit code stays 1.
    #[arg(long)]
    skip_corrupt: bool,
}

pub(super) fn run(args: &WalArgs, out: &mut Out) -> anyhow::Result<Verdict> {
    let mut verdict = Verdict::Clean;
    for (shard, dir) in wal_dirs(&args.dir)? {
        out.line(
            json!({ "kind": "wal_dir", "path": dir.display().to_string(), "shard": shard }),
            || match shard {
                Some(shard) => format!("shard {shard}: WAL {}", dir.display()),
                None => format!("WAL {}", dir.display()),
            },
        )?;
        if read_dir(&dir, args, out)? == Verdict::Corrupt {
            verdict = Verdict::Corrupt;
        }
    }
    Ok(verdict)
}

/// The WAL directories `dir` names, with their shard where the path says it.
fn wal_dirs(dir: &Path) -> anyhow::Result<Vec<(Option<u32>, PathBuf)>> {
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let segments = segment_files(dir)?;
    if !segments.is_empty() || name == "wal" {
        let shard = dir
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .and_then(data_dir::parse_shard_dir_name);
        return Ok(vec![(shard, dir.to_path_buf())]);
    }
    if let Some(shard) = data_dir::parse_shard_dir_name(name) {
        let parent = dir.parent().unwrap_or(Path::new(""));
        return Ok(vec![(Some(shard), data_dir::wal_dir(parent, shard))]);
    }
    let shards =
        data_dir::shard_dirs(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    if shards.is_empty() {
        anyhow::bail!(
            "{} holds no WAL segments and no shard-NNN directories: \
             give a WAL directory (DATA_DIR/shard-NNN/wal), a shard directory or a data directory",
            dir.display()
        );
    }
    let names: Vec<String> = shards
        .iter()
        .map(|(_, path)| {
            path.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    eprintln!(
        "{}: found shard directories {}",
        dir.display(),
        names.join(", ")
    );
    Ok(shards
        .into_iter()
        .map(|(shard, _)| (Some(shard), data_dir::wal_dir(dir, shard)))
        .collect())
}

/// Counts over one segment or a whole directory.
#[derive(Clone, Debug, Default)]
struct Counts {
    segments: u64,
    records: u64,
    entries: u64,
    first_index: Option<u64>,
    last_index: Option<u64>,
    /// Bytes of the records, headers and padding included.
    bytes: u64,
    corrupt: u64,
    skipped_bytes: u64,
    /// Where a torn tail starts, as `file:offset`.
    torn_tail: Option<String>,
}

impl Counts {
    fn add_record(&mut self, record: &Record<'_>) {
        self.records += 1;
        self.bytes += record.len;
        if let Content::Entries(entries) = &record.content {
            self.entries += entries.len() as u64;
            for entry in entries {
                self.first_index =
                    Some(self.first_index.map_or(entry.index, |i| i.min(entry.index)));
                self.last_index = Some(entry.index);
            }
        }
    }

    fn add(&mut self, other: &Counts) {
        self.segments += other.segments;
        self.records += other.records;
        self.entries += other.entries;
        self.first_index = match (self.first_index, other.first_index) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last_index = other.last_index.or(self.last_index);
        self.bytes += other.bytes;
        self.corrupt += other.corrupt;
        self.skipped_bytes += other.skipped_bytes;
        if other.torn_tail.is_some() {
            self.torn_tail.clone_from(&other.torn_tail);
        }
    }

    fn json(&self, kind: &str, segment: Option<&str>) -> Value {
        json!({
            "kind": kind,
            "segment": segment,
            "segments": self.segments,
            "records": self.records,
            "entries": self.entries,
            "first_index": self.first_index,
            "last_index": self.last_index,
            "bytes": self.bytes,
            "corrupt": self.corrupt,
            "skipped_bytes": self.skipped_bytes,
            "torn_tail": self.torn_tail,
        })
    }

    fn text(&self) -> String {
        let index = match (self.first_index, self.last_index) {
            (Some(first), Some(last)) => format!("{first}..{last}"),
            _ => "-".into(),
        };
        let mut text = format!(
            "records={} entries={} index={index} bytes={} torn_tail={}",
            self.records,
            self.entries,
            self.bytes,
            self.torn_tail.as_deref().unwrap_or("none")
        );
        if self.corrupt > 0 {
            text.push_str(&format!(
                " corrupt={} skipped_bytes={}",
                self.corrupt, self.skipped_bytes
            ));
        }
        text
    }
}

/// One segment file being read.
struct Segment<'a> {
    name: String,
    path: &'a Path,
    bytes: Vec<u8>,
    /// Whether it is the newest segment with a valid header, where a bad
    /// record is a torn tail.
    newest: bool,
}

/// Where reading a directory stands after a segment.
#[derive(PartialEq, Eq)]
enum Next {
    Continue,
    /// Corruption without --skip-corrupt: the rest is not read, as the
    /// node would not read it.
    Stop,
}

/// The segment files of `dir`, oldest first.
fn segment_files(dir: &Path) -> anyhow::Result<Vec<(u64, PathBuf)>> {
    Ok(inspect::segment_files(dir)?)
}

fn read_dir(dir: &Path, args: &WalArgs, out: &mut Out) -> anyhow::Result<Verdict> {
    let files = segment_files(dir)?;
    // Which segment is the newest valid one decides what a bad record in it
    // means, so every header is looked at before any record.
    let mut headers = Vec::with_capacity(files.len());
    for (_, path) in &files {
        headers.push(inspect::header(&read_prefix(
            path,
            inspect::FIRST_RECORD_OFFSET,
        )?));
    }
    let newest = headers
        .iter()
        .rposition(|h| matches!(h, Header::Valid { .. }));
    let mut total = Counts::default();
    let mut checks = HeaderChecks::default();
    for (position, ((sequence, path), header)) in files.iter().zip(&headers).enumerate() {
        let segment = Segment {
            name: path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
            path,
            bytes: std::fs::read(path)
                .with_context(|| format!("cannot read {}", path.display()))?,
            newest: Some(position) == newest,
        };
        let later_valid = newest
            .filter(|&n| n > position)
            .map(|n| files[n].1.as_path());
        let mut counts = Counts {
            segments: 1,
            ..Default::default()
        };
        let problem = checks.check(*sequence, header, later_valid);
        let next = read_segment(&segment, header, problem, args, out, &mut counts)?;
        if args.summary && header != &Header::NeverWritten {
            out.line(counts.json("segment_summary", Some(&segment.name)), || {
                format!("{} {}", segment.name, counts.text())
            })?;
        }
        total.add(&counts);
        if next == Next::Stop {
            break;
        }
    }
    if args.summary {
        out.line(total.json("total", None), || {
            format!("total segments={} {}", total.segments, total.text())
        })?;
    }
    Ok(if total.corrupt > 0 {
        Verdict::Corrupt
    } else {
        Verdict::Clean
    })
}

/// What recovery checks across segment headers: sequences that match the
/// file names and follow each other, one shard, no never-written header
/// before a valid one.
#[derive(Default)]
struct HeaderChecks {
    shard: Option<u32>,
    previous: Option<u64>,
}

impl HeaderChecks {
    /// The reason a header is corrupt, if it is.
    fn check(
        &mut self,
        sequence: u64,
        header: &Header,
        later_valid: Option<&Path>,
    ) -> Option<String> {
        match header {
            Header::Invalid(reason) => Some(reason.clone()),
            Header::NeverWritten => later_valid.map(|later| {
                format!(
                    "header was never written, yet the later segment {} is valid: segments are missing data",
                    later.display()
                )
            }),
            Header::Valid {
                shard_id,
                sequence: in_header,
            } => {
                let shard = *self.shard.get_or_insert(*shard_id);
                let previous = self.previous.replace(sequence);
                if *in_header != sequence {
                    return Some(format!(
                        "header sequence {in_header} does not match the file name"
                    ));
                }
                if *shard_id != shard {
                    return Some(format!(
                        "segment belongs to shard {shard_id}, but the segments before it to shard {shard}"
                    ));
                }
                let gap = previous.filter(|&p| p + 1 != sequence);
                gap.map(|previous| {
                    format!(
                        "segment sequence jumps from {previous} to {sequence}: segments are missing"
                    )
                })
            }
        }
    }
}

fn read_segment(
    segment: &Segment<'_>,
    header: &Header,
    problem: Option<String>,
    args: &WalArgs,
    out: &mut Out,
    counts: &mut Counts,
) -> anyhow::Result<Next> {
    let file_bytes = segment.bytes.len();
    if let Some(reason) = problem {
        let bad = BadRecord { offset: 0, reason };
        corrupt(segment, &bad, out, counts)?;
        if !args.skip_corrupt {
            return Ok(Next::Stop);
        }
    }
    match header {
        Header::NeverWritten => {
            let value = json!({ "kind": "unsynced_segment", "segment": segment.name, "file_bytes": file_bytes });
            out.line(value, || {
                format!(
                    "{}: header never written: prepared ahead or never synced, recovery removes it",
                    segment.name
                )
            })?;
            return Ok(Next::Continue);
        }
        Header::Valid { shard_id, sequence } if !args.summary => {
            let value = json!({
                "kind": "segment",
                "segment": segment.name,
                "shard": shard_id,
                "sequence": sequence,
                "file_bytes": file_bytes,
            });
            out.line(value, || {
                format!(
                    "{}: shard {shard_id}, sequence {sequence}, {file_bytes} bytes",
                    segment.name
                )
            })?;
        }
        Header::Valid { .. } | Header::Invalid(_) => {}
    }
    let mut records = Records::new(&segment.bytes);
    loop {
        match records.next() {
            None => {
                let Some(offset) = records.unsealed_end().filter(|_| !segment.newest) else {
                    return Ok(Next::Continue);
                };
                let reason = format!(
                    "the records end at offset {offset} without the seal record that closes a segment the log moved on from"
                );
                corrupt(segment, &BadRecord { offset, reason }, out, counts)?;
                return Ok(if args.skip_corrupt {
                    Next::Continue
                } else {
                    Next::Stop
                });
            }
            Some(Ok(record)) => {
                counts.add_record(&record);
                if !args.summary {
                    print_record(&segment.name, &record, out)?;
                }
            }
            Some(Err(bad)) if segment.newest => {
                let offset = records.offset();
                let value = json!({
                    "kind": "torn_tail",
                    "segment": segment.name,
                    "offset": offset,
                    "reason": bad.reason,
                });
                out.line(value, || {
                    format!(
                        "{}:{offset} torn tail: {} (never acknowledged; recovery cuts it here)",
                        segment.name, bad.reason
                    )
                })?;
                counts.torn_tail = Some(format!("{}:{offset}", segment.name));
                return Ok(Next::Continue);
            }
            Some(Err(bad)) => {
                corrupt(segment, &bad, out, counts)?;
                if !args.skip_corrupt {
                    return Ok(Next::Stop);
                }
                skip(segment, &bad, &mut records, out, counts)?;
            }
        }
    }
}

/// Reports corruption like the node does, naming file and offset.
fn corrupt(
    segment: &Segment<'_>,
    bad: &BadRecord,
    out: &mut Out,
    counts: &mut Counts,
) -> anyhow::Result<()> {
    counts.corrupt += 1;
    let error = WalError::Corrupt {
        segment: segment.path.to_path_buf(),
        offset: bad.offset,
        reason: bad.reason.clone(),
    };
    let value = json!({
        "kind": "corrupt",
        "segment": segment.name,
        "offset": bad.offset,
        "reason": bad.reason,
    });
    out.corrupt(value, &error.to_string())
}

/// Moves `records` past a bad record to the next good one, saying how many
/// bytes that skips.
fn skip(
    segment: &Segment<'_>,
    bad: &BadRecord,
    records: &mut Records<'_>,
    out: &mut Out,
    counts: &mut Counts,
) -> anyhow::Result<()> {
    let resumed_at = records.resync();
    // Without a good record after it, everything up to the last non-zero
    // byte is what could not be read.
    let end = resumed_at.unwrap_or_else(|| {
        let data_end = segment
            .bytes
            .iter()
            .rposition(|&b| b != 0)
            .map_or(0, |i| i + 1);
        (data_end as u64).max(bad.offset)
    });
    let skipped = end - bad.offset;
    counts.skipped_bytes += skipped;
    let value = json!({
        "kind": "skipped",
        "segment": segment.name,
        "offset": bad.offset,
        "bytes": skipped,
        "resumed_at": resumed_at,
    });
    out.line(value, || match resumed_at {
        Some(next) => format!(
            "{}:{} skipped {skipped} bytes to the next good record at offset {next}",
            segment.name, bad.offset
        ),
        None => format!(
            "{}:{} skipped {skipped} bytes: no good record after it",
            segment.name, bad.offset
        ),
    })
}

fn print_record(name: &str, record: &Record<'_>, out: &mut Out) -> anyhow::Result<()> {
    let offset = record.offset;
    match &record.content {
        Content::Entries(entries) => {
            for e in entries {
                let (fields, text) = entry::describe(e);
                let mut value = json!({
                    "kind": "entry",
                    "segment": name,
                    "offset": offset,
                    "index": e.index,
                    "term": e.term,
                    "data_bytes": e.data.len(),
                });
                if let Value::Object(map) = &mut value {
                    map.extend(fields);
                }
                out.line(value, || {
                    format!("{name}:{offset} entry index={} term={} {text}", e.index, e.term)
                })?;
            }
            Ok(())
        }
        Content::HardState(hs) => out.line(
            json!({ "kind": "hard_state", "segment": name, "offset": offset, "term": hs.term, "vote": hs.vote, "commit": hs.commit }),
            || format!("{name}:{offset} hard-state term={} vote={} commit={}", hs.term, hs.vote, hs.commit),
        ),
        Content::ConfState(cs) => out.line(
            json!({ "kind": "conf_state", "segment": name, "offset": offset, "voters": cs.voters, "learners": cs.learners }),
            || format!("{name}:{offset} conf-state voters={:?} learners={:?}", cs.voters, cs.learners),
        ),
        Content::SnapshotMarker { marker, discard_log } => out.line(
            json!({
                "kind": "snapshot_marker",
                "segment": name,
                "offset": offset,
                "index": marker.index,
                "term": marker.term,
                "discard_log": discard_log,
            }),
            || {
                format!(
                    "{name}:{offset} snapshot-marker index={} term={} discard_log={discard_log}",
                    marker.index, marker.term
                )
            },
        ),
        Content::Seal => out.line(
            json!({ "kind": "seal", "segment": name, "offset": offset }),
            || format!("{name}:{offset} seal"),
        ),
    }
}

/// The first `len` bytes of a file (fewer if it is shorter).
fn read_prefix(path: &Path, len: u64) -> anyhow::Result<Vec<u8>> {
    use std::io::Read as _;
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(len)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(bytes)
}
