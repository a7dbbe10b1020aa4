//! The on-disk format of a corekv WAL, written down once, here.
//!
//! # Directory
//!
//! ```text
//! LOCK                    flock(2)ed by the open Wal; holds the holder's pid in ASCII
//! 0000000000000001.wal    segment files, named {sequence:016}.wal; sequences
//! 0000000000000002.wal    increase by one, compaction deletes from the oldest
//! ```
//!
//! # Segment
//!
//! A segment file is `segment_bytes` long. A new one is either preallocated
//! (fallocate, then zeros written over it with O_DIRECT where the file
//! system allows, so its blocks are written: it reads as zeros) or a
//! recycled old segment (see "Recycling"): past the last record it may hold
//! anything. It starts with a header:
//!
//! ```text
//! offset size field
//!  0     8    SEGMENT_MAGIC  b"corekvWL"
//!  8     4    format version, u32 LE (FORMAT_VERSION, or 1: see "Versions")
//! 12     4    shard id, u32 LE
//! 16     8    sequence number, u64 LE (equal to the one in the file name)
//! 24     4    reserved, zero
//! 28     4    crc32 of bytes 0..28
//! 32          HEADER_LEN: records start here
//! ```
//!
//! The header of segment `k + 1` is written (pwrite) only after segment `k`
//! is durable, by the sync job. Until then it is all zeros. So a valid header
//! on segment `j` proves that every older segment is complete on disk, and
//! recovery can treat a bad record in any segment but the newest valid one as
//! corruption, while zero-header segments after it are unsynced leftovers.
//!
//! Every segment begins with copies of the current hard state, conf state (if
//! one was ever set) and snapshot marker, so deleting older segments never
//! loses metadata.
//!
//! # Record
//!
//! Records follow each other from `HEADER_LEN`, each starting at a multiple of
//! `RECORD_ALIGN` (8). All integers are little endian.
//!
//! ```text
//! offset size field
//!  0     4    len: bytes of kind + payload (>= 1); 0 = no more records here
//!  4     4    crc32 (crc32fast, IEEE): see below
//!  8     1    kind
//!  9     ...  payload (len - 1 bytes), then zeros up to the next multiple of 8
//! ```
//!
//! The checksums of a segment form a chain: a record's crc is the crc32 of
//! its kind + payload continued from the crc of the record before it (from
//! `chain_seed(sequence)` for the first), i.e. the crc of every body so far.
//! Eight zero bytes (a `len` of 0) follow the last record whenever there is
//! room; the next record overwrites them. So the records end at a zero
//! `len`; a record that fails its crc is a torn tail in the newest segment
//! and corruption elsewhere; and bytes left over from an earlier life of a
//! recycled file, or from a tail that recovery cut, can never pass for
//! records: their crcs continue another chain.
//!
//! Payloads by kind:
//!
//! ```text
//! KIND_ENTRIES (1)          first index u64 | count u32 (>= 1) |
//!                           count x (term u64 | entry type u8 | data len u32 | data)
//! KIND_HARD_STATE (2)       term u64 | vote u64 | commit u64
//! KIND_CONF_STATE (3)       voter count u32 | learner count u32 | voters u64.. | learners u64..
//! KIND_SNAPSHOT_MARKER (4)  index u64 | term u64 | discard log u8 (0 or 1)
//! KIND_SEAL (5)             empty (version 2)
//! ```
//!
//! A version 2 segment ends with a seal record, written when the log moves
//! on to the next segment (its `SEAL_RECORD_LEN` bytes are kept free for
//! it). Bytes after the last record are not zeros there, so the seal is what
//! tells a complete segment from one whose records end early because a
//! length was damaged: a segment other than the newest that ends without its
//! seal is corruption.
//!
//! Replay applies records in order. An entries record with first index `i`
//! drops whatever the log held at `>= i` (raft log conflict). A snapshot
//! marker records the decision taken when it was applied: with `discard log`
//! = 1 the whole log is dropped (a snapshot from the leader replaced it),
//! otherwise only entries `<= index`. Recording the decision makes replay
//! independent of segments that compaction already deleted.
//!
//! # Recycling
//!
//! A segment that compaction retires may be renamed `{sequence:016}.free`
//! instead of deleted, and later taken for a new segment: its first
//! `HEADER_LEN + 8` bytes are zeroed and synced, then it is renamed (never
//! over an existing file) to the new segment's name. Its blocks are already
//! written, so appends neither zero-fill page cache pages nor convert
//! unwritten extents, and an fdatasync writes data only. `.free` files are
//! never read by recovery. A retired segment past the free files' budget is
//! renamed `{sequence:016}.deleting`, cut down a step at a time and
//! deleted; one left by a crash midway is deleted by the next compaction.
//! Recovery never reads those either.
//!
//! # Versions
//!
//! Version 1 (before recycling) had unchained crcs (of kind + payload alone)
//! and relied on zeros after the last record. Its segments are still read,
//! and appended to the same way when one is the newest at start-up; every
//! segment created since is version 2.

