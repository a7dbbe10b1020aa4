//! The frame codec: every corekv connection carries a sequence of frames.
//!
//! ```text
//! +----------------+------------------------------+
//! | len: u32 (BE)  | payload: `len` bytes         |
//! +----------------+------------------------------+
//!   FRAME_HEADER_LEN   one prost-encoded message
//! ```
//!
//! `len` counts the payload only. A receiver refuses any `len` above its
//! `max_frame_bytes` as soon as the header has arrived, before it allocates
//! anything for the payload. Decoding is sans-IO: [`FrameDecoder`] works on a
//! `BytesMut` that the caller fills, so it can be driven by a socket, a test or
//! a fuzzer alike.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Largest payload a receiver accepts unless configured otherwise (16 MiB).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 16 << 20;

/// Bytes of the length prefix in front of every payload.
pub const FRAME_HEADER_LEN: usize = 4;

/// Spare capacity one socket read asks for when nothing says more is needed.
/// Also the most the read buffer grows beyond what the current frame needs, so
/// a connection costs at most `max_frame_bytes + FRAME_HEADER_LEN + READ_CHUNK_BYTES`.
pub(crate) const READ_CHUNK_BYTES: usize = 64 << 10;

/// Why a frame could not be read or decoded. Every variant ends the
/// connection: after it, the byte stream can no longer be trusted to be
/// aligned on frame boundaries.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than this receiver accepts.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes (max_frame_bytes)")]
    FrameTooLarge {
        /// Payload length announced by the header.
        len: usize,
        /// The receiver's `max_frame_bytes`.
        max: usize,
    },
    /// The bytes are a TLS record, not a frame (whose length would be over
    /// any limit): TLS on one side of the connection only.
    #[error(
        "got a TLS record where a corekv frame was expected: the other side speaks TLS \
         and this connection is plaintext"
    )]
    TlsRecord,
    /// The connection ended in the middle of a frame.
    #[error("connection ended mid-frame: expected {expected} bytes, got {got}")]
    Truncated {
        /// Bytes of the frame (header included) that were due.
        expected: usize,
        /// Bytes of it that arrived.
        got: usize,
    },
    /// The payload is not a valid protobuf message of the expected type.
    #[error("undecodable frame payload: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The socket failed.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    /// The connection was already closed or failed before this read.
    #[error("connection already closed")]
    Closed,
}

/// Appends one frame (length prefix, then `msg`) to `out`.
///
/// # Panics
///
/// Panics if the encoded message is larger than `u32::MAX` bytes, which no
/// receiver could accept anyway.
pub fn encode_frame<M: prost::Message>(msg: &M, out: &mut BytesMut) {
    let len = msg.encoded_len();
    let len_u32 = u32::try_from(len)
        .unwrap_or_else(|_| panic!("message of {len} bytes does not fit a frame length prefix"));
    out.reserve(FRAME_HEADER_LEN + len);
    out.put_u32(len_u32);
    msg.encode(out)
        .expect("capacity was reserved for the whole message");
}

/// Encodes one frame into its own buffer, ready for [`crate::FrameSender::send`].
pub fn encode_frame_bytes<M: prost::Message>(msg: &M) -> Bytes {
    let mut out = BytesMut::with_capacity(FRAME_HEADER_LEN + msg.encoded_len());
    encode_frame(msg, &mut out);
    out.freeze()
}

/// Decodes one payload returned by [`FrameDecoder::decode`]. Decoding from
/// `Bytes` lets prost keep every `bytes` field as a slice of `payload` instead
/// of copying it.
pub fn decode_message<M: prost::Message + Default>(payload: Bytes) -> Result<M, FrameError> {
    Ok(M::decode(payload)?)
}

/// Splits frames out of a byte buffer (sans-IO).
///
/// The caller appends received bytes to a `BytesMut` and calls
/// [`decode`](Self::decode) until it returns `Ok(None)`; before the next read
/// it may call [`reserve_for_read`](Self::reserve_for_read) to get spare
/// capacity that never exceeds the frame limit by more than a bounded chunk.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    /// Largest payload accepted, in bytes.
    max_frame_bytes: usize,
}

