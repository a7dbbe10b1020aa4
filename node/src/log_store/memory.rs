//! A [`LogStore`] in memory, for tests and the simulator: the same semantics
//! as the WAL, with a disk the test holds on to.
//!
//! The store appends records to a [`MemDisk`] and replays them into its
//! state, exactly as the WAL appends records to a segment and replays them at
//! open. The disk separates what was written from what a sync made durable,
//! so a test can:
//!
//! - **stall** a sync: keep the [`MemSyncJob`] and hand its outcome back
//!   whenever it likes (or never);
//! - **fail** a sync: [`MemDisk::fail_next_sync`]; the store then refuses
//!   everything with [`WalError::Poisoned`], as the WAL does after a failed
//!   fdatasync;
//! - **fill** the disk: [`MemDisk::set_room`] lets only so many more bytes
//!   be written; an append then stops at the last entry that fits and
//!   returns the WAL's retryable [`WalError::CannotGrow`] (ENOSPC), as the
//!   WAL does when it cannot create its next segment;
//! - **crash** and **tear**: [`MemDisk::crash`] drops what no sync covered,
//!   except a prefix of it (pages the kernel happened to write back), and
//!   [`MemDisk::open`] recovers a new store from what is left.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use corekv_wal::{ConfState, EntryRef, HardState, SnapshotMarker, WalError};

use super::LogStore;

/// Name the store gives in error messages in place of a directory.
const LOCATION: &str = "<memory log store>";

/// Bytes an entry takes besides its data, as this store counts them.
const ENTRY_BYTES: u64 = 24;

/// One entry, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
struct OwnedEntry {
    term: u64,
    entry_type: u8,
    data: Vec<u8>,
}

/// What one append wrote, as the WAL would have written it.
#[derive(Clone, Debug)]
enum Record {
    Entries {
        first_index: u64,
        entries: Vec<OwnedEntry>,
    },
    HardState(HardState),
    ConfState(ConfState),
    Marker(SnapshotMarker),
}

impl Record {
    fn bytes(&self) -> u64 {
        match self {
            Record::Entries { entries, .. } => entries
                .iter()
                .map(|e| ENTRY_BYTES + e.data.len() as u64)
                .sum(),
            Record::HardState(_) | Record::Marker(_) => 24,
            Record::ConfState(cs) => 8 * (cs.voters.len() + cs.learners.len()) as u64,
        }
    }
}

/// The records of one store and how many of them are durable.
#[derive(Debug, Default)]
struct Disk {
    records: Vec<Record>,
    /// `records[..durable]` survive a crash.
    durable: usize,
    fail_next_sync: bool,
    /// Bytes that may still be written; `None` = no limit.
    room: Option<u64>,
}

/// The disk under a [`MemLogStore`], shared with the test that crashes it.
#[derive(Clone, Debug, Default)]
pub struct MemDisk(Rc<RefCell<Disk>>);

impl MemDisk {
    /// An empty disk.
    pub fn new() -> MemDisk {
        MemDisk::default()
    }

    /// Opens a store over what the disk holds, replaying every record (a
    /// store opened after [`MemDisk::crash`] sees only what survived it).
    pub fn open(&self) -> MemLogStore {
        let mut state = State::default();
        for record in &self.0.borrow().records {
            state.replay(record);
        }
        MemLogStore {
            disk: self.clone(),
            state,
            sync_in_flight: false,
            poisoned: false,
            bytes_written: 0,
            location: PathBuf::from(LOCATION),
        }
    }

    /// The next sync job fails (as an fdatasync returning EIO would).
    pub fn fail_next_sync(&self) {
        self.0.borrow_mut().fail_next_sync = true;
    }

    /// The machine crashes: records no sync covered are lost, except the
    /// first `torn_survivors` of them, which reached the disk anyway. Whatever
    /// store was open over this disk must be dropped.
    pub fn crash(&self, torn_survivors: usize) {
        let mut disk = self.0.borrow_mut();
        let keep = disk.durable + torn_survivors.min(disk.records.len() - disk.durable);
        disk.records.truncate(keep);
        disk.durable = keep;
    }