use crate::types::{ConfState, HardState, SnapshotMarker};

/// First bytes of every segment file.
pub(crate) const SEGMENT_MAGIC: [u8; 8] = *b"corekvWL";
/// Version of this layout; bumped on any incompatible change.
pub(crate) const FORMAT_VERSION: u32 = 2;
/// The version before checksum chains; still read (see "Versions").
pub(crate) const UNCHAINED_FORMAT_VERSION: u32 = 1;

pub(crate) const HEADER_MAGIC_OFFSET: usize = 0;
pub(crate) const HEADER_VERSION_OFFSET: usize = HEADER_MAGIC_OFFSET + SEGMENT_MAGIC.len();
pub(crate) const HEADER_SHARD_OFFSET: usize = HEADER_VERSION_OFFSET + 4;
pub(crate) const HEADER_SEQUENCE_OFFSET: usize = HEADER_SHARD_OFFSET + 4;
pub(crate) const HEADER_RESERVED_OFFSET: usize = HEADER_SEQUENCE_OFFSET + 8;
pub(crate) const HEADER_CRC_OFFSET: usize = HEADER_RESERVED_OFFSET + 4;
/// Bytes of the segment header; records start at this offset.
pub(crate) const HEADER_LEN: usize = HEADER_CRC_OFFSET + 4;

/// Records start at multiples of this.
pub(crate) const RECORD_ALIGN: usize = 8;
/// `len u32 | crc u32` in front of every record.
pub(crate) const RECORD_HEADER_LEN: usize = 8;
/// The kind byte, counted in `len` and covered by the crc.
pub(crate) const KIND_LEN: usize = 1;

pub(crate) const KIND_ENTRIES: u8 = 1;
pub(crate) const KIND_HARD_STATE: u8 = 2;
pub(crate) const KIND_CONF_STATE: u8 = 3;
pub(crate) const KIND_SNAPSHOT_MARKER: u8 = 4;
pub(crate) const KIND_SEAL: u8 = 5;

/// Bytes of a seal record, kept free at the end of every version 2 segment.
pub(crate) const SEAL_RECORD_LEN: usize = record_len(KIND_LEN);

/// `first index u64 | count u32` at the start of an entries payload.
pub(crate) const ENTRIES_PREFIX_LEN: usize = 8 + 4;
/// `term u64 | entry type u8 | data len u32` in front of each entry's data.
pub(crate) const ENTRY_HEADER_LEN: usize = 8 + 1 + 4;
pub(crate) const HARD_STATE_LEN: usize = 8 * 3;
pub(crate) const CONF_STATE_PREFIX_LEN: usize = 4 + 4;
pub(crate) const SNAPSHOT_MARKER_LEN: usize = 8 + 8 + 1;

/// Bytes an entries record occupies before its first entry.
pub(crate) const ENTRIES_RECORD_OVERHEAD: usize = RECORD_HEADER_LEN + KIND_LEN + ENTRIES_PREFIX_LEN;

const _: () = assert!(HEADER_LEN == 32 && HEADER_LEN % RECORD_ALIGN == 0);

/// `{seq:016}.wal`.
pub(crate) fn segment_file_name(sequence: u64) -> String {
    format!("{sequence:016}.wal")
}

/// `{seq:016}.free`: a retired segment kept for reuse.
pub(crate) fn free_file_name(sequence: u64) -> String {
    format!("{sequence:016}.free")
}

/// The sequence a free file was retired with, or None for any other file.
pub(crate) fn parse_free_file_name(name: &str) -> Option<u64> {
    parse_sequence(name.strip_suffix(".free")?)
}

/// `{seq:016}.deleting`: a retired segment being cut down and deleted
/// (see "Recycling").
pub(crate) fn deleting_file_name(sequence: u64) -> String {
    format!("{sequence:016}.deleting")
}

/// The sequence of a `.deleting` file, or None for any other file.
pub(crate) fn parse_deleting_file_name(name: &str) -> Option<u64> {
    parse_sequence(name.strip_suffix(".deleting")?)
}

/// The sequence number of a segment file name, or None for any other file.
pub(crate) fn parse_segment_file_name(name: &str) -> Option<u64> {
    parse_sequence(name.strip_suffix(".wal")?)
}

