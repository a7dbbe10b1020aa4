//! What more than one bench builds.

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
