//! State machine: apply a Put log entry to a shard's map of 100k keys, and
//! read a key back, as the scenarios do (16 B keys, 256 B values, random keys
//! over the keyspace).
//!
//! The `snapshot_stall` group measures what taking a snapshot costs the
//! shard loop with 1M keys: the O(1) view of the map, the first apply after
//! it (copy-on-write of one path), and spawning the writer thread; the
//! serialisation itself runs on that thread.
//!
//! The `map_random_keys` group puts the shard's map (`layered_map`: keys
//! in a B-tree, pairs in a hash index) beside a plain std `BTreeMap` and a
//! std `HashMap` on the same random 16 B keys over 100k and 1M keys, with
//! 256 B values: what a point get or overwrite costs when the key is not in
//! the cache, which is the case of every scenario (the bench's keys are
//! uniform over the keyspace).
//!
//! `cargo bench --bench apply`. Reported per operation.

use bytes::Bytes;
use corekv_node::command;
use corekv_node::sessions::SessionTag;
use corekv_node::state_machine::StateMachine;
use corekv_proto::client::{request::Op, Put};
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use std::time::{Duration, Instant};

const KEYSPACE: u64 = 100_000;

/// A 16-byte key, like `corekv bench --key-size 16`.
fn key(i: u64) -> Bytes {
    Bytes::from(format!("key{i:013}"))
}

/// A cheap deterministic shuffle of the keyspace, so the map is hit all over.
fn scatter(i: u64) -> u64 {
    i.wrapping_mul(6_364_136_223_846_793_005) % KEYSPACE
}

fn put_entry(i: u64) -> Bytes {
    command::encode(
        &Op::Put(Put {
            key: key(i),
            value: Bytes::from(vec![0xA5; 256]),
        }),
        SessionTag::default(),
    )
    .expect("a put is a write")
}

fn filled() -> StateMachine {
    let mut sm = StateMachine::new();
    for i in 0..KEYSPACE {
        let _ = sm.apply(i + 1, &put_entry(scatter(i)));
    }
    sm
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("state_machine");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    // Entries are encoded up front: the bench measures decode + insert.
    let entries: Vec<Bytes> = (0..4096).map(|i| put_entry(scatter(i * 7 + 3))).collect();
    let mut sm = filled();
    let mut index = sm.applied_index();
    let mut n = 0usize;
    group.bench_function("apply_put_100k_keys", |b| {
        b.iter(|| {
            index += 1;
            n = (n + 1) % entries.len();
            black_box(sm.apply(index, &entries[n]))
        })
    });
    // The same puts in an exactly-once session (what the client library
    // sends): 64 sessions, each acknowledging all but its last 16 writes.
    let mut sequences = [0u64; 64];
    for session in 0..sequences.len() as u64 {
        index += 1;
        let open = command::encode(
            &Op::OpenSession(corekv_proto::client::OpenSession { shard: 0 }),
            SessionTag::default(),
        )
        .expect("a write");
        let _ = sm.apply(index, &open);
        sequences[session as usize] = index;
    }
    let session_ids = sequences;
    let mut sequences = [0u64; 64];
    group.bench_function("apply_put_100k_keys_in_session", |b| {
        b.iter(|| {
            index += 1;
            n = (n + 1) % entries.len();
            let s = n % session_ids.len();
            sequences[s] += 1;
            let tag = SessionTag {
                session_id: session_ids[s],
                sequence: sequences[s],
                acked_below: sequences[s].saturating_sub(16).max(1),
            };
            let entry = command::encode(
                &Op::Put(Put {
                    key: key(scatter(n as u64 * 7 + 3)),
                    value: Bytes::from_static(&[0xA5; 256]),
                }),
                tag,
            )
            .expect("a write");
            black_box(sm.apply(index, &entry))
        })
    });
    group.bench_function("encode_put_in_session", |b| {
        b.iter(|| {
            n = (n + 1) % entries.len();
            black_box(command::encode(
                &Op::Put(Put {
                    key: key(scatter(n as u64 * 7 + 3)),
                    value: Bytes::from_static(&[0xA5; 256]),
                }),
                SessionTag {
                    session_id: 1,
                    sequence: n as u64,
                    acked_below: 1,
                },
            ))
        })
    });
    let keys: Vec<Bytes> = (0..4096).map(|i| key(scatter(i * 13 + 1))).collect();
    group.bench_function("get_100k_keys", |b| {
        b.iter(|| {
            n = (n + 1) % keys.len();
            black_box(sm.get(&keys[n]))
        })
    });
    group.finish();
}