fn parse_sequence(digits: &str) -> Option<u64> {
    if digits.len() != 16 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub(crate) const fn align_up(bytes: usize) -> usize {
    (bytes + RECORD_ALIGN - 1) & !(RECORD_ALIGN - 1)
}

/// Total bytes (header, body, padding) of a record whose kind + payload is
/// `body_len` bytes.
pub(crate) const fn record_len(body_len: usize) -> usize {
    align_up(RECORD_HEADER_LEN + body_len)
}

/// Bytes one entry adds to an entries record body.
pub(crate) const fn entry_len(data_len: usize) -> usize {
    ENTRY_HEADER_LEN + data_len
}

/// A decoded segment header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SegmentHeader {
    pub(crate) shard_id: u32,
    pub(crate) sequence: u64,
    /// `FORMAT_VERSION` or `UNCHAINED_FORMAT_VERSION`; headers are always
    /// written with `FORMAT_VERSION`.
    pub(crate) version: u32,
}

impl SegmentHeader {
    /// The checksum chain its first record continues (None: version 1).
    pub(crate) fn chain(&self) -> Option<u32> {
        (self.version != UNCHAINED_FORMAT_VERSION).then(|| chain_seed(self.sequence))
    }
}

/// Where the checksum chain of segment `sequence` starts: distinct per
/// sequence, so a recycled file's old records fail in their new place.
pub(crate) fn chain_seed(sequence: u64) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&SEGMENT_MAGIC);
    hasher.update(&sequence.to_le_bytes());
    hasher.finalize()
}

/// A record body's crc: continued from `chain` (version 2), or alone
/// (version 1, `None`).
pub(crate) fn record_crc(chain: Option<u32>, body: &[u8]) -> u32 {
    match chain {
        Some(previous) => {
            let mut hasher = crc32fast::Hasher::new_with_initial(previous);
            hasher.update(body);
            hasher.finalize()
        }
        None => crc32fast::hash(body),
    }
}

/// Why a header is not valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum HeaderProblem {
    /// All zeros (or the file is shorter than a header): never made valid,
    /// the segment was created but not synced.
    NeverWritten,
    /// Non-zero but wrong: corruption, or a file that is not a corekv WAL.
    Invalid(String),
}

pub(crate) fn encode_header(header: SegmentHeader) -> [u8; HEADER_LEN] {
    let mut bytes = [0u8; HEADER_LEN];
    bytes[HEADER_MAGIC_OFFSET..HEADER_VERSION_OFFSET].copy_from_slice(&SEGMENT_MAGIC);
    bytes[HEADER_VERSION_OFFSET..HEADER_SHARD_OFFSET]
        .copy_from_slice(&header.version.to_le_bytes());
    bytes[HEADER_SHARD_OFFSET..HEADER_SEQUENCE_OFFSET]
        .copy_from_slice(&header.shard_id.to_le_bytes());
    bytes[HEADER_SEQUENCE_OFFSET..HEADER_RESERVED_OFFSET]
        .copy_from_slice(&header.sequence.to_le_bytes());
    let crc = crc32fast::hash(&bytes[..HEADER_CRC_OFFSET]);
    bytes[HEADER_CRC_OFFSET..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    bytes
}

pub(crate) fn decode_header(bytes: &[u8]) -> Result<SegmentHeader, HeaderProblem> {
    if bytes.len() < HEADER_LEN || bytes[..HEADER_LEN].iter().all(|&b| b == 0) {
        return Err(HeaderProblem::NeverWritten);
    }
    if bytes[HEADER_MAGIC_OFFSET..HEADER_VERSION_OFFSET] != SEGMENT_MAGIC {
        return Err(HeaderProblem::Invalid(format!(
            "magic expected {:?} but got {:?}",
            SEGMENT_MAGIC,
            &bytes[HEADER_MAGIC_OFFSET..HEADER_VERSION_OFFSET]
        )));
    }
    let expected_crc = read_u32(bytes, HEADER_CRC_OFFSET);
    let actual_crc = crc32fast::hash(&bytes[..HEADER_CRC_OFFSET]);
    if expected_crc != actual_crc {
        return Err(HeaderProblem::Invalid(format!(
            "header checksum expected {expected_crc:#010x} but got {actual_crc:#010x}"
        )));
    }
    let version = read_u32(bytes, HEADER_VERSION_OFFSET);
    if !(UNCHAINED_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(HeaderProblem::Invalid(format!(
            "format version expected {UNCHAINED_FORMAT_VERSION} to {FORMAT_VERSION} but got {version}"
        )));
    }
    Ok(SegmentHeader {
        shard_id: read_u32(bytes, HEADER_SHARD_OFFSET),
        sequence: read_u64(bytes, HEADER_SEQUENCE_OFFSET),
        version,
    })
}

pub(crate) fn read_u32(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().expect("4 bytes"))
}

