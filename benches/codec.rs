//! Frame codec: encode a client Put into a frame, split the frame out of the
//! read buffer and decode it back, for a 64 B and a 4 KiB value.
//!
//! `cargo bench --bench codec`. The `codec_frames` group reports frames/s,
//! `codec_bytes` the same work as bytes/s of frame.

use bytes::{Bytes, BytesMut};
use corekv_proto::client::{request::Op, Put, Request};
use corekv_transport::{decode_message, encode_frame, FrameDecoder, DEFAULT_MAX_FRAME_BYTES};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use std::time::Duration;

/// Value sizes: a small write and a page-sized one.
const PAYLOAD_SIZES: [(usize, &str); 2] = [(64, "64B"), (4096, "4KiB")];

fn put(value_len: usize) -> Request {
    Request {
        id: 12_345,
        no_forward: false,
        op: Some(Op::Put(Put {
            key: Bytes::from_static(b"user:0000000042"),
            value: Bytes::from(vec![0xA5; value_len]),
        })),
        ..Default::default()
    }
}

/// One encode + decode round, reusing the buffer as a connection would.
fn encode_decode(request: &Request, buf: &mut BytesMut, decoder: &mut FrameDecoder) -> Request {
    encode_frame(request, buf);
    let payload = decoder
        .decode(buf)
        .expect("valid frame")
        .expect("complete frame");
    decode_message(payload).expect("valid message")
}

fn bench_group(c: &mut Criterion, group_name: &str, per_bytes: bool) {
    let mut group = c.benchmark_group(group_name);
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (value_len, label) in PAYLOAD_SIZES {
        let request = put(value_len);
        let mut buf = BytesMut::with_capacity(64 << 10);
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
        let frame_len = {
            let mut probe = BytesMut::new();
            encode_frame(&request, &mut probe);
            probe.len() as u64
        };
        group.throughput(if per_bytes {
            Throughput::Bytes(frame_len)
        } else {
            Throughput::Elements(1)
        });
        group.bench_function(format!("put_{label}"), |b| {
            b.iter(|| black_box(encode_decode(black_box(&request), &mut buf, &mut decoder)))
        });
    }
    group.finish();
}

fn codec(c: &mut Criterion) {
    bench_group(c, "codec_frames", false);
    bench_group(c, "codec_bytes", true);
}

criterion_group!(benches, codec);
criterion_main!(benches);