    /// From now on only `room` more bytes (as [`MemLogStore::bytes_written`]
    /// counts them) may be written: the disk fills up. `None` frees it.
    pub fn set_room(&self, room: Option<u64>) {
        self.0.borrow_mut().room = room;
    }

    /// Records written, durable or not.
    pub fn written_records(&self) -> usize {
        self.0.borrow().records.len()
    }

    /// Records a finished sync made durable.
    pub fn durable_records(&self) -> usize {
        self.0.borrow().durable
    }
}

/// What replaying the records gives: the WAL's in-memory view.
#[derive(Debug, Default)]
struct State {
    marker: SnapshotMarker,
    hard_state: HardState,
    conf_state: Option<ConfState>,
    /// Entries from `marker.index + 1` on.
    entries: VecDeque<OwnedEntry>,
}

impl State {
    fn first_index(&self) -> u64 {
        self.marker.index + 1
    }

    fn last_index(&self) -> u64 {
        self.marker.index + self.entries.len() as u64
    }

    fn term(&self, index: u64) -> Option<u64> {
        if index == self.marker.index {
            return Some(self.marker.term);
        }
        let offset = index.checked_sub(self.first_index())?;
        self.entries.get(offset as usize).map(|e| e.term)
    }

    /// The WAL's replay rules: a later entries record replaces the suffix it
    /// overlaps; a marker keeps the log after it only where the terms match.
    fn replay(&mut self, record: &Record) {
        match record {
            Record::Entries {
                first_index,
                entries,
            } => {
                self.entries
                    .truncate((first_index - self.first_index()) as usize);
                self.entries.extend(entries.iter().cloned());
            }
            Record::HardState(hs) => self.hard_state = *hs,
            Record::ConfState(cs) => self.conf_state = Some(cs.clone()),
            Record::Marker(marker) => {
                if self.term(marker.index) == Some(marker.term) {
                    let covered = (marker.index + 1 - self.first_index()) as usize;
                    self.entries.drain(..covered);
                } else {
                    self.entries.clear();
                }
                self.marker = *marker;
            }
        }
    }
}

/// A sync handed out by [`MemLogStore`]: covers the records written so far.
#[must_use = "run the job and hand its outcome to finish_sync"]
#[derive(Debug)]
pub struct MemSyncJob {
    through: usize,
    fail: bool,
}

impl MemSyncJob {
    /// "Runs" the job: nothing happens until the outcome is handed back, so a
    /// test that keeps the job stalls the sync for as long as it keeps it.
    pub fn run(self) -> MemSyncOutcome {
        MemSyncOutcome {
            through: self.through,
            ok: !self.fail,
        }
    }
}

/// The outcome of a [`MemSyncJob`].
#[must_use = "hand the outcome to finish_sync"]
#[derive(Debug)]
pub struct MemSyncOutcome {
    through: usize,
    ok: bool,
}

impl MemSyncOutcome {
    /// Whether the sync succeeded.
    pub fn is_ok(&self) -> bool {
        self.ok
    }
}

/// A log store whose disk is a [`MemDisk`].
#[derive(Debug)]
pub struct MemLogStore {
    disk: MemDisk,
    state: State,
    sync_in_flight: bool,
    poisoned: bool,
    bytes_written: u64,
    location: PathBuf,
}

impl MemLogStore {
    fn write(&mut self, record: Record) -> Result<(), WalError> {
        if self.poisoned {
            return Err(WalError::Poisoned);
        }
        let bytes = record.bytes();
        let mut disk = self.disk.0.borrow_mut();
        if let Some(room) = &mut disk.room {
            if bytes > *room {
                return Err(Self::disk_full(0));
            }
            *room -= bytes;
        }
        self.state.replay(&record);
        self.bytes_written += bytes;
        disk.records.push(record);
        Ok(())
    }

    /// The WAL's error when its next segment cannot be preallocated.
    fn disk_full(appended: usize) -> WalError {
        WalError::CannotGrow {
            path: PathBuf::from(LOCATION),
            op: "preallocate",
            error: std::io::Error::from_raw_os_error(libc::ENOSPC),
            appended,
        }
    }

