//! What more than one bench builds: the state a snapshot bench writes, and
//! its settings.

use bytes::Bytes;
use corekv_node::state_machine::{Image, Key, Map, Versioned};

/// `mib` MiB of 1 KiB values, each its own allocation as a node's are: the
/// writer reads them in the index's order, all over the heap (one value
/// shared by every key would stay in the cache and hide that cost).
pub fn image(mib: u64) -> Image {
    let mut map = Map::new();
    for i in 0..mib * 1024 {
        let value = Bytes::from(vec![i as u8; 1024]);
        let key = Bytes::from(format!("key-{i:012}"));
        map.insert(
            Key::from_slice(&key),
            Versioned {
                value,
                version: i + 1,
            },
        );
    }
    Image::new(map, Default::default())
}

/// The number in environment variable `name`, or `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A temporary directory under `COREKV_BENCH_DIR` if set, else under the
/// system's temporary directory.
pub fn bench_dir() -> tempfile::TempDir {
    let base = std::env::var_os("COREKV_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    tempfile::tempdir_in(base).expect("temp dir")
}
