//! Read-only inspection of segment files, for tools that look at a stopped
//! shard's log (`corekv debug wal`).
//!
//! [`Wal::open`](crate::Wal::open) repairs as it reads: it takes the lock,
//! removes segments that were never synced and zeroes a torn tail. A tool
//! that is asked why a log refuses to open must see the files as they are,
//! so nothing here writes, locks or maps a file writable: callers hand in a
//! segment's bytes (read with a read-only open) and get its records back,
//! decoded by the same functions recovery uses (`format`), so the layout
//! stays written down once.
//!
//! What a bad record means is the caller's to decide, by the rule recovery
//! follows (see the `recovery` module): in the newest segment with a valid
//! header it is a torn tail, anywhere else corruption.

use std::path::{Path, PathBuf};

use crate::error::WalError;
use crate::format::{self, HeaderProblem, ReadRecord, HEADER_LEN, RECORD_ALIGN};
use crate::types::{ConfState, EntryRef, HardState, SnapshotMarker};

/// Offset of the first record of every segment (the header's length).
pub const FIRST_RECORD_OFFSET: u64 = HEADER_LEN as u64;

/// The segment files of a WAL directory, oldest first, as (sequence, path).
/// Other files (the lock file, strays) are left out.
pub fn segment_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, WalError> {
    crate::segment::files_named(dir, format::parse_segment_file_name)
}

/// The sequence number a segment's file name carries, or None for a file
/// that is not named like a segment.
pub fn segment_sequence(file_name: &str) -> Option<u64> {
    format::parse_segment_file_name(file_name)
}

/// What a segment's header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Header {
    /// A valid header.
    Valid {
        /// The shard the segment belongs to.
        shard_id: u32,
        /// Its sequence number (recovery requires it to match the file name).
        sequence: u64,
    },
    /// All zeros, or the file is shorter than a header: the segment was
    /// created but never synced (recovery removes it when it comes after
    /// the newest valid segment, and calls it corruption before one).
    NeverWritten,
    /// Non-zero but wrong: corruption, or not a corekv WAL file.
    Invalid(String),
}

/// Decodes the header at the start of a segment's bytes.
pub fn header(segment: &[u8]) -> Header {
    match format::decode_header(segment) {
        Ok(header) => Header::Valid {
            shard_id: header.shard_id,
            sequence: header.sequence,
        },
        Err(HeaderProblem::NeverWritten) => Header::NeverWritten,
        Err(HeaderProblem::Invalid(reason)) => Header::Invalid(reason),
    }
}

/// One record that passed its checks, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    /// Offset of the record (its length field) in the segment.
    pub offset: u64,
    /// Bytes the record occupies, header and padding included: the next
    /// record starts at `offset + len`.
    pub len: u64,
    /// Bytes of kind and payload (the record's length field).
    pub body_len: u64,
    /// What it holds.
    pub content: Content<'a>,
}

/// What a record holds, by kind (see the `format` module).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content<'a> {
    /// Consecutive entries; their data borrows the segment's bytes.
    Entries(Vec<EntryRef<'a>>),
    /// Raft's hard state.
    HardState(HardState),
    /// Voter and learner ids.
    ConfState(ConfState),
    /// A durable snapshot's point, and whether applying it dropped the log.
    SnapshotMarker {
        /// Index and term the snapshot covers.
        marker: SnapshotMarker,
        /// True if the whole log was dropped (a snapshot from the leader).
        discard_log: bool,
    },
    /// The end of a segment the log moved on from (version 2).
    Seal,
}

/// A record that fails its length, checksum or payload checks, or non-zero
/// bytes after the last record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadRecord {
    /// Offset of the bad record, or of the first stray byte.
    pub offset: u64,
    /// What was expected and what was found.
    pub reason: String,
}