fn snapshot_stall(c: &mut Criterion) {
    const KEYS: u64 = 1_000_000;
    let mut sm = StateMachine::new();
    for i in 0..KEYS {
        let _ = sm.apply(i + 1, &put_entry(i));
    }
    let mut index = sm.applied_index();
    let entries: Vec<Bytes> = (0..4096).map(|i| put_entry(i * 241 % KEYS)).collect();
    let mut n = 0usize;
    let mut group = c.benchmark_group("snapshot_stall");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    group.bench_function("take_view_1m_keys", |b| b.iter(|| black_box(sm.view())));
    group.bench_function("first_apply_after_view_1m_keys", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // A live view makes the next write copy its path.
                let view = sm.view();
                index += 1;
                n = (n + 1) % entries.len();
                let started = Instant::now();
                black_box(sm.apply(index, &entries[n]));
                total += started.elapsed();
                drop(view);
            }
            total
        })
    });
    group.bench_function("spawn_writer_thread", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let view = sm.view();
                let started = Instant::now();
                let handle = std::thread::Builder::new()
                    .name("bench-snapshot-writer".into())
                    .spawn(move || drop(view))
                    .expect("spawn");
                total += started.elapsed();
                handle.join().expect("join");
            }
            total
        })
    });
    group.finish();
}

fn map_random_keys(c: &mut Criterion) {
    use corekv_node::layered_map::Map;
    use corekv_node::state_machine::{Key, Versioned};
    use std::collections::{BTreeMap, HashMap};

    let mut group = c.benchmark_group("map_random_keys");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for keys in [100_000u64, 1_000_000] {
        let value = Versioned {
            value: Bytes::from(vec![0xA5; 256]),
            version: 1,
        };
        let stored = |i: u64| (Key::from_slice(&key(i)), value.clone());
        let mut map = Map::new();
        let mut ordered = BTreeMap::new();
        let mut hashed = HashMap::new();
        for i in 0..keys {
            let (k, v) = stored(i);
            map.insert(k.clone(), v.clone());
            ordered.insert(k.clone(), v.clone());
            hashed.insert(k, v);
        }
        // More random keys than any cache holds, visited in order. Every
        // stored value is one shared allocation, so an overwrite measures
        // the map, not the freeing of the value it replaces.
        let lookups: Vec<Bytes> = (0..1u64 << 20)
            .map(|i| key(i.wrapping_mul(6_364_136_223_846_793_005).rotate_left(29) % keys))
            .collect();
        let mut n = 0usize;
        let mut next = || {
            n = (n + 1) % lookups.len();
            &lookups[n]
        };
        group.bench_function(format!("map_get_{keys}"), |b| {
            b.iter(|| black_box(map.get(next())).is_some())
        });
        group.bench_function(format!("btree_get_{keys}"), |b| {
            b.iter(|| black_box(ordered.get(next().as_ref())).is_some())
        });
        group.bench_function(format!("hash_get_{keys}"), |b| {
            b.iter(|| black_box(hashed.get(next().as_ref())).is_some())
        });
        group.bench_function(format!("map_overwrite_{keys}"), |b| {
            b.iter(|| {
                let k = Key::from_slice(next());
                black_box(map.insert(k, value.clone()))
            })
        });
        group.bench_function(format!("btree_overwrite_{keys}"), |b| {
            b.iter(|| {
                let k = Key::from_slice(next());
                black_box(ordered.insert(k, value.clone()))
            })
        });
        group.bench_function(format!("hash_overwrite_{keys}"), |b| {
            b.iter(|| {
                let k = Key::from_slice(next());
                black_box(hashed.insert(k, value.clone()))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench, snapshot_stall, map_random_keys);
criterion_main!(benches);