impl FrameDecoder {
    /// A decoder that refuses payloads over `max_frame_bytes`.
    pub fn new(max_frame_bytes: usize) -> Self {
        Self { max_frame_bytes }
    }

    /// The payload limit this decoder enforces.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }

    /// Takes one complete frame's payload out of `buf`, without copying it
    /// (the returned `Bytes` shares `buf`'s allocation). `Ok(None)` means the
    /// frame is not complete yet: read more bytes into `buf` and call again.
    ///
    /// A header announcing more than `max_frame_bytes` is an error as soon as
    /// the four header bytes are there; nothing is allocated for it.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        let Some(len) = self.pending_len(buf)? else {
            return Ok(None);
        };
        if buf.len() < FRAME_HEADER_LEN + len {
            return Ok(None);
        }
        buf.advance(FRAME_HEADER_LEN);
        Ok(Some(buf.split_to(len).freeze()))
    }

    /// Makes sure `buf` has spare capacity for the next read, growing it by
    /// at most what the current frame still needs or [`READ_CHUNK_BYTES`],
    /// whichever is larger, and never by more than the bytes already held
    /// plus one chunk (so a peer that announces a large frame and then sends
    /// nothing costs one chunk, not the frame). Call it after
    /// [`decode`](Self::decode) returned `Ok(None)`.
    pub fn reserve_for_read(&self, buf: &mut BytesMut) {
        let len = buf.len();
        // Bytes still missing for the frame at the front of `buf`; a header
        // that is not complete yet (or is already known to be invalid, which
        // the next decode reports) asks for one chunk.
        let missing = match self.pending_len(buf) {
            Ok(Some(frame_len)) => (FRAME_HEADER_LEN + frame_len).saturating_sub(len),
            _ => READ_CHUNK_BYTES,
        };
        let spare = buf.capacity() - len;
        if spare >= missing.min(READ_CHUNK_BYTES) && spare > 0 {
            return;
        }
        // Grow geometrically (by what is held) so a large frame costs O(n)
        // copies in total, but never past the end of the current frame unless
        // the frame is smaller than a chunk.
        let additional = READ_CHUNK_BYTES.max(missing.min(len));
        let mut grown = BytesMut::with_capacity(len + additional);
        grown.extend_from_slice(buf);
        *buf = grown;
    }

    /// The error to report when the stream ends with `buf` still holding
    /// bytes, or `None` when it ends cleanly on a frame boundary.
    pub(crate) fn truncation(&self, buf: &BytesMut) -> Option<FrameError> {
        if buf.is_empty() {
            return None;
        }
        let expected = match self.pending_len(buf) {
            Ok(Some(len)) => FRAME_HEADER_LEN + len,
            _ => FRAME_HEADER_LEN,
        };
        Some(FrameError::Truncated {
            expected,
            got: buf.len(),
        })
    }

    /// The payload length announced by the header at the front of `buf`, if
    /// the header is complete; refuses lengths over the limit.
    fn pending_len(&self, buf: &BytesMut) -> Result<Option<usize>, FrameError> {
        let Some(header) = buf.get(..FRAME_HEADER_LEN) else {
            return Ok(None);
        };
        let header: [u8; FRAME_HEADER_LEN] = header.try_into().expect("slice of header length");
        let len = u32::from_be_bytes(header) as usize;
        if len > self.max_frame_bytes && crate::tls::looks_like_tls_record(header) {
            return Err(FrameError::TlsRecord);
        }
        if len > self.max_frame_bytes {
            return Err(FrameError::FrameTooLarge {
                len,
                max: self.max_frame_bytes,
            });
        }
        Ok(Some(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corekv_proto::{client, peer};
    use proptest::prelude::*;
    use prost::Message;

    fn decode_all(decoder: &mut FrameDecoder, buf: &mut BytesMut) -> Vec<Bytes> {
        let mut out = Vec::new();
        while let Some(payload) = decoder.decode(buf).expect("valid frames") {
            out.push(payload);
        }
        out
    }

    #[test]
    fn header_is_big_endian_payload_length() {
        let frame = encode_frame_bytes(&peer::HelloAck { node_id: 300 });
        let payload_len = peer::HelloAck { node_id: 300 }.encoded_len();
        assert_eq!(&frame[..4], &(payload_len as u32).to_be_bytes());
        assert_eq!(frame.len(), FRAME_HEADER_LEN + payload_len);
    }

    #[test]
    fn oversize_header_is_refused_before_the_payload_arrives() {
        let mut decoder = FrameDecoder::new(1024);
        let mut buf = BytesMut::from(&1025u32.to_be_bytes()[..]);
        match decoder.decode(&mut buf) {
            Err(FrameError::FrameTooLarge { len, max }) => assert_eq!((len, max), (1025, 1024)),
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        // A frame of exactly the limit is fine.
        let mut buf = BytesMut::from(&1024u32.to_be_bytes()[..]);
        buf.extend_from_slice(&[7; 1024]);
        assert_eq!(decoder.decode(&mut buf).unwrap().unwrap().len(), 1024);
    }

    #[test]
    fn empty_payload_is_a_frame() {
        let mut decoder = FrameDecoder::new(16);
        let mut buf = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert_eq!(decoder.decode(&mut buf).unwrap(), Some(Bytes::new()));
        assert!(buf.is_empty());
        assert_eq!(decoder.decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn decoded_bytes_fields_share_the_read_buffer() {
        let value = Bytes::from(vec![42u8; 4096]);
        let request = client::Request {
            id: 1,
            no_forward: false,
            op: Some(client::request::Op::Put(client::Put {
                key: Bytes::from_static(b"k"),
                value,
            })),
            ..Default::default()
        };
        let mut buf = BytesMut::new();
        encode_frame(&request, &mut buf);
        let range = buf.as_ptr_range();
        let payload = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES)
            .decode(&mut buf)
            .unwrap()
            .unwrap();
        let decoded: client::Request = decode_message(payload).unwrap();
        let Some(client::request::Op::Put(put)) = decoded.op else {
            panic!("decoded the wrong op");
        };
        // Zero copy: the value points into the buffer the frame was read into.
        assert!(range.contains(&put.value.as_ptr()), "value was copied");
    }

    #[test]
    fn truncation_reports_what_was_due() {
        let decoder = FrameDecoder::new(100);
        assert!(decoder.truncation(&BytesMut::new()).is_none());
        match decoder.truncation(&BytesMut::from(&[0u8, 0][..])) {
            Some(FrameError::Truncated {
                expected: 4,
                got: 2,
            }) => {}
            other => panic!("unexpected {other:?}"),
        }
        match decoder.truncation(&BytesMut::from(&[0u8, 0, 0, 10, 1, 2][..])) {
            Some(FrameError::Truncated {
                expected: 14,
                got: 6,
            }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn reserve_for_read_grows_towards_a_large_frame_in_bounded_steps() {
        let max = 1 << 20;
        let mut decoder = FrameDecoder::new(max);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&(max as u32).to_be_bytes());
        // Nothing but the header has arrived: only one chunk may be reserved.
        decoder.reserve_for_read(&mut buf);
        assert!(buf.capacity() <= FRAME_HEADER_LEN + READ_CHUNK_BYTES);
        // Feed the frame in small reads, as a slow peer would.
        let mut fed = 0;
        while fed < max {
            decoder.reserve_for_read(&mut buf);
            let spare = buf.capacity() - buf.len();
            assert!(spare > 0);
            let n = spare.min(max - fed).min(10_000);
            buf.extend_from_slice(&vec![1u8; n]);
            fed += n;
            assert!(
                buf.capacity() <= max + FRAME_HEADER_LEN + READ_CHUNK_BYTES,
                "capacity {} after {fed} bytes",
                buf.capacity()
            );
        }
        assert_eq!(decoder.decode(&mut buf).unwrap().unwrap().len(), max);
    }

    // ---- property tests -------------------------------------------------

    fn bytes_strategy(max_len: usize) -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..max_len).prop_map(Bytes::from)
    }

    fn request_strategy() -> impl Strategy<Value = client::Request> {
        use client::request::Op;
        let op = prop_oneof![
            (bytes_strategy(64), bytes_strategy(512))
                .prop_map(|(key, value)| Op::Put(client::Put { key, value })),
            (bytes_strategy(64), any::<i32>(), any::<bool>()).prop_map(
                |(key, consistency, local)| Op::Get(client::Get {
                    key,
                    consistency,
                    local
                })
            ),
            (bytes_strategy(64), any::<Option<u64>>()).prop_map(|(key, expected_version)| {
                Op::Delete(client::Delete {
                    key,
                    expected_version,
                })
            }),
            (bytes_strategy(64), any::<u64>(), bytes_strategy(512)).prop_map(
                |(key, expected_version, value)| Op::Cas(client::CompareAndSwap {
                    key,
                    expected_version,
                    value,
                })
            ),
            (
                bytes_strategy(64),
                bytes_strategy(64),
                any::<u32>(),
                any::<i32>(),
                any::<Option<u32>>(),
                any::<bool>()
            )
                .prop_map(|(start, end, limit, consistency, shard, local)| {
                    Op::Scan(client::Scan {
                        start,
                        end,
                        limit,
                        consistency,
                        shard,
                        local,
                    })
                }),
            Just(Op::Topology(client::Topology {})),
            Just(Op::Status(client::Status {})),
        ];
        (
            any::<u64>(),
            any::<bool>(),
            proptest::option::of(op),
            any::<[u64; 3]>(),
        )
            .prop_map(
                |(id, no_forward, op, [session_id, sequence, acked_below])| client::Request {
                    id,
                    no_forward,
                    op,
                    session_id,
                    sequence,
                    acked_below,
                },
            )
    }

    fn response_strategy() -> impl Strategy<Value = client::Response> {
        use client::response::Result as R;
        let key_value = (bytes_strategy(32), bytes_strategy(128), any::<u64>()).prop_map(
            |(key, value, version)| client::KeyValue {
                key,
                value,
                version,
            },
        );
        let node = (any::<u64>(), ".{0,16}", any::<u32>(), any::<u32>()).prop_map(
            |(node_id, host, client_port, peer_port)| client::NodeInfo {
                node_id,
                host,
                client_port,
                peer_port,
                admin_port: client_port ^ peer_port,
            },
        );
        let shard_status =
            (any::<[u64; 6]>(), ".{0,20}").prop_map(|(v, disk_full)| client::ShardStatus {
                shard: v[0] as u32,
                role: (v[1] % 4) as i32,
                term: v[2],
                leader_id: v[3],
                commit_index: v[4],
                applied_index: v[5],
                last_index: v[5] ^ v[4],
                disk_full,
                state_machine_bytes: v[0] ^ v[2],
                state_machine_keys: v[1] ^ v[3],
                leader_last_index: v[4] ^ v[3],
                membership: None,
                removed: v[0] % 2 == 1,
            });
        let result = prop_oneof![
            (
                any::<i32>(),
                ".{0,40}",
                any::<u64>(),
                ".{0,20}",
                any::<u64>()
            )
                .prop_map(
                    |(code, message, leader_id, leader_addr, current_version)| R::Error(
                        client::Error {
                            code,
                            message,
                            leader_id,
                            leader_addr,
                            current_version,
                        }
                    )
                ),
            any::<u64>().prop_map(|version| R::Write(client::WriteResult { version })),
            (any::<bool>(), bytes_strategy(512), any::<u64>()).prop_map(
                |(found, value, version)| R::Get(client::GetResult {
                    found,
                    value,
                    version,
                })
            ),
            any::<bool>().prop_map(|deleted| R::Delete(client::DeleteResult { deleted })),
            (proptest::collection::vec(key_value, 0..8), any::<bool>())
                .prop_map(|(pairs, more)| R::Scan(client::ScanResult { pairs, more })),
            (
                any::<u64>(),
                any::<u32>(),
                proptest::collection::vec(node, 0..4),
                proptest::collection::vec(any::<u64>(), 0..8)
            )
                .prop_map(|(cluster_id, shards, nodes, leaders)| R::Topology(
                    client::TopologyResult {
                        cluster_id,
                        shards,
                        nodes,
                        leaders,
                    }
                )),
            (any::<u64>(), proptest::collection::vec(shard_status, 0..4))
                .prop_map(|(node_id, shards)| R::Status(client::StatusResult { node_id, shards })),
        ];
        (any::<u64>(), proptest::option::of(result))
            .prop_map(|(id, result)| client::Response { id, result })
    }

    fn peer_frame_strategy() -> impl Strategy<Value = peer::PeerFrame> {
        use peer::peer_frame::Msg;
        let msg = prop_oneof![
            any::<(u64, u64, u32, u32, u32, i32)>().prop_map(
                |(cluster_id, node_id, shard, protocol_version, shards, kind)| Msg::Hello(
                    peer::Hello {
                        cluster_id,
                        node_id,
                        shard,
                        protocol_version,
                        shards,
                        kind,
                    }
                )
            ),
            any::<u64>().prop_map(|node_id| Msg::HelloAck(peer::HelloAck { node_id })),
            ".{0,64}".prop_map(|reason| Msg::HelloReject(peer::HelloReject {
                reason,
                removed: false
            })),
            proptest::collection::vec(bytes_strategy(256), 0..8)
                .prop_map(|messages| Msg::Raft(peer::RaftBatch { messages })),
            (any::<u64>(), proptest::option::of(request_strategy())).prop_map(
                |(origin_node, request)| Msg::Forward(peer::Forward {
                    origin_node,
                    request,
                })
            ),
            proptest::option::of(response_strategy())
                .prop_map(|response| Msg::ForwardReply(peer::ForwardReply { response })),
            (
                any::<(u32, u64, u64, u64, bool)>(),
                bytes_strategy(1024),
                bytes_strategy(128),
                any::<u64>()
            )
                .prop_map(
                    |((shard, term, index, offset, last), data, raft_message, total_bytes)| {
                        Msg::SnapshotChunk(peer::SnapshotChunk {
                            shard,
                            term,
                            index,
                            offset,
                            data,
                            last,
                            raft_message,
                            total_bytes,
                        })
                    }
                ),
            (any::<(u32, u64, bool)>(), ".{0,32}").prop_map(|((shard, index, ok), reason)| {
                Msg::SnapshotAck(peer::SnapshotAck {
                    shard,
                    index,
                    ok,
                    reason,
                })
            }),
        ];
        proptest::option::of(msg).prop_map(|msg| peer::PeerFrame { msg })
    }

    /// Encodes `msg` as a frame, decodes it back and checks it is unchanged.
    fn round_trip<M>(msg: &M) -> Result<(), TestCaseError>
    where
        M: prost::Message + Default + PartialEq + std::fmt::Debug,
    {
        let mut buf = BytesMut::new();
        encode_frame(msg, &mut buf);
        let payload = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES)
            .decode(&mut buf)
            .map_err(|e| TestCaseError::fail(e.to_string()))?
            .ok_or_else(|| TestCaseError::fail("complete frame not decoded"))?;
        prop_assert!(buf.is_empty(), "frame left {} bytes behind", buf.len());
        let decoded: M = decode_message(payload).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&decoded, msg);
        Ok(())
    }

    proptest! {
        #[test]
        fn any_request_round_trips(request in request_strategy()) {
            round_trip(&request)?;
        }

        #[test]
        fn any_response_round_trips(response in response_strategy()) {
            round_trip(&response)?;
        }

        #[test]
        fn any_peer_frame_round_trips(frame in peer_frame_strategy()) {
            round_trip(&frame)?;
        }

        /// Whatever bytes arrive, in whatever chunks, the decoder never panics
        /// and the buffer never holds (or has capacity for) more than one
        /// frame at the limit plus a bounded chunk.
        #[test]
        fn arbitrary_bytes_never_panic_nor_grow_the_buffer_past_the_limit(
            max in 0usize..4096,
            pieces in proptest::collection::vec(
                (prop_oneof![4 => 0u32..4200, 1 => any::<u32>()], proptest::collection::vec(any::<u8>(), 0..300)),
                0..64,
            ),
            chunk in 1usize..2048,
        ) {
            // Mostly plausible headers (some over the limit, most not matching
            // the bytes that follow), so the decoder gets past the first
            // header and sees misaligned streams, not just one huge length.
            let mut data = Vec::new();
            for (len, body) in &pieces {
                data.extend_from_slice(&len.to_be_bytes());
                data.extend_from_slice(body);
            }
            let mut decoder = FrameDecoder::new(max);
            let mut buf = BytesMut::new();
            let bound = max + FRAME_HEADER_LEN + READ_CHUNK_BYTES;
            let mut input = &data[..];
            'feed: while !input.is_empty() {
                // Behave like FrameReader: make room, then "read" what fits.
                decoder.reserve_for_read(&mut buf);
                let spare = buf.capacity() - buf.len();
                prop_assert!(spare > 0);
                let n = spare.min(chunk).min(input.len());
                buf.extend_from_slice(&input[..n]);
                input = &input[n..];
                prop_assert!(buf.capacity() <= bound, "capacity {} > {}", buf.capacity(), bound);
                loop {
                    match decoder.decode(&mut buf) {
                        Ok(Some(payload)) => prop_assert!(payload.len() <= max),
                        Ok(None) => break,
                        Err(FrameError::FrameTooLarge { len, .. }) => {
                            prop_assert!(len > max);
                            break 'feed;
                        }
                        // A header over the limit whose bytes also read as a
                        // TLS record header (0x14-0x17, 0x03) is named as
                        // such; it ends the stream all the same.
                        Err(FrameError::TlsRecord) => {
                            let header: [u8; FRAME_HEADER_LEN] =
                                buf[..FRAME_HEADER_LEN].try_into().expect("header");
                            prop_assert!(u32::from_be_bytes(header) as usize > max);
                            break 'feed;
                        }
                        Err(e) => return Err(TestCaseError::fail(format!("unexpected {e}"))),
                    }
                }
            }
        }

        /// A stream of frames decodes to the same payloads however it is cut
        /// into two reads.
        #[test]
        fn frames_split_at_every_boundary_decode_the_same(
            payloads in proptest::collection::vec(bytes_strategy(40), 1..6),
        ) {
            let mut stream = BytesMut::new();
            for p in &payloads {
                stream.put_u32(p.len() as u32);
                stream.extend_from_slice(p);
            }
            for cut in 0..=stream.len() {
                let mut decoder = FrameDecoder::new(64);
                let mut buf = BytesMut::from(&stream[..cut]);
                let mut got = decode_all(&mut decoder, &mut buf);
                buf.extend_from_slice(&stream[cut..]);
                got.extend(decode_all(&mut decoder, &mut buf));
                prop_assert!(buf.is_empty());
                prop_assert_eq!(&got, &payloads, "cut at {}", cut);
            }
        }

        /// Feeding the stream one byte at a time is the extreme of splitting.
        #[test]
        fn frames_fed_byte_by_byte_decode_the_same(
            payloads in proptest::collection::vec(bytes_strategy(40), 1..6),
        ) {
            let mut stream = BytesMut::new();
            for p in &payloads {
                encode_frame(&peer::RaftBatch { messages: vec![p.clone()] }, &mut stream);
            }
            let mut decoder = FrameDecoder::new(1024);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for byte in stream.iter() {
                buf.put_u8(*byte);
                got.extend(decode_all(&mut decoder, &mut buf));
            }
            let batches: Vec<Bytes> = got
                .into_iter()
                .map(|payload| {
                    let mut batch: peer::RaftBatch = decode_message(payload).unwrap();
                    batch.messages.pop().unwrap()
                })
                .collect();
            prop_assert_eq!(&batches, &payloads);
        }
    }
}
