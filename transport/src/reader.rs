//! Reading frames from a monoio stream.

use bytes::{Bytes, BytesMut};
use monoio::buf::IoBufMut;
use monoio::io::AsyncReadRent;

use crate::frame::{FrameDecoder, FrameError};

/// Reads frames from a stream (or the read half of one) into one growing
/// buffer, returning each payload without copying it.
///
/// Payloads share the read buffer's allocation (up to one read chunk of
/// 64 KiB, or one frame): an owner that keeps a small payload for long should
/// copy it, or it pins the whole chunk.
///
/// `next_frame` is not cancel-safe: if its future is dropped while a read is
/// in flight, the bytes of that read are lost, so the connection must be
/// dropped with it (which is what a timeout around a handshake does).
pub struct FrameReader<R> {
    reader: R,
    decoder: FrameDecoder,
    buf: BytesMut,
    /// Set after EOF or an error: the stream is no longer aligned on frames.
    done: bool,
}

impl<R: AsyncReadRent> FrameReader<R> {
    /// Reads from `reader`, refusing frames over `max_frame_bytes`.
    pub fn new(reader: R, max_frame_bytes: usize) -> Self {
        Self {
            reader,
            decoder: FrameDecoder::new(max_frame_bytes),
            buf: BytesMut::new(),
            done: false,
        }
    }

    /// The next frame's payload. `Ok(None)` when the peer closed the
    /// connection cleanly between frames; [`FrameError::Truncated`] when it
    /// closed mid-frame. After `None` or an error, every call returns
    /// [`FrameError::Closed`].
    pub async fn next_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        if self.done {
            return Err(FrameError::Closed);
        }
        let result = self.read_frame().await;
        if !matches!(result, Ok(Some(_))) {
            self.done = true;
        }
        result
    }

    async fn read_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        loop {
            if let Some(payload) = self.decoder.decode(&mut self.buf)? {
                return Ok(Some(payload));
            }
            self.decoder.reserve_for_read(&mut self.buf);
            // monoio reads into a buffer from its start; lend it the spare
            // capacity after the bytes already held, or they are overwritten.
            let held = self.buf.len();
            let spare = std::mem::take(&mut self.buf).slice_mut(held..);
            let (result, spare) = self.reader.read(spare).await;
            self.buf = spare.into_inner();
            if result? == 0 {
                return match self.decoder.truncation(&self.buf) {
                    Some(truncated) => Err(truncated),
                    None => Ok(None),
                };
            }
        }
    }

    /// The underlying reader. Bytes already read but not yet returned as a
    /// frame are lost.
    pub fn into_inner(self) -> R {
        self.reader
    }

    /// The underlying reader, for socket-level queries (addresses, options).
    pub fn get_ref(&self) -> &R {
        &self.reader
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::encode_frame;
    use corekv_proto::peer::RaftBatch;
    use std::future::Future;

    /// A reader that hands out its data at most `chunk` bytes per read, as
    /// a socket does when segments arrive one by one.
    struct ChunkedReader {
        data: Bytes,
        chunk: usize,
    }

    impl AsyncReadRent for ChunkedReader {
        fn read<T: IoBufMut>(
            &mut self,
            mut buf: T,
        ) -> impl Future<Output = monoio::BufResult<usize, T>> {
            let n = self.chunk.min(self.data.len()).min(buf.bytes_total());
            let piece = self.data.split_to(n);
            // SAFETY: `n` is within the buffer's total capacity.
            unsafe {
                std::ptr::copy_nonoverlapping(piece.as_ptr(), buf.write_ptr(), n);
                buf.set_init(n);
            }
            async move { (Ok(n), buf) }
        }

        /// FrameReader only uses `read`; a call here would be a change
        /// the test should hear about.
        async fn readv<T: monoio::buf::IoVecBufMut>(
            &mut self,
            buf: T,
        ) -> monoio::BufResult<usize, T> {
            (
                Err(std::io::Error::other(
                    "ChunkedReader does not support readv",
                )),
                buf,
            )
        }
    }

    fn runtime() -> monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>> {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("build monoio runtime")
    }

    #[test]
    fn frames_arriving_in_pieces_of_any_size_read_back_whole() {
        let payloads: Vec<RaftBatch> = (0..30u8)
            .map(|i| RaftBatch {
                messages: vec![Bytes::from(vec![i; i as usize * 7])],
            })
            .collect();
        let mut stream = BytesMut::new();
        for payload in &payloads {
            encode_frame(payload, &mut stream);
        }
        let stream = stream.freeze();
        for chunk in [1, 2, 3, 5, 8, 13, 100, 4096] {
            runtime().block_on(async {
                let source = ChunkedReader {
                    data: stream.clone(),
                    chunk,
                };
                let mut reader = FrameReader::new(source, 1024);
                for expected in &payloads {
                    let payload = reader.next_frame().await.unwrap().unwrap();
                    let got: RaftBatch = crate::decode_message(payload).unwrap();
                    assert_eq!(&got, expected, "chunk size {chunk}");
                }
                assert!(reader.next_frame().await.unwrap().is_none());
                assert!(matches!(reader.next_frame().await, Err(FrameError::Closed)));
            });
        }
    }

    #[test]
    fn eof_mid_frame_is_truncated() {
        runtime().block_on(async {
            let mut stream = BytesMut::new();
            encode_frame(
                &RaftBatch {
                    messages: vec![Bytes::from_static(b"hello")],
                },
                &mut stream,
            );
            let cut = stream.len() - 2;
            let source = ChunkedReader {
                data: stream.freeze().slice(..cut),
                chunk: 3,
            };
            let mut reader = FrameReader::new(source, 1024);
            match reader.next_frame().await {
                Err(FrameError::Truncated { expected, got }) => assert_eq!(got + 2, expected),
                other => panic!("expected Truncated, got {other:?}"),
            }
        });
    }
}
