//! Crash consistency, in the style of redb's crash_consistency test: a model
//! tracks which bytes are durable (the segment files as they were when the
//! last sync returned Ok) apart from bytes written since. A "crash" keeps the
//! durable bytes plus some of the rest (a prefix in append order, or random
//! pages, optionally with garbage where the rest was), then the WAL is
//! reopened and must return everything synced, and nothing that was never
//! written.
//!
//! Retired segments are kept as free files and reused (a small
//! `recycle_bytes`), so new segments start full of old records; a crash may
//! leave a reused file under its new name or put it back under its free name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use corekv_wal::{ConfState, EntryRef, HardState, SnapshotMarker, Wal, WalOptions};
use proptest::prelude::*;

const SEGMENT_BYTES: u64 = 4096;
const PAGE_BYTES: usize = 4096;

#[derive(Clone, Debug)]
enum Op {
    /// Append `count` entries of `data_len` bytes, starting `back` entries
    /// before the end (a raft log conflict when `back > 0`).
    Append {
        back: u8,
        count: u8,
        data_len: u16,
    },
    HardState {
        vote: u8,
        commit_back: u8,
    },
    ConfState {
        voters: u8,
    },
    /// A snapshot of the log up to `back` entries before its end.
    Compact {
        back: u8,
    },
    /// A snapshot from a leader of a newer term at `last_index + ahead`
    /// (inside the log when `ahead <= 0`): replaces the whole log.
    InstallSnapshot {
        ahead: i8,
    },
    Sync,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..4, 1u8..8, 0u16..400).prop_map(|(back, count, data_len)| Op::Append { back, count, data_len }),
        2 => (0u8..4, 0u8..4).prop_map(|(vote, commit_back)| Op::HardState { vote, commit_back }),
        1 => (1u8..6).prop_map(|voters| Op::ConfState { voters }),
        1 => (0u8..8).prop_map(|back| Op::Compact { back }),
        1 => (-3i8..4).prop_map(|ahead| Op::InstallSnapshot { ahead }),
        3 => Just(Op::Sync),
    ]
}

#[derive(Clone, Debug)]
enum CrashMode {
    /// Keep a prefix (in append order) of the bytes written since the last sync.
    Prefix { per_mille: u16 },
    /// Keep a random subset of the pages written since the last sync, as a
    /// kernel writing back dirty pages in any order would.
    Pages { seed: u64 },
}

#[derive(Clone, Debug)]
struct Crash {
    mode: CrashMode,
    /// Overwrite part of what was not kept with random bytes (a torn write).
    garbage: Option<u64>,
    /// Whether segment files created since the last sync survive (their
    /// directory entries may not be durable).
    new_files_survive: bool,
}

fn crash() -> impl Strategy<Value = Crash> {
    let mode = prop_oneof![
        // The two ends are the strongest checks (exactly the synced state,
        // exactly the current state), so they get their own weight.
        1 => Just(CrashMode::Prefix { per_mille: 0 }),
        1 => Just(CrashMode::Prefix { per_mille: 1000 }),
        3 => (0u16..=1000).prop_map(|per_mille| CrashMode::Prefix { per_mille }),
        3 => any::<u64>().prop_map(|seed| CrashMode::Pages { seed }),
    ];
    (
        mode,
        proptest::option::weighted(0.3, any::<u64>()),
        proptest::bool::weighted(0.8),
    )
        .prop_map(|(mode, garbage, new_files_survive)| Crash {
            mode,
            garbage,
            new_files_survive,
        })
}

/// What the log should hold.
#[derive(Clone, Default, PartialEq, Eq)]
struct State {
    marker: SnapshotMarker,
    /// (index, term, entry type, data), contiguous from marker.index + 1.
    entries: Vec<(u64, u64, u8, Vec<u8>)>,
    hard_state: HardState,
    conf_state: Option<ConfState>,
}

/// Entries print as (index, term, type, length, hash of data): a failing case
/// stays readable.
impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::hash::{Hash, Hasher};
        let entries: Vec<_> = self
            .entries
            .iter()
            .map(|(index, term, entry_type, data)| {
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                data.hash(&mut hasher);
                (
                    *index,
                    *term,
                    *entry_type,
                    data.len(),
                    hasher.finish() as u16,
                )
            })
            .collect();
        f.debug_struct("State")
            .field("marker", &self.marker)
            .field("hard_state", &self.hard_state)
            .field("conf_state", &self.conf_state)
            .field("entries", &entries)
            .finish()
    }
}

impl State {
    fn last_index(&self) -> u64 {
        self.marker.index + self.entries.len() as u64
    }

    fn term(&self, index: u64) -> Option<u64> {
        if index == self.marker.index {
            return Some(self.marker.term);
        }
        let offset = index.checked_sub(self.marker.index + 1)?;
        self.entries.get(offset as usize).map(|e| e.1)
    }