pub(crate) fn read_u64(bytes: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(bytes[offset..offset + 8].try_into().expect("8 bytes"))
}

/// Writes a record of `kind` with `payload` at the start of `out`, which must
/// be exactly `record_len(KIND_LEN + payload.len())` bytes, continuing the
/// segment's checksum `chain`.
pub(crate) fn write_record(out: &mut [u8], kind: u8, payload: &[u8], chain: &mut Option<u32>) {
    let body_len = KIND_LEN + payload.len();
    debug_assert_eq!(out.len(), record_len(body_len));
    out[RECORD_HEADER_LEN] = kind;
    out[RECORD_HEADER_LEN + KIND_LEN..RECORD_HEADER_LEN + body_len].copy_from_slice(payload);
    seal_record(out, body_len, chain);
}

/// Fills in `len`, `crc` and the padding once kind and payload are in place,
/// and moves the segment's checksum `chain` on to this record.
pub(crate) fn seal_record(out: &mut [u8], body_len: usize, chain: &mut Option<u32>) {
    // Recycled space is not zero: the padding is written, not assumed.
    out[RECORD_HEADER_LEN + body_len..].fill(0);
    let body = &out[RECORD_HEADER_LEN..RECORD_HEADER_LEN + body_len];
    let crc = record_crc(*chain, body);
    if chain.is_some() {
        *chain = Some(crc);
    }
    let len = u32::try_from(body_len).expect("record body fits in u32 (segments are < 4 GiB)");
    out[0..4].copy_from_slice(&len.to_le_bytes());
    out[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Zeroes the `len` after the record that ends at `offset`, if there is room
/// for one: the end of the records in a segment whose bytes past it are not
/// zeros.
pub(crate) fn terminate(segment: &mut [u8], offset: usize) {
    if let Some(len) = segment.get_mut(offset..offset + RECORD_HEADER_LEN) {
        len.fill(0);
    }
}

/// What `read_record` found at an offset.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ReadRecord<'a> {
    /// `len` is 0, or no room for a record header is left: no more records.
    End,
    /// A record that passed its checks.
    Record {
        /// Its crc: the chain the next record continues.
        crc: u32,
        kind: u8,
        payload: &'a [u8],
        /// Offset of the payload inside the segment.
        payload_offset: usize,
        /// Offset of the next record.
        next_offset: usize,
    },
    /// Bad length or checksum; the reason says what was expected and found.
    Invalid(String),
}

/// Reads the record at `offset` of a segment's bytes, checking its length and
/// its crc (continued from `chain`, see `record_crc`) before trusting a byte
/// of it.
pub(crate) fn read_record(segment: &[u8], offset: usize, chain: Option<u32>) -> ReadRecord<'_> {
    debug_assert_eq!(offset % RECORD_ALIGN, 0);
    if offset + RECORD_HEADER_LEN > segment.len() {
        return ReadRecord::End;
    }
    let body_len = read_u32(segment, offset) as usize;
    if body_len == 0 {
        return ReadRecord::End;
    }
    let room = segment.len() - offset - RECORD_HEADER_LEN;
    if body_len > room {
        return ReadRecord::Invalid(format!(
            "record length {body_len} exceeds the {room} bytes left in the segment"
        ));
    }
    let body = &segment[offset + RECORD_HEADER_LEN..offset + RECORD_HEADER_LEN + body_len];
    let expected_crc = read_u32(segment, offset + 4);
    let actual_crc = record_crc(chain, body);
    if expected_crc != actual_crc {
        return ReadRecord::Invalid(format!(
            "checksum expected {expected_crc:#010x} but got {actual_crc:#010x}"
        ));
    }
    ReadRecord::Record {
        crc: actual_crc,
        kind: body[0],
        payload: &body[KIND_LEN..],
        payload_offset: offset + RECORD_HEADER_LEN + KIND_LEN,
        next_offset: offset + record_len(body_len),
    }
}

pub(crate) fn encode_hard_state(hard_state: HardState) -> [u8; HARD_STATE_LEN] {
    let mut bytes = [0u8; HARD_STATE_LEN];
    bytes[0..8].copy_from_slice(&hard_state.term.to_le_bytes());
    bytes[8..16].copy_from_slice(&hard_state.vote.to_le_bytes());
    bytes[16..24].copy_from_slice(&hard_state.commit.to_le_bytes());
    bytes
}

pub(crate) fn decode_hard_state(payload: &[u8]) -> Result<HardState, String> {
    if payload.len() != HARD_STATE_LEN {
        return Err(format!(
            "hard state payload expected {HARD_STATE_LEN} bytes but got {}",
            payload.len()
        ));
    }
    Ok(HardState {
        term: read_u64(payload, 0),
        vote: read_u64(payload, 8),
        commit: read_u64(payload, 16),
    })
}