/// The records of one segment, in order, from [`FIRST_RECORD_OFFSET`].
///
/// Yields each record, then stops at the end of the records (a zero length);
/// in a version 1 segment, non-zero bytes after it are yielded as a
/// [`BadRecord`] (a version 2 segment may hold stale bytes there, see the
/// `format` module). After a `BadRecord` it yields nothing more until
/// [`Records::resync`] finds a record further on. The header is read only
/// for the format version and the checksum chain: see [`header`].
#[derive(Clone, Debug)]
pub struct Records<'a> {
    segment: &'a [u8],
    /// Where the next record starts; after a bad record, where it started.
    offset: usize,
    /// The checksum the next record continues (None: version 1).
    chain: Option<u32>,
    /// Where scanning for the next good record begins after a bad one.
    bad_at: Option<usize>,
    /// The last record read was a seal.
    sealed: bool,
    /// After a resync in a chained segment: the record at `offset` is taken
    /// without its crc checked (the chain before it is lost), and the chain
    /// goes on from the crc it carries.
    resumed_unchecked: bool,
    done: bool,
}

impl<'a> Records<'a> {
    /// The records of `segment`, a whole segment file's bytes. Without a
    /// valid header, read as the current version with the sequence the
    /// header bytes name.
    pub fn new(segment: &'a [u8]) -> Records<'a> {
        let chain = match format::decode_header(segment) {
            Ok(header) => header.chain(),
            Err(_) if segment.len() >= HEADER_LEN => Some(format::chain_seed(format::read_u64(
                segment,
                format::HEADER_SEQUENCE_OFFSET,
            ))),
            Err(_) => None,
        };
        Records {
            segment,
            offset: HEADER_LEN,
            chain,
            bad_at: None,
            sealed: false,
            resumed_unchecked: false,
            done: false,
        }
    }

    /// Once the records ended cleanly: where, if the segment is a chained
    /// (version 2) one without its seal record. Recovery calls that
    /// corruption in any segment but the newest (see the `format` module).
    pub fn unsealed_end(&self) -> Option<u64> {
        (self.done && self.bad_at.is_none() && self.chain.is_some() && !self.sealed)
            .then_some(self.offset as u64)
    }

    /// End of the good records read so far: after the iterator ends, where
    /// the records end; after a bad record, its offset (recovery cuts a torn
    /// tail here).
    pub fn offset(&self) -> u64 {
        self.offset as u64
    }

    /// After a [`BadRecord`], scans forward from it, 8-byte aligned, for the
    /// next position holding a record whose length, checksum and payload
    /// check out, and resumes there. Returns that offset, or None if no such
    /// record follows (the iterator then stays ended). In a chained (version
    /// 2) segment the chain is lost at the damage, so a candidate's own crc
    /// cannot be checked: it must decode, and the record after it must
    /// continue its crc (or be the end). A crc32 can match garbage by chance
    /// (about 1 in 4 billion positions), which is why recovery never does
    /// this: it is for reading past damage, not for trusting what lies
    /// beyond it.
    pub fn resync(&mut self) -> Option<u64> {
        let bad_at = self.bad_at.take()?;
        // Version 1: from the bad offset itself, since stray bytes may start
        // with a whole record (one whose length alone was zeroed ends the
        // records early). Version 2: after it, the bad record's own stored
        // crc being no proof of its payload.
        let mut position = bad_at - bad_at % RECORD_ALIGN;
        if self.chain.is_some() {
            position += RECORD_ALIGN;
        }
        while position + format::RECORD_HEADER_LEN <= self.segment.len() {
            if self.resumes_at(position) {
                self.offset = position;
                self.resumed_unchecked = self.chain.is_some();
                self.done = false;
                return Some(position as u64);
            }
            position += RECORD_ALIGN;
        }
        self.done = true;
        None
    }

    /// Whether reading can resume at `position`.
    fn resumes_at(&self, position: usize) -> bool {
        if self.chain.is_none() {
            return matches!(decode_at(self.segment, position, None), Ok(Some(_)));
        }
        let Some((_, next_offset, stored)) = decode_at_unchecked(self.segment, position) else {
            return false;
        };
        matches!(
            format::read_record(self.segment, next_offset, Some(stored)),
            ReadRecord::Record { .. } | ReadRecord::End
        )
    }

    /// Stops after a bad record at `offset`, to be resumed by `resync`.
    fn bad(&mut self, offset: usize, reason: String) -> BadRecord {
        self.done = true;
        self.bad_at = Some(offset);
        BadRecord {
            offset: offset as u64,
            reason,
        }
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Record<'a>, BadRecord>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let read = if std::mem::take(&mut self.resumed_unchecked) {
            decode_at_unchecked(self.segment, self.offset)
                .map(|(record, _, stored)| Some((record, stored)))
                .ok_or_else(|| "the record resync found no longer decodes".to_string())
        } else {
            decode_at(self.segment, self.offset, self.chain)
        };
        match read {
            Ok(Some((record, crc))) => {
                self.offset += record.len as usize;
                self.sealed = record.content == Content::Seal;
                if self.chain.is_some() {
                    self.chain = Some(crc);
                }
                Some(Ok(record))
            }
            Ok(None) if self.chain.is_some() => {
                self.done = true;
                None
            }
            Ok(None) => {
                let end = self.offset.min(self.segment.len());
                let Some((first_stray, _)) = crate::recovery::nonzero_span(&self.segment[end..])
                else {
                    self.done = true;
                    return None;
                };
                let reason =
                    format!("non-zero bytes after the last record, which ends at offset {end}");
                Some(Err(self.bad(end + first_stray, reason)))
            }
            Err(reason) => Some(Err(self.bad(self.offset, reason))),
        }
    }
}