    /// How many of `entries` the room left on the disk takes.
    fn entries_fitting(&self, entries: &[EntryRef<'_>]) -> usize {
        let Some(mut room) = self.disk.0.borrow().room else {
            return entries.len();
        };
        let mut count = 0;
        for entry in entries {
            let bytes = ENTRY_BYTES + entry.data.len() as u64;
            if bytes > room {
                break;
            }
            room -= bytes;
            count += 1;
        }
        count
    }

    fn injected(op: &'static str) -> WalError {
        WalError::Io {
            path: PathBuf::from(LOCATION),
            op,
            error: std::io::Error::other("injected failure"),
        }
    }
}

impl LogStore for MemLogStore {
    type SyncJob = MemSyncJob;
    type SyncOutcome = MemSyncOutcome;

    fn append_entries(&mut self, entries: &[EntryRef<'_>]) -> Result<(), WalError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let (first_index, last_index) = (self.state.first_index(), self.state.last_index());
        let contiguous = entries.windows(2).all(|w| w[1].index == w[0].index + 1);
        if first.index < first_index || first.index > last_index + 1 || !contiguous {
            return Err(WalError::NonContiguous {
                index: first.index,
                first_index,
                last_index,
            });
        }
        let fitting = self.entries_fitting(entries);
        if fitting == 0 {
            return Err(Self::disk_full(0));
        }
        self.write(Record::Entries {
            first_index: first.index,
            entries: entries[..fitting]
                .iter()
                .map(|e| OwnedEntry {
                    term: e.term,
                    entry_type: e.entry_type,
                    data: e.data.to_vec(),
                })
                .collect(),
        })?;
        if fitting < entries.len() {
            return Err(Self::disk_full(fitting));
        }
        Ok(())
    }

    fn set_hard_state(&mut self, hard_state: HardState) -> Result<(), WalError> {
        self.write(Record::HardState(hard_state))
    }

    fn set_conf_state(&mut self, conf_state: &ConfState) -> Result<(), WalError> {
        self.write(Record::ConfState(conf_state.clone()))
    }

    fn apply_snapshot_marker(&mut self, marker: SnapshotMarker) -> Result<(), WalError> {
        if marker.index < self.state.marker.index {
            return Err(WalError::SnapshotMarkerRegressed {
                index: marker.index,
                current_index: self.state.marker.index,
            });
        }
        self.write(Record::Marker(marker))
    }

    fn begin_sync(&mut self) -> Result<Option<MemSyncJob>, WalError> {
        if self.poisoned {
            return Err(WalError::Poisoned);
        }
        if self.sync_in_flight {
            return Err(WalError::SyncInFlight);
        }
        let mut disk = self.disk.0.borrow_mut();
        if disk.durable == disk.records.len() {
            return Ok(None);
        }
        self.sync_in_flight = true;
        Ok(Some(MemSyncJob {
            through: disk.records.len(),
            fail: std::mem::take(&mut disk.fail_next_sync),
        }))
    }

    fn finish_sync(&mut self, outcome: MemSyncOutcome) -> Result<(), WalError> {
        self.sync_in_flight = false;
        if !outcome.ok {
            self.poisoned = true;
            return Err(Self::injected("fdatasync"));
        }
        let mut disk = self.disk.0.borrow_mut();
        disk.durable = disk.durable.max(outcome.through);
        Ok(())
    }

    fn sync(&mut self) -> Result<(), WalError> {
        match self.begin_sync()? {
            Some(job) => self.finish_sync(job.run()),
            None => Ok(()),
        }
    }

    fn take_obsolete_segments(&mut self) -> Vec<PathBuf> {
        Vec::new()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_bytes: Option<u64>,
        f: &mut dyn FnMut(EntryRef<'_>),
    ) -> Result<(), WalError> {
        let (first_index, last_index) = (self.state.first_index(), self.state.last_index());
        if low < first_index || high > last_index + 1 || low > high {
            return Err(WalError::OutOfRange {
                low,
                high,
                first_index,
                last_index,
            });
        }
        let mut total_bytes = 0u64;
        for index in low..high {
            let entry = &self.state.entries[(index - first_index) as usize];
            total_bytes += entry.data.len() as u64;
            if index > low && max_bytes.is_some_and(|max| total_bytes > max) {
                break;
            }
            f(EntryRef {
                index,
                term: entry.term,
                entry_type: entry.entry_type,
                data: &entry.data,
            });
        }
        Ok(())
    }

    fn term(&self, index: u64) -> Option<u64> {
        self.state.term(index)
    }

    fn first_index(&self) -> u64 {
        self.state.first_index()
    }

    fn last_index(&self) -> u64 {
        self.state.last_index()
    }

    fn hard_state(&self) -> HardState {
        self.state.hard_state
    }

    fn conf_state(&self) -> Option<ConfState> {
        self.state.conf_state.clone()
    }

    fn snapshot_marker(&self) -> SnapshotMarker {
        self.state.marker
    }

    fn location(&self) -> &Path {
        &self.location
    }

    fn segment_count(&self) -> usize {
        1
    }

    fn bytes_written(&self) -> u64 {
        self.bytes_written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> EntryRef<'_> {
        EntryRef {
            index,
            term,
            entry_type: 0,
            data,
        }
    }

    fn terms(store: &MemLogStore) -> Vec<u64> {
        let mut out = Vec::new();
        let (low, high) = (store.first_index(), store.last_index() + 1);
        store
            .entries(low, high, None, &mut |e| out.push(e.term))
            .unwrap();
        out
    }

    #[test]
    fn a_crash_keeps_what_was_synced_and_a_torn_prefix_of_the_rest() {
        let disk = MemDisk::new();
        let mut store = disk.open();
        store.append_entries(&[entry(1, 1, b"a")]).unwrap();
        store.sync().unwrap();
        store.append_entries(&[entry(2, 1, b"b")]).unwrap();
        store.append_entries(&[entry(3, 1, b"c")]).unwrap();
        drop(store);
        disk.crash(1);
        let store = disk.open();
        assert_eq!(
            store.last_index(),
            2,
            "synced entry 1 and torn-through entry 2"
        );
        drop(store);
        disk.crash(0);
        assert_eq!(
            disk.open().last_index(),
            2,
            "a crash after a crash loses nothing more"
        );
    }

    #[test]
    fn a_failed_sync_poisons_the_store_and_makes_nothing_durable() {
        let disk = MemDisk::new();
        let mut store = disk.open();
        store.append_entries(&[entry(1, 1, b"a")]).unwrap();
        disk.fail_next_sync();
        let job = store.begin_sync().unwrap().expect("something to sync");
        assert!(store.finish_sync(job.run()).is_err());
        assert!(matches!(
            store.set_hard_state(HardState::default()),
            Err(WalError::Poisoned)
        ));
        assert_eq!(disk.durable_records(), 0);
    }

    #[test]
    fn one_sync_in_flight_and_later_appends_replace_the_suffix() {
        let disk = MemDisk::new();
        let mut store = disk.open();
        store
            .append_entries(&[entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 1, b"c")])
            .unwrap();
        let job = store.begin_sync().unwrap().unwrap();
        assert!(matches!(store.begin_sync(), Err(WalError::SyncInFlight)));
        store.append_entries(&[entry(2, 2, b"x")]).unwrap();
        assert_eq!(terms(&store), vec![1, 2]);
        store.finish_sync(job.run()).unwrap();
        assert!(matches!(
            store.append_entries(&[entry(5, 2, b"gap")]),
            Err(WalError::NonContiguous { index: 5, .. })
        ));
        // The replacement was never synced: a crash brings back the old suffix.
        drop(store);
        disk.crash(0);
        assert_eq!(terms(&disk.open()), vec![1, 1, 1]);
    }

    #[test]
    fn a_marker_keeps_the_log_after_it_only_when_terms_match() {
        let disk = MemDisk::new();
        let mut store = disk.open();
        store
            .append_entries(&[entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 2, b"c")])
            .unwrap();
        store
            .apply_snapshot_marker(SnapshotMarker { index: 2, term: 1 })
            .unwrap();
        assert_eq!((store.first_index(), store.last_index()), (3, 3));
        store
            .apply_snapshot_marker(SnapshotMarker { index: 5, term: 3 })
            .unwrap();
        assert_eq!((store.first_index(), store.last_index()), (6, 5));
        assert!(matches!(
            store.apply_snapshot_marker(SnapshotMarker { index: 4, term: 3 }),
            Err(WalError::SnapshotMarkerRegressed { .. })
        ));
    }
}