pub(crate) fn conf_state_payload_len(conf_state: &ConfState) -> usize {
    CONF_STATE_PREFIX_LEN + 8 * (conf_state.voters.len() + conf_state.learners.len())
}

pub(crate) fn encode_conf_state(conf_state: &ConfState) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(conf_state_payload_len(conf_state));
    let count = |ids: &Vec<u64>| u32::try_from(ids.len()).expect("member count fits in u32");
    bytes.extend_from_slice(&count(&conf_state.voters).to_le_bytes());
    bytes.extend_from_slice(&count(&conf_state.learners).to_le_bytes());
    for id in conf_state.voters.iter().chain(&conf_state.learners) {
        bytes.extend_from_slice(&id.to_le_bytes());
    }
    bytes
}

pub(crate) fn decode_conf_state(payload: &[u8]) -> Result<ConfState, String> {
    if payload.len() < CONF_STATE_PREFIX_LEN {
        return Err(format!(
            "conf state payload expected at least {CONF_STATE_PREFIX_LEN} bytes but got {}",
            payload.len()
        ));
    }
    let voters = read_u32(payload, 0) as usize;
    let learners = read_u32(payload, 4) as usize;
    let expected = CONF_STATE_PREFIX_LEN as u64 + 8 * (voters as u64 + learners as u64);
    if payload.len() as u64 != expected {
        return Err(format!(
            "conf state of {voters} voters and {learners} learners expected {expected} bytes but got {}",
            payload.len()
        ));
    }
    let ids: Vec<u64> = payload[CONF_STATE_PREFIX_LEN..]
        .chunks_exact(8)
        .map(|chunk| u64::from_le_bytes(chunk.try_into().expect("8 bytes")))
        .collect();
    Ok(ConfState {
        voters: ids[..voters].to_vec(),
        learners: ids[voters..].to_vec(),
    })
}

pub(crate) fn encode_snapshot_marker(
    marker: SnapshotMarker,
    discard_log: bool,
) -> [u8; SNAPSHOT_MARKER_LEN] {
    let mut bytes = [0u8; SNAPSHOT_MARKER_LEN];
    bytes[0..8].copy_from_slice(&marker.index.to_le_bytes());
    bytes[8..16].copy_from_slice(&marker.term.to_le_bytes());
    bytes[16] = u8::from(discard_log);
    bytes
}

/// The marker and whether applying it discarded the whole log.
pub(crate) fn decode_snapshot_marker(payload: &[u8]) -> Result<(SnapshotMarker, bool), String> {
    if payload.len() != SNAPSHOT_MARKER_LEN {
        return Err(format!(
            "snapshot marker payload expected {SNAPSHOT_MARKER_LEN} bytes but got {}",
            payload.len()
        ));
    }
    let discard_log = match payload[16] {
        0 => false,
        1 => true,
        other => {
            return Err(format!(
                "snapshot marker discard flag expected 0 or 1 but got {other}"
            ))
        }
    };
    let marker = SnapshotMarker {
        index: read_u64(payload, 0),
        term: read_u64(payload, 8),
    };
    Ok((marker, discard_log))
}

/// One entry as laid out in an entries payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct EntryLayout {
    pub(crate) index: u64,
    pub(crate) term: u64,
    pub(crate) entry_type: u8,
    /// Offset of the data inside the payload.
    pub(crate) data_offset: usize,
    pub(crate) data_len: usize,
}

/// Walks an entries payload, checking every length against what is left, and
/// calls `each` per entry. Returns the first index and the count.
pub(crate) fn decode_entries(
    payload: &[u8],
    mut each: impl FnMut(EntryLayout),
) -> Result<(u64, u32), String> {
    if payload.len() < ENTRIES_PREFIX_LEN {
        return Err(format!(
            "entries payload expected at least {ENTRIES_PREFIX_LEN} bytes but got {}",
            payload.len()
        ));
    }
    let first_index = read_u64(payload, 0);
    let count = read_u32(payload, 8);
    if count == 0 {
        return Err("entries record expected at least 1 entry but got 0".to_string());
    }
    if first_index == 0 || first_index.checked_add(u64::from(count)).is_none() {
        return Err(format!(
            "entries record has impossible first index {first_index} for {count} entries"
        ));
    }
    let mut offset = ENTRIES_PREFIX_LEN;
    for i in 0..count {
        if payload.len() - offset < ENTRY_HEADER_LEN {
            return Err(format!(
                "entry {i} of {count} expected a {ENTRY_HEADER_LEN} byte header but {} bytes are left",
                payload.len() - offset
            ));
        }
        let term = read_u64(payload, offset);
        let entry_type = payload[offset + 8];
        let data_len = read_u32(payload, offset + 9) as usize;
        let data_offset = offset + ENTRY_HEADER_LEN;
        if payload.len() - data_offset < data_len {
            return Err(format!(
                "entry {i} of {count} expected {data_len} data bytes but {} are left",
                payload.len() - data_offset
            ));
        }
        each(EntryLayout {
            index: first_index + u64::from(i),
            term,
            entry_type,
            data_offset,
            data_len,
        });
        offset = data_offset + data_len;
    }
    if offset != payload.len() {
        return Err(format!(
            "entries record of {count} entries expected {offset} payload bytes but got {}",
            payload.len()
        ));
    }
    Ok((first_index, count))
}