/// The record at `offset` and its crc: Some if it checks out (its crc
/// continuing `chain`), None at the end of the records, Err with the reason if
/// it is bad.
fn decode_at(
    segment: &[u8],
    offset: usize,
    chain: Option<u32>,
) -> Result<Option<(Record<'_>, u32)>, String> {
    let (crc, kind, payload, next_offset) = match format::read_record(segment, offset, chain) {
        ReadRecord::End => return Ok(None),
        ReadRecord::Invalid(reason) => return Err(reason),
        ReadRecord::Record {
            crc,
            kind,
            payload,
            next_offset,
            ..
        } => (crc, kind, payload, next_offset),
    };
    Ok(Some((
        decode_body(offset, kind, payload, next_offset)?,
        crc,
    )))
}

/// The record at `offset` if its length and payload check out (its crc is
/// not checked), where the next one starts, and the crc it carries.
fn decode_at_unchecked(segment: &[u8], offset: usize) -> Option<(Record<'_>, usize, u32)> {
    let header = segment.get(offset..offset + format::RECORD_HEADER_LEN)?;
    let body_len = format::read_u32(header, 0) as usize;
    let stored = format::read_u32(header, 4);
    let start = offset + format::RECORD_HEADER_LEN;
    let body = segment.get(start..start.checked_add(body_len)?)?;
    let (&kind, payload) = body.split_first()?;
    let next_offset = offset + format::record_len(body_len);
    let record = decode_body(offset, kind, payload, next_offset).ok()?;
    Some((record, next_offset, stored))
}