    fn read(wal: &Wal) -> State {
        let mut entries = Vec::new();
        wal.entries(wal.first_index(), wal.last_index() + 1, None, |e| {
            entries.push((e.index, e.term, e.entry_type, e.data.to_vec()))
        })
        .expect("the whole log is readable");
        assert_eq!(
            wal.term(wal.first_index() - 1),
            Some(wal.snapshot_marker().term)
        );
        State {
            marker: wal.snapshot_marker(),
            entries,
            hard_state: wal.hard_state(),
            conf_state: wal.conf_state(),
        }
    }
}

/// Drives the WAL and the model side by side.
struct Harness {
    dir: PathBuf,
    wal: Option<Wal>,
    state: State,
    current_term: u64,
    /// The state as of the last successful sync, and every state since.
    synced: State,
    since_sync: Vec<State>,
    destructive_since_sync: bool,
    /// Segment and free file name -> bytes, as of the last successful sync.
    durable: BTreeMap<String, Vec<u8>>,
    /// Their inodes then: a new segment with a free file's inode reused it.
    durable_inodes: BTreeMap<String, u64>,
    data_counter: u64,
}

/// Bytes the preparer zeroes (and syncs) in a free file before reusing it:
/// the header and the first record's length.
const ZEROED_ON_REUSE: usize = 32 + 8;

fn options() -> WalOptions {
    WalOptions {
        segment_bytes: SEGMENT_BYTES,
        shard_id: 9,
        recycle_bytes: 4 * SEGMENT_BYTES,
    }
}

fn is_log_file(name: &str) -> bool {
    name.ends_with(".wal") || name.ends_with(".free")
}

fn segment_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| is_log_file(&e.file_name().to_string_lossy()))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn inodes(dir: &Path) -> BTreeMap<String, u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| is_log_file(&e.file_name().to_string_lossy()))
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, e.metadata().unwrap().ino())
        })
        .collect()
}