/// A version 2 segment's bytes as version 1 wrote them: the same records
/// (seal dropped) with unchained crcs, zeros after the last, a version 1
/// header. Returns them and where the records end. For tests of the
/// version 1 reader.
#[cfg(test)]
pub(crate) fn as_version_1(segment: &[u8]) -> (Vec<u8>, usize) {
    let header = decode_header(segment).expect("a valid header");
    let mut chain = header.chain();
    let mut offset = HEADER_LEN;
    let mut out = vec![0u8; segment.len()];
    let mut end = HEADER_LEN;
    while let ReadRecord::Record {
        crc,
        kind,
        payload,
        next_offset,
        ..
    } = read_record(segment, offset, chain)
    {
        if kind != KIND_SEAL {
            let length = record_len(KIND_LEN + payload.len());
            write_record(&mut out[end..end + length], kind, payload, &mut None);
            end += length;
        }
        chain = Some(crc);
        offset = next_offset;
    }
    out[..HEADER_LEN].copy_from_slice(&encode_header(SegmentHeader {
        version: UNCHAINED_FORMAT_VERSION,
        ..header
    }));
    (out, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEQUENCE: u64 = 5;

    fn record(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; record_len(KIND_LEN + payload.len())];
        write_record(&mut out, kind, payload, &mut Some(chain_seed(SEQUENCE)));
        out
    }

    fn read_back(bytes: &[u8]) -> (u8, Vec<u8>) {
        match read_record(bytes, 0, Some(chain_seed(SEQUENCE))) {
            ReadRecord::Record {
                kind,
                payload,
                payload_offset,
                next_offset,
                ..
            } => {
                assert_eq!(payload_offset, RECORD_HEADER_LEN + KIND_LEN);
                assert_eq!(next_offset, bytes.len());
                (kind, payload.to_vec())
            }
            other => panic!("expected a record, got {other:?}"),
        }
    }

    #[test]
    fn file_names_are_fixed_width_and_round_trip() {
        assert_eq!(free_file_name(3), "0000000000000003.free");
        assert_eq!(parse_free_file_name("0000000000000003.free"), Some(3));
        assert_eq!(parse_free_file_name("0000000000000003.wal"), None);
        assert_eq!(segment_file_name(3), "0000000000000003.wal");
        assert_eq!(parse_segment_file_name("0000000000000003.wal"), Some(3));
        assert_eq!(parse_segment_file_name("3.wal"), None);
        assert_eq!(parse_segment_file_name("000000000000000x.wal"), None);
        assert_eq!(parse_segment_file_name("0000000000000003.tmp"), None);
        assert_eq!(parse_segment_file_name("LOCK"), None);
    }

    #[test]
    fn header_round_trips_and_rejects_damage() {
        let header = SegmentHeader {
            shard_id: 7,
            sequence: 42,
            version: FORMAT_VERSION,
        };
        let bytes = encode_header(header);
        assert_eq!(&bytes[..8], b"corekvWL");
        assert_eq!(decode_header(&bytes), Ok(header));
        assert_eq!(
            decode_header(&[0u8; HEADER_LEN]),
            Err(HeaderProblem::NeverWritten)
        );
        assert_eq!(
            decode_header(&bytes[..10]),
            Err(HeaderProblem::NeverWritten)
        );
        for position in 0..HEADER_LEN {
            let mut damaged = bytes;
            damaged[position] ^= 0x10;
            assert!(
                matches!(decode_header(&damaged), Err(HeaderProblem::Invalid(_))),
                "flip at {position} not caught"
            );
        }
    }

    #[test]
    fn header_rejects_other_version() {
        let mut bytes = encode_header(SegmentHeader {
            shard_id: 1,
            sequence: 1,
            version: FORMAT_VERSION,
        });
        bytes[HEADER_VERSION_OFFSET..HEADER_SHARD_OFFSET].copy_from_slice(&3u32.to_le_bytes());
        let crc = crc32fast::hash(&bytes[..HEADER_CRC_OFFSET]);
        bytes[HEADER_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        match decode_header(&bytes) {
            Err(HeaderProblem::Invalid(reason)) => {
                assert!(
                    reason.contains("version expected 1 to 2 but got 3"),
                    "{reason}"
                )
            }
            other => panic!("expected a version error, got {other:?}"),
        }
    }

    #[test]
    fn records_are_aligned_and_padded_with_zeros() {
        let bytes = record(KIND_HARD_STATE, &[1, 2, 3]);
        assert_eq!(bytes.len(), 16);
        assert_eq!(read_u32(&bytes, 0), 4);
        assert_eq!(&bytes[12..], &[0, 0, 0, 0]);
        assert_eq!(record_len(1), 16);
        assert_eq!(record_len(0), 8);
        assert_eq!(align_up(9), 16);
    }

    #[test]
    fn hard_state_record_round_trips() {
        let hard_state = HardState {
            term: 3,
            vote: 2,
            commit: u64::MAX,
        };
        let (kind, payload) = read_back(&record(KIND_HARD_STATE, &encode_hard_state(hard_state)));
        assert_eq!(kind, KIND_HARD_STATE);
        assert_eq!(decode_hard_state(&payload), Ok(hard_state));
        assert!(decode_hard_state(&payload[1..]).is_err());
    }

    #[test]
    fn conf_state_record_round_trips() {
        for conf_state in [
            ConfState::default(),
            ConfState {
                voters: vec![1, 2, 3],
                learners: vec![9],
            },
        ] {
            let (kind, payload) =
                read_back(&record(KIND_CONF_STATE, &encode_conf_state(&conf_state)));
            assert_eq!(kind, KIND_CONF_STATE);
            assert_eq!(payload.len(), conf_state_payload_len(&conf_state));
            assert_eq!(decode_conf_state(&payload), Ok(conf_state));
        }
        let mut lying = encode_conf_state(&ConfState {
            voters: vec![1],
            learners: vec![],
        });
        lying[0] = 2;
        assert!(decode_conf_state(&lying)
            .unwrap_err()
            .contains("expected 24 bytes but got 16"));
    }

    #[test]
    fn snapshot_marker_record_round_trips() {
        let marker = SnapshotMarker { index: 10, term: 4 };
        for discard in [false, true] {
            let (kind, payload) = read_back(&record(
                KIND_SNAPSHOT_MARKER,
                &encode_snapshot_marker(marker, discard),
            ));
            assert_eq!(kind, KIND_SNAPSHOT_MARKER);
            assert_eq!(decode_snapshot_marker(&payload), Ok((marker, discard)));
        }
        let mut bad = encode_snapshot_marker(marker, false);
        bad[16] = 2;
        assert!(decode_snapshot_marker(&bad).is_err());
    }

    fn entries_payload(first_index: u64, entries: &[(u64, u8, &[u8])]) -> Vec<u8> {
        let mut payload = Vec::new();
        payload.extend_from_slice(&first_index.to_le_bytes());
        payload.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        for (term, entry_type, data) in entries {
            payload.extend_from_slice(&term.to_le_bytes());
            payload.push(*entry_type);
            payload.extend_from_slice(&(data.len() as u32).to_le_bytes());
            payload.extend_from_slice(data);
        }
        payload
    }

    #[test]
    fn entries_record_round_trips() {
        let payload = entries_payload(5, &[(1, 0, b"abc"), (2, 1, b""), (2, 0, b"xyz!")]);
        let (kind, read) = read_back(&record(KIND_ENTRIES, &payload));
        assert_eq!(kind, KIND_ENTRIES);
        let mut seen = Vec::new();
        let (first, count) = decode_entries(&read, |layout| {
            seen.push((
                layout.index,
                layout.term,
                layout.entry_type,
                read[layout.data_offset..layout.data_offset + layout.data_len].to_vec(),
            ))
        })
        .unwrap();
        assert_eq!((first, count), (5, 3));
        assert_eq!(
            seen,
            vec![
                (5, 1, 0, b"abc".to_vec()),
                (6, 2, 1, Vec::new()),
                (7, 2, 0, b"xyz!".to_vec())
            ]
        );
    }

    #[test]
    fn entries_decoding_checks_every_length() {
        let payload = entries_payload(5, &[(1, 0, b"abc")]);
        assert!(decode_entries(&payload[..payload.len() - 1], |_| {})
            .unwrap_err()
            .contains("expected 3 data bytes"));
        let mut extra = payload.clone();
        extra.push(0);
        assert!(decode_entries(&extra, |_| {})
            .unwrap_err()
            .contains("payload bytes"));
        assert!(decode_entries(&entries_payload(5, &[]), |_| {})
            .unwrap_err()
            .contains("at least 1 entry"));
        assert!(decode_entries(&entries_payload(0, &[(1, 0, b"")]), |_| {}).is_err());
        assert!(decode_entries(&payload[..4], |_| {}).is_err());
    }

    #[test]
    fn a_record_passes_only_where_its_chain_continues() {
        let payload = encode_hard_state(HardState::default());
        let mut chain = Some(chain_seed(SEQUENCE));
        let mut bytes = vec![0u8; 2 * record_len(KIND_LEN + payload.len())];
        let (first, second) = bytes.split_at_mut(record_len(KIND_LEN + payload.len()));
        write_record(first, KIND_HARD_STATE, &payload, &mut chain);
        let after_first = chain;
        write_record(second, KIND_HARD_STATE, &payload, &mut chain);
        let seed = Some(chain_seed(SEQUENCE));
        let ReadRecord::Record {
            crc, next_offset, ..
        } = read_record(&bytes, 0, seed)
        else {
            panic!("the first record reads back");
        };
        assert_eq!(Some(crc), after_first);
        assert!(matches!(
            read_record(&bytes, next_offset, Some(crc)),
            ReadRecord::Record { .. }
        ));
        // The same bytes, in another segment or after another record: refused.
        assert!(matches!(
            read_record(&bytes, 0, Some(chain_seed(SEQUENCE + 1))),
            ReadRecord::Invalid(_)
        ));
        assert!(matches!(
            read_record(&bytes, next_offset, seed),
            ReadRecord::Invalid(_)
        ));
        assert!(matches!(
            read_record(&bytes, 0, None),
            ReadRecord::Invalid(_)
        ));
    }

    #[test]
    fn version_1_records_are_unchained_and_still_read() {
        let payload = encode_hard_state(HardState::default());
        let mut bytes = vec![0u8; record_len(KIND_LEN + payload.len())];
        let mut chain = None;
        write_record(&mut bytes, KIND_HARD_STATE, &payload, &mut chain);
        assert_eq!(chain, None);
        assert_eq!(
            read_u32(&bytes, 4),
            crc32fast::hash(&bytes[8..8 + 1 + payload.len()])
        );
        assert!(matches!(
            read_record(&bytes, 0, None),
            ReadRecord::Record { .. }
        ));
        let header = SegmentHeader {
            shard_id: 1,
            sequence: 9,
            version: UNCHAINED_FORMAT_VERSION,
        };
        assert_eq!(decode_header(&encode_header(header)), Ok(header));
        assert_eq!(header.chain(), None);
    }

    #[test]
    fn padding_is_written_and_the_end_is_marked_over_stale_bytes() {
        let mut bytes = vec![0xAB; 64];
        write_record(&mut bytes[..16], KIND_HARD_STATE, &[1, 2, 3], &mut None);
        assert_eq!(&bytes[12..16], &[0, 0, 0, 0]);
        terminate(&mut bytes, 16);
        assert_eq!(read_record(&bytes, 16, None), ReadRecord::End);
        assert_eq!(
            &bytes[24..26],
            &[0xAB, 0xAB],
            "only the length slot is zeroed"
        );
        terminate(&mut bytes, 60);
        assert_eq!(
            &bytes[60..],
            &[0xAB; 4],
            "no room for a length: nothing written"
        );
    }

    #[test]
    fn read_record_rejects_bad_crc_and_impossible_length() {
        let mut bytes = record(KIND_HARD_STATE, &encode_hard_state(HardState::default()));
        bytes.extend_from_slice(&[0u8; 8]);
        let chain = Some(chain_seed(SEQUENCE));
        assert!(matches!(
            read_record(&bytes, 0, chain),
            ReadRecord::Record { .. }
        ));
        assert_eq!(read_record(&bytes, 40, chain), ReadRecord::End);
        assert_eq!(read_record(&bytes, 48, chain), ReadRecord::End);
        let mut flipped = bytes.clone();
        flipped[12] ^= 1;
        match read_record(&flipped, 0, chain) {
            ReadRecord::Invalid(reason) => {
                assert!(reason.contains("checksum expected"), "{reason}")
            }
            other => panic!("expected a checksum error, got {other:?}"),
        }
        let mut too_long = bytes.clone();
        too_long[0..4].copy_from_slice(&1000u32.to_le_bytes());
        match read_record(&too_long, 0, chain) {
            ReadRecord::Invalid(reason) => assert!(reason.contains("exceeds"), "{reason}"),
            other => panic!("expected a length error, got {other:?}"),
        }
    }
}
