//! State machine: apply a Put log entry to a shard's map of 100k keys, and
//! read a key back, as the scenarios do (16 B keys, 256 B values, random keys
//! over the keyspace).
//!
//! `cargo bench --bench apply`. Reported per operation.

use bytes::Bytes;
use corekv_node::state_machine::{encode_command, StateMachine};
use corekv_proto::client::{request::Op, Put};
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use std::time::Duration;

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
    encode_command(&Op::Put(Put {
        key: key(i),
        value: Bytes::from(vec![0xA5; 256]),
    }))
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
    let keys: Vec<Bytes> = (0..4096).map(|i| key(scatter(i * 13 + 1))).collect();
    group.bench_function("get_100k_keys", |b| {
        b.iter(|| {
            n = (n + 1) % keys.len();
            black_box(sm.get(&keys[n]))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