/// Small deterministic generator, so a proptest case replays exactly.
fn next_random(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

impl Harness {
    fn open(dir: PathBuf) -> Harness {
        let mut wal = Wal::open(&dir, options()).expect("open");
        // The preparer may be renaming a free file: let it finish before
        // the files are read.
        wal.wait_for_next_segment();
        let state = State::read(&wal);
        let durable = segment_files(&dir);
        let durable_inodes = inodes(&dir);
        Harness {
            dir,
            current_term: state
                .marker
                .term
                .max(state.entries.last().map_or(0, |e| e.1))
                .max(1),
            synced: state.clone(),
            since_sync: vec![state.clone()],
            state,
            wal: Some(wal),
            destructive_since_sync: false,
            durable,
            durable_inodes,
            data_counter: 0,
        }
    }

    /// The open WAL, with its next segment ready: this model tests what is
    /// durable, not rotation's refusal to wait (the WAL's own tests do).
    fn wal(&mut self) -> &mut Wal {
        let wal = self.wal.as_mut().expect("open");
        wal.wait_for_next_segment();
        wal
    }

    fn data(&mut self, len: usize) -> Vec<u8> {
        self.data_counter += 1;
        let mut seed = self.data_counter.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len).map(|_| next_random(&mut seed) as u8).collect()
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Append {
                back,
                count,
                data_len,
            } => self.append(back, count, data_len),
            Op::HardState { vote, commit_back } => {
                let hard_state = HardState {
                    term: self.current_term,
                    vote: u64::from(vote),
                    commit: self
                        .state
                        .last_index()
                        .saturating_sub(u64::from(commit_back)),
                };
                self.wal().set_hard_state(hard_state).unwrap();
                self.state.hard_state = hard_state;
            }
            Op::ConfState { voters } => {
                let conf_state = ConfState {
                    voters: (1..=u64::from(voters)).collect(),
                    learners: vec![u64::from(voters) + 1],
                };
                self.wal().set_conf_state(&conf_state).unwrap();
                self.state.conf_state = Some(conf_state);
            }
            Op::Compact { back } => {
                let index = self
                    .state
                    .last_index()
                    .saturating_sub(u64::from(back))
                    .max(self.state.marker.index);
                let marker = SnapshotMarker {
                    index,
                    term: self.state.term(index).unwrap(),
                };
                self.wal().apply_snapshot_marker(marker).unwrap();
                let covered = (index - self.state.marker.index) as usize;
                self.state.entries.drain(..covered);
                self.state.marker = marker;
            }
            Op::InstallSnapshot { ahead } => {
                self.current_term += 1;
                let index = self
                    .state
                    .last_index()
                    .saturating_add_signed(i64::from(ahead))
                    .max(self.state.marker.index);
                let marker = SnapshotMarker {
                    index,
                    term: self.current_term,
                };
                self.wal().apply_snapshot_marker(marker).unwrap();
                self.state.entries.clear();
                self.state.marker = marker;
                self.destructive_since_sync = true;
            }
            Op::Sync => self.sync(),
        }
        if !matches!(op, Op::Sync) {
            self.since_sync.push(self.state.clone());
        }
    }

    fn append(&mut self, back: u8, count: u8, data_len: u16) {
        let held = self.state.entries.len() as u64;
        let back = u64::from(back).min(held);
        if back > 0 {
            // A new leader overwrites the suffix with entries of its term.
            self.current_term += 1;
            self.destructive_since_sync = true;
        }
        let first = self.state.last_index() + 1 - back;
        let entries: Vec<(u64, u64, u8, Vec<u8>)> = (0..u64::from(count))
            .map(|i| {
                let data = self.data(data_len as usize + i as usize);
                (first + i, self.current_term, (i % 2) as u8, data)
            })
            .collect();
        let refs: Vec<EntryRef<'_>> = entries
            .iter()
            .map(|(index, term, entry_type, data)| EntryRef {
                index: *index,
                term: *term,
                entry_type: *entry_type,
                data,
            })
            .collect();
        self.wal
            .as_mut()
            .unwrap()
            .append_entries_waiting(&refs)
            .unwrap();
        self.state.entries.truncate((held - back) as usize);
        self.state.entries.extend(entries);
    }

    fn sync(&mut self) {
        let wal = self.wal();
        wal.sync().unwrap();
        let retired = wal.take_obsolete_segments();
        corekv_wal::remove_segments(retired, options().recycle_bytes).unwrap();
        self.durable = segment_files(&self.dir);
        self.durable_inodes = inodes(&self.dir);
        self.synced = self.state.clone();
        self.since_sync = vec![self.state.clone()];
        self.destructive_since_sync = false;
    }

    /// Kills the WAL and rewrites its files as a crash could have left them.
    /// Returns whether the image is exactly the durable one, or exactly the
    /// current one (for the strongest checks).
    fn crash(&mut self, crash: &Crash) -> (bool, bool) {
        drop(self.wal.take());
        let current = segment_files(&self.dir);
        let current_inodes = inodes(&self.dir);
        // Free files taken for new segments since the last sync, by inode:
        // their durable bytes (header zeroed, synced) are the new file's
        // starting point, and a crash that loses the rename puts them back.
        let reused_from = |name: &str| -> Option<&String> {
            let inode = current_inodes.get(name)?;
            self.durable_inodes
                .iter()
                .find(|(free, i)| *i == inode && free.ends_with(".free"))
                .map(|(free, _)| free)
        };
        let reused_base = |free: &String| {
            let mut bytes = self.durable[free].clone();
            bytes[..ZEROED_ON_REUSE].fill(0);
            bytes
        };
        // Bytes written since the last sync, in append order: segment files in
        // sequence order (the names sort that way), offsets ascending.
        let mut image: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut restored: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut changed: Vec<(String, usize)> = Vec::new();
        for (name, bytes) in &current {
            let base = match (self.durable.get(name), reused_from(name)) {
                (Some(durable), _) if durable.len() == bytes.len() => durable.clone(),
                // Seen while the WAL's helper thread was still creating it
                // (fallocate not done): it had no content yet.
                (Some(_), _) => vec![0u8; bytes.len()],
                (None, Some(free)) if crash.new_files_survive => reused_base(free),
                (None, Some(free)) => {
                    restored.insert(free.clone(), reused_base(free));
                    continue;
                }
                (None, None) if crash.new_files_survive => vec![0u8; bytes.len()],
                (None, None) => continue,
            };
            changed.extend(
                (0..bytes.len())
                    .filter(|&i| base[i] != bytes[i])
                    .map(|i| (name.clone(), i)),
            );
            image.insert(name.clone(), base);
        }
        // Records in a segment created since the last sync are lost even if
        // every byte reached the disk: its header is written only by a sync.
        let no_new_files = current.keys().all(|name| self.durable.contains_key(name));
        let kept: Vec<bool> = match crash.mode {
            CrashMode::Prefix { per_mille } => {
                let keep = changed.len() * per_mille as usize / 1000;
                (0..changed.len()).map(|i| i < keep).collect()
            }
            CrashMode::Pages { seed } => {
                let mut seed = seed | 1;
                let mut pages: BTreeMap<(String, usize), bool> = BTreeMap::new();
                changed
                    .iter()
                    .map(|(name, offset)| {
                        *pages
                            .entry((name.clone(), offset / PAGE_BYTES))
                            .or_insert_with(|| next_random(&mut seed) % 2 == 0)
                    })
                    .collect()
            }
        };
        for ((name, offset), keep) in changed.iter().zip(&kept) {
            if *keep {
                image.get_mut(name).unwrap()[*offset] = current[name][*offset];
            }
        }
        let lost: Vec<&(String, usize)> = changed
            .iter()
            .zip(&kept)
            .filter(|(_, k)| !**k)
            .map(|(c, _)| c)
            .collect();
        let mut garbage_written = false;
        if let (Some(seed), false) = (crash.garbage, lost.is_empty()) {
            let mut seed = seed | 1;
            let start = next_random(&mut seed) as usize % lost.len();
            let length = 1 + next_random(&mut seed) as usize % 64;
            for (name, offset) in lost.iter().skip(start).take(length) {
                image.get_mut(name).unwrap()[*offset] = next_random(&mut seed) as u8;
                garbage_written = true;
            }
        }
        for name in current.keys() {
            let path = self.dir.join(name);
            match image.get(name) {
                Some(bytes) => std::fs::write(&path, bytes).unwrap(),
                None => std::fs::remove_file(&path).unwrap(),
            }
        }
        for (name, bytes) in &restored {
            std::fs::write(self.dir.join(name), bytes).unwrap();
        }
        let nothing_kept = kept.iter().all(|k| !k) && !garbage_written;
        let everything_kept = kept.iter().all(|k| *k) && no_new_files;
        (nothing_kept, everything_kept)
    }

    /// Reopens after a crash and checks what came back.
    fn recover_and_check(
        &mut self,
        exactly_synced: bool,
        exactly_current: bool,
    ) -> Result<(), TestCaseError> {
        let wal = match Wal::open(&self.dir, options()) {
            Ok(mut wal) => {
                wal.wait_for_next_segment();
                wal
            }
            Err(error) => {
                return Err(TestCaseError::fail(format!(
                    "reopen after a crash failed: {error}"
                )))
            }
        };
        let recovered = State::read(&wal);
        if exactly_synced {
            prop_assert_eq!(&recovered, &self.synced, "only the durable bytes survived");
        }
        if exactly_current {
            prop_assert_eq!(&recovered, &self.state, "every byte survived");
        }
        // Hard state, conf state and marker: the synced one or one written later.
        prop_assert!(
            self.since_sync
                .iter()
                .any(|s| s.hard_state == recovered.hard_state),
            "hard state {:?} was never written since the last sync ({:?})",
            recovered.hard_state,
            self.synced.hard_state
        );
        prop_assert!(self
            .since_sync
            .iter()
            .any(|s| s.conf_state == recovered.conf_state));
        prop_assert!(
            self.since_sync.iter().any(|s| s.marker == recovered.marker),
            "snapshot marker {:?} was never written since the last sync",
            recovered.marker
        );
        // Every entry returned was written (identical) at some point since.
        for entry in &recovered.entries {
            let written = self.since_sync.iter().any(|s| {
                entry.0 > s.marker.index
                    && s.entries.get((entry.0 - s.marker.index - 1) as usize) == Some(entry)
            });
            prop_assert!(
                written,
                "entry {} (term {}) was never written",
                entry.0,
                entry.1
            );
        }
        // Nothing synced is lost, unless a later write replaced it.
        if !self.destructive_since_sync {
            for entry in self
                .synced
                .entries
                .iter()
                .filter(|e| e.0 > recovered.marker.index)
            {
                let offset = (entry.0 - recovered.marker.index - 1) as usize;
                prop_assert_eq!(
                    recovered.entries.get(offset),
                    Some(entry),
                    "synced entry {} lost",
                    entry.0
                );
            }
        }
        self.wal = Some(wal);
        self.state = recovered.clone();
        self.current_term = self.current_term.max(recovered.marker.term);
        self.synced = recovered.clone();
        self.since_sync = vec![recovered];
        self.destructive_since_sync = false;
        self.durable = segment_files(&self.dir);
        self.durable_inodes = inodes(&self.dir);
        Ok(())
    }
}

/// A directory on tmpfs when there is one: fsync there is free, so a thousand
/// cases stay fast; the crash itself is simulated, not left to the disk.
fn test_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::tempdir_in(shm) {
            return dir;
        }
    }
    tempfile::tempdir().unwrap()
}

proptest! {
    #[test]
    fn recovery_returns_every_synced_record_and_nothing_unwritten(
        rounds in prop::collection::vec((prop::collection::vec(op(), 1..40), crash()), 1..4)
    ) {
        let dir = test_dir();
        let mut harness = Harness::open(dir.path().to_path_buf());
        for (ops, crash) in &rounds {
            for op in ops {
                harness.apply(op);
            }
            let (exactly_synced, exactly_current) = harness.crash(crash);
            harness.recover_and_check(exactly_synced, exactly_current)?;
        }
    }
}
