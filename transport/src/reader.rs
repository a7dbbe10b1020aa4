//! Reading frames from a monoio stream.

use bytes::{Bytes, BytesMut};
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
            let (result, buf) = self.reader.read(std::mem::take(&mut self.buf)).await;
            self.buf = buf;
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