fn decode_body(
    offset: usize,
    kind: u8,
    payload: &[u8],
    next_offset: usize,
) -> Result<Record<'_>, String> {
    let content = match kind {
        format::KIND_ENTRIES => {
            let mut entries = Vec::new();
            format::decode_entries(payload, |layout| {
                entries.push(EntryRef {
                    index: layout.index,
                    term: layout.term,
                    entry_type: layout.entry_type,
                    data: &payload[layout.data_offset..layout.data_offset + layout.data_len],
                })
            })?;
            Content::Entries(entries)
        }
        format::KIND_HARD_STATE => Content::HardState(format::decode_hard_state(payload)?),
        format::KIND_CONF_STATE => Content::ConfState(format::decode_conf_state(payload)?),
        format::KIND_SNAPSHOT_MARKER => {
            let (marker, discard_log) = format::decode_snapshot_marker(payload)?;
            Content::SnapshotMarker {
                marker,
                discard_log,
            }
        }
        format::KIND_SEAL if payload.is_empty() => Content::Seal,
        format::KIND_SEAL => {
            return Err(format!(
                "seal record expected an empty payload but got {} bytes",
                payload.len()
            ))
        }
        other => return Err(format!("unknown record kind {other}")),
    };
    Ok(Record {
        offset: offset as u64,
        len: (next_offset - offset) as u64,
        body_len: (format::KIND_LEN + payload.len()) as u64,
        content,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::WalOptions;
    use crate::wal::Wal;

    const SEGMENT_BYTES: u64 = 4096;

    /// A synced WAL of `count` entries of 100 bytes (about 35 per segment);
    /// returns its segment files with a valid header, oldest first (the
    /// one prepared ahead has none yet).
    fn write_log(dir: &Path, count: u64) -> Vec<PathBuf> {
        let options = WalOptions {
            segment_bytes: SEGMENT_BYTES,
            shard_id: 3,
            recycle_bytes: crate::types::DEFAULT_RECYCLE_BYTES,
        };
        let mut wal = Wal::open(dir, options).unwrap();
        wal.set_hard_state(HardState {
            term: 2,
            vote: 1,
            commit: 5,
        })
        .unwrap();
        wal.set_conf_state(&ConfState {
            voters: vec![1, 2, 3],
            learners: vec![4],
        })
        .unwrap();
        let data = [7u8; 100];
        for index in 1..=count {
            let entry = EntryRef {
                index,
                term: 2,
                entry_type: 0,
                data: &data,
            };
            wal.append_entries_waiting(&[entry]).unwrap();
        }
        wal.sync().unwrap();
        drop(wal);
        segment_files(dir)
            .unwrap()
            .into_iter()
            .map(|(_, path)| path)
            .filter(|path| matches!(header(&std::fs::read(path).unwrap()), Header::Valid { .. }))
            .collect()
    }

    fn entry_indexes(records: &[Record<'_>]) -> Vec<u64> {
        records
            .iter()
            .filter_map(|r| match &r.content {
                Content::Entries(entries) => Some(entries.iter().map(|e| e.index)),
                _ => None,
            })
            .flatten()
            .collect()
    }

    #[test]
    fn reads_every_record_of_every_segment_without_touching_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_log(dir.path(), 120);
        assert!(paths.len() >= 3, "{paths:?}");
        let before: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
        let mut indexes = Vec::new();
        for (position, bytes) in before.iter().enumerate() {
            assert_eq!(
                header(bytes),
                Header::Valid {
                    shard_id: 3,
                    sequence: position as u64 + 1
                }
            );
            let records: Vec<Record<'_>> = Records::new(bytes).map(Result::unwrap).collect();
            // Every segment starts with copies of the metadata.
            assert!(matches!(records[0].content, Content::HardState(_)));
            assert!(records
                .iter()
                .any(|r| matches!(r.content, Content::HardState(HardState { term: 2, .. }))));
            assert!(records.iter().any(|r| r.content
                == Content::ConfState(ConfState {
                    voters: vec![1, 2, 3],
                    learners: vec![4]
                })));
            assert_eq!(records[0].offset, FIRST_RECORD_OFFSET);
            for pair in records.windows(2) {
                assert_eq!(pair[0].offset + pair[0].len, pair[1].offset);
            }
            indexes.extend(entry_indexes(&records));
        }
        assert_eq!(indexes, (1..=120).collect::<Vec<_>>());
        let after: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
        assert_eq!(before, after);
    }

    #[test]
    fn entries_borrow_their_data_from_the_segment() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_log(dir.path(), 3);
        let bytes = std::fs::read(&paths[0]).unwrap();
        let range = bytes.as_ptr_range();
        for record in Records::new(&bytes) {
            if let Content::Entries(entries) = record.unwrap().content {
                for entry in entries {
                    assert_eq!(entry.data, &[7u8; 100][..]);
                    assert!(range.contains(&entry.data.as_ptr()));
                }
            }
        }
    }

    #[test]
    fn a_flipped_byte_is_a_bad_record_and_resync_reads_on_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_log(dir.path(), 120);
        let mut bytes = std::fs::read(&paths[1]).unwrap();
        let (offset, len, wanted_after) = {
            let good: Vec<Record<'_>> = Records::new(&bytes).map(Result::unwrap).collect();
            let victim = good
                .iter()
                .position(|r| matches!(r.content, Content::Entries(_)))
                .unwrap();
            let after = entry_indexes(&good[victim + 1..]);
            let victim = &good[victim];
            (victim.offset as usize, victim.len as usize, after)
        };
        bytes[offset + len / 2] ^= 0x40;

        let mut records = Records::new(&bytes);
        let bad = loop {
            if let Err(bad) = records.next().expect("a bad record before the end") {
                break bad;
            }
        };
        assert_eq!(bad.offset, offset as u64);
        assert!(bad.reason.contains("checksum expected"), "{}", bad.reason);
        assert_eq!(records.offset(), offset as u64);
        assert!(records.next().is_none(), "stops after a bad record");
        assert_eq!(records.resync(), Some((offset + len) as u64));
        let rest: Vec<Record<'_>> = records.map(Result::unwrap).collect();
        assert_eq!(entry_indexes(&rest), wanted_after);
    }

    #[test]
    fn stray_bytes_after_the_last_record_of_a_version_1_segment_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_log(dir.path(), 3);
        // The same records as version 1 wrote them: unchained, zeros after.
        let (mut bytes, end) = format::as_version_1(&std::fs::read(&paths[0]).unwrap());
        let count = Records::new(&bytes).map(Result::unwrap).count();
        assert!(count >= 3);

        bytes[end + 900] = 0xee;
        let mut records = Records::new(&bytes);
        let bad = records.find_map(Result::err).unwrap();
        assert_eq!(bad.offset, (end + 900) as u64);
        assert!(
            bad.reason.contains(&format!(
                "after the last record, which ends at offset {end}"
            )),
            "{}",
            bad.reason
        );
        assert_eq!(records.offset(), end as u64);
        assert_eq!(records.resync(), None, "no record after the stray byte");
        assert!(records.next().is_none());
    }

    #[test]
    fn stale_records_after_the_end_of_a_chained_segment_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_log(dir.path(), 3);
        let mut bytes = std::fs::read(&paths[0]).unwrap();
        let all: Vec<(u64, u64)> = Records::new(&bytes)
            .map(|r| r.map(|r| (r.offset, r.len)).unwrap())
            .collect();
        let end = all.last().map(|(offset, len)| offset + len).unwrap() as usize;
        // A well-formed old record right after the end, as a recycled file
        // or a cut tail leaves them: its crc continues another chain.
        let (offset, len) = all[all.len() - 1];
        let copy = bytes[offset as usize..(offset + len) as usize].to_vec();
        bytes[end..end + copy.len()].copy_from_slice(&copy);
        let mut records = Records::new(&bytes);
        let bad = records.by_ref().find_map(Result::err).unwrap();
        assert_eq!(bad.offset, end as u64);
        assert!(bad.reason.contains("checksum expected"), "{}", bad.reason);
        // With the end marked (as every append does), nothing is left to read.
        bytes[end..end + 8].fill(0);
        let mut records = Records::new(&bytes);
        assert_eq!(records.by_ref().map(Result::unwrap).count(), all.len());
        assert_eq!(
            records.unsealed_end(),
            Some(end as u64),
            "the newest has no seal"
        );
    }

    #[test]
    fn a_zeroed_length_in_a_sealed_segment_shows_as_a_missing_seal() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_log(dir.path(), 120);
        assert!(paths.len() >= 2);
        let mut bytes = std::fs::read(&paths[0]).unwrap();
        let (at, count) = {
            let mut records = Records::new(&bytes);
            let all: Vec<Record<'_>> = records.by_ref().map(Result::unwrap).collect();
            assert_eq!(all.last().unwrap().content, Content::Seal);
            assert_eq!(records.unsealed_end(), None);
            (all[3].offset as usize, all.len())
        };
        assert!(count > 4);
        bytes[at..at + 4].fill(0);
        let mut records = Records::new(&bytes);
        let read: Vec<_> = records.by_ref().map(Result::unwrap).collect();
        assert_eq!(read.len(), 3);
        assert_eq!(records.unsealed_end(), Some(at as u64));
    }

    #[test]
    fn a_record_with_a_good_checksum_but_a_bad_payload_is_bad() {
        let mut bytes = vec![0u8; 256];
        bytes[..HEADER_LEN].copy_from_slice(&format::encode_header(format::SegmentHeader {
            shard_id: 0,
            sequence: 1,
            version: format::FORMAT_VERSION,
        }));
        let mut chain = Some(format::chain_seed(1));
        let first = format::record_len(format::KIND_LEN + 3);
        let second = format::record_len(format::KIND_LEN + format::HARD_STATE_LEN);
        let at = HEADER_LEN;
        format::write_record(&mut bytes[at..at + first], 9, b"abc", &mut chain);
        let hard_state = format::encode_hard_state(HardState {
            term: 4,
            vote: 0,
            commit: 0,
        });
        let next = at + first;
        format::write_record(
            &mut bytes[next..next + second],
            format::KIND_HARD_STATE,
            &hard_state,
            &mut chain,
        );
        let mut records = Records::new(&bytes);
        let bad = records.next().unwrap().unwrap_err();
        assert_eq!(bad.offset, at as u64);
        assert!(
            bad.reason.contains("unknown record kind 9"),
            "{}",
            bad.reason
        );
        assert_eq!(records.resync(), Some(next as u64));
        let record = records.next().unwrap().unwrap();
        assert_eq!(record.body_len, 1 + format::HARD_STATE_LEN as u64);
        assert!(records.next().is_none());
    }

    #[test]
    fn headers_are_classified_like_recovery_does() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_log(dir.path(), 3);
        let mut bytes = std::fs::read(&paths[0]).unwrap();
        assert!(matches!(header(&bytes), Header::Valid { .. }));
        assert_eq!(header(&[0u8; 64]), Header::NeverWritten);
        assert_eq!(header(&bytes[..8]), Header::NeverWritten);
        bytes[2] ^= 1;
        assert!(matches!(header(&bytes), Header::Invalid(reason) if reason.contains("magic")));
    }

    #[test]
    fn segment_files_lists_segments_only_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_log(dir.path(), 120);
        std::fs::write(dir.path().join("notes.txt"), b"x").unwrap();
        let listed = segment_files(dir.path()).unwrap();
        let sequences: Vec<u64> = listed.iter().map(|(s, _)| *s).collect();
        // The valid ones, then the one prepared ahead.
        assert_eq!(
            sequences[..paths.len()],
            (1..=paths.len() as u64).collect::<Vec<_>>()
        );
        assert!(sequences.len() <= paths.len() + 1);
        assert_eq!(segment_sequence("0000000000000002.wal"), Some(2));
        assert_eq!(segment_sequence("LOCK"), None);
        assert!(matches!(
            segment_files(&dir.path().join("missing")),
            Err(WalError::Io { .. })
        ));
    }
}
