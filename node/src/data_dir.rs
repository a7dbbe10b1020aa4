//! The data directory: its lock, its format version and where each shard
//! keeps its files.
//!
//! ```text
//! DATA_DIR/LOCK                    flock'ed by the running node, holds its pid
//! DATA_DIR/FORMAT                  "corekv data format N", written at creation
//! DATA_DIR/shard-NNN/wal/          the shard's WAL segments
//! DATA_DIR/shard-NNN/snap/         the shard's snapshot files
//! ```

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use corekv_proto::DATA_FORMAT_VERSION;

/// The file recording the data format version.
const FORMAT_FILE: &str = "FORMAT";
/// What the format file says, before the version number.
const FORMAT_PREFIX: &str = "corekv data format ";

/// Where shard `shard` keeps its WAL.
pub fn wal_dir(data_dir: &Path, shard: u32) -> PathBuf {
    data_dir.join(shard_dir_name(shard)).join("wal")
}

/// Where shard `shard` keeps its snapshot files.
pub fn snapshot_dir(data_dir: &Path, shard: u32) -> PathBuf {
    data_dir.join(shard_dir_name(shard)).join("snap")
}

fn shard_dir_name(shard: u32) -> String {
    format!("shard-{shard:03}")
}

/// The shard a directory name names (`shard-NNN`), if it names one.
pub fn parse_shard_dir_name(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("shard-")?;
    let shard = digits.parse().ok()?;
    (shard_dir_name(shard) == name).then_some(shard)
}

/// The shard directories in a data directory, by shard.
pub fn shard_dirs(data_dir: &Path) -> std::io::Result<Vec<(u32, PathBuf)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(data_dir)? {
        let entry = entry?;
        let shard = entry.file_name().to_str().and_then(parse_shard_dir_name);
        if let (Some(shard), true) = (shard, entry.path().is_dir()) {
            found.push((shard, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// An exclusive lock on the data directory, held for the life of the node.
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Takes the lock, or fails naming the directory and the holder's pid.
    pub fn acquire(dir: &Path) -> anyhow::Result<DataDirLock> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create data dir {}", dir.display()))?;
        let path = dir.join("LOCK");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let holder = if holder.is_empty() {
                "unknown".to_string()
            } else {
                holder.to_string()
            };
            anyhow::bail!(
                "data dir {} is locked by another corekv process (pid {holder})",
                dir.display()
            );
        }
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        Ok(DataDirLock { _file: file })
    }
}

/// Checks that the data directory was written in this build's data format,
/// or records the format in a directory that holds no shard data yet. A
/// directory with shard data but no format file was written before the file
/// existed (format 1, entries in client.proto encoding) and is refused: this
/// build would misread its log.
pub fn check_format(data_dir: &Path) -> anyhow::Result<()> {
    let path = data_dir.join(FORMAT_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let found = text
                .trim()
                .strip_prefix(FORMAT_PREFIX)
                .and_then(|n| n.parse::<u32>().ok())
                .with_context(|| {
                    format!(
                        "{} does not name a data format: {:?}",
                        path.display(),
                        text.trim()
                    )
                })?;
            if found != DATA_FORMAT_VERSION {
                anyhow::bail!(
                    "data dir {} holds data format {found}, this build reads format {DATA_FORMAT_VERSION}; \
                     start this node with an empty data dir and let it catch up from the other replicas",
                    data_dir.display()
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if holds_shard_data(data_dir)? {
                anyhow::bail!(
                    "data dir {} holds data format 1 (written before {FORMAT_FILE} files), this build reads format {DATA_FORMAT_VERSION}; \
                     start this node with an empty data dir and let it catch up from the other replicas",
                    data_dir.display()
                );
            }
            write_format(data_dir, &path)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// True if the data directory holds any shard's files (it was started
/// before). A directory that does not exist holds none.
pub fn holds_shard_data(data_dir: &Path) -> anyhow::Result<bool> {
    if !data_dir.exists() {
        return Ok(false);
    }
    let entries = std::fs::read_dir(data_dir)
        .with_context(|| format!("cannot list data dir {}", data_dir.display()))?;
    for entry in entries {
        let entry =
            entry.with_context(|| format!("cannot list data dir {}", data_dir.display()))?;
        if entry.file_name().to_string_lossy().starts_with("shard-") {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Writes the format file durably (file, then directory) before any shard
/// writes data, so a crash cannot leave data without its format.
fn write_format(data_dir: &Path, path: &Path) -> anyhow::Result<()> {
    let mut file =
        File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    writeln!(file, "{FORMAT_PREFIX}{DATA_FORMAT_VERSION}")
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    File::open(data_dir)
        .and_then(|dir| dir.sync_all())
        .with_context(|| format!("cannot sync data dir {}", data_dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_dir_gets_the_format_and_a_later_start_accepts_it() {
        let dir = tempfile::tempdir().unwrap();
        check_format(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(FORMAT_FILE)).unwrap();
        assert_eq!(text, format!("corekv data format {DATA_FORMAT_VERSION}\n"));
        std::fs::create_dir_all(wal_dir(dir.path(), 0)).unwrap();
        check_format(dir.path()).unwrap();
    }

    #[test]
    fn shard_dirs_are_found_by_their_names() {
        let dir = tempfile::tempdir().unwrap();
        for shard in [1, 0, 12] {
            std::fs::create_dir_all(wal_dir(dir.path(), shard)).unwrap();
        }
        std::fs::create_dir_all(dir.path().join("shard-x")).unwrap();
        std::fs::write(dir.path().join("shard-002"), b"a file").unwrap();
        let found = shard_dirs(dir.path()).unwrap();
        assert_eq!(
            found.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![0, 1, 12]
        );
        assert_eq!(found[2].1, dir.path().join("shard-012"));
        assert_eq!(parse_shard_dir_name("shard-007"), Some(7));
        assert_eq!(parse_shard_dir_name("shard-7"), None);
        assert_eq!(parse_shard_dir_name("snap"), None);
    }

    #[test]
    fn shard_data_without_a_format_file_is_format_1_and_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(wal_dir(dir.path(), 0)).unwrap();
        let error = check_format(dir.path()).unwrap_err().to_string();
        assert!(error.contains("holds data format 1"), "{error}");
        assert!(!dir.path().join(FORMAT_FILE).exists());
    }

    #[test]
    fn another_format_is_refused_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FORMAT_FILE), "corekv data format 99\n").unwrap();
        let error = check_format(dir.path()).unwrap_err().to_string();
        assert!(error.contains("format 99"), "{error}");
        assert!(
            error.contains(&format!("reads format {DATA_FORMAT_VERSION}")),
            "{error}"
        );
        std::fs::write(dir.path().join(FORMAT_FILE), "garbage").unwrap();
        assert!(check_format(dir.path()).is_err());
    }
}
