//! Moving a snapshot file to a follower, on a connection of its own.
//!
//! The leader dials the follower's peer port with `Hello{kind: SNAPSHOT}`
//! and streams `SnapshotChunk`s (the first carries raft's MsgSnapshot); the
//! follower writes them to a temp file, fsyncs it, verifies the checksum and
//! decodes it on a helper thread, answers `SnapshotAck`, and hands the
//! decoded map plus the MsgSnapshot to its shard loop. Heartbeats and
//! appends never queue behind the chunks, and nothing is applied before the
//! whole file verified. An interrupted transfer starts over.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use corekv_proto::peer::{peer_frame, Hello, LinkKind, PeerFrame, SnapshotAck, SnapshotChunk};
use corekv_transport::{
    connect_peer, decode_message, encode_frame_bytes, FrameError, FrameReader, HandshakeError,
    SocketOptions,
};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};

use crate::helper::{Busy, Helper};
use crate::progress::{Progress, Unit};
use crate::replica::LoadedSnapshot;
use crate::snapshot::{self, SnapshotError, SnapshotMeta};

/// Numbers incoming transfers of this process, for their temp file names.
static NEXT_TRANSFER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Bytes of snapshot data per chunk frame.
pub const CHUNK_BYTES: usize = 1 << 20;
/// How long the leader waits for the follower's verdict after the last chunk.
const ACK_TIMEOUT: Duration = Duration::from_secs(120);
/// How long either side waits for the next frame mid-transfer.
const FRAME_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a snapshot transfer failed, on either side. The sender reports it to
/// raft (which retries); the receiver also sends it to the sender in its ack.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The snapshot link could not be opened.
    #[error("cannot open a snapshot link: {0}")]
    Connect(#[from] HandshakeError),
    /// A local file operation failed.
    #[error("{}: {op}: {source}", .path.display())]
    File {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// Writing to the peer failed.
    #[error("sending chunk at offset {offset}: {source}")]
    Send {
        /// Offset of the chunk in the file.
        offset: u64,
        /// The error.
        source: std::io::Error,
    },
    /// The connection broke or carried a bad frame.
    #[error("transfer broken: {0}")]
    Broken(#[from] FrameError),
    /// The peer closed the connection before the transfer was complete.
    #[error("the peer closed the connection {when}")]
    Closed {
        /// At which step.
        when: &'static str,
    },
    /// The peer went quiet.
    #[error("no {waiting_for} within {after:?}")]
    TimedOut {
        /// What did not arrive.
        waiting_for: &'static str,
        /// How long we waited.
        after: Duration,
    },
    /// The peer sent something other than the protocol's next step.
    #[error("expected {expected}, got {got}")]
    Unexpected {
        /// What the protocol says comes next.
        expected: &'static str,
        /// What came instead.
        got: String,
    },
    /// A chunk for another shard or out of order.
    #[error("chunk for shard {shard} at offset {offset}, expected shard {expected_shard} at offset {expected_offset}")]
    WrongChunk {
        /// The chunk's shard.
        shard: u32,
        /// The chunk's offset.
        offset: u64,
        /// This link's shard.
        expected_shard: u32,
        /// The next offset expected.
        expected_offset: u64,
    },
    /// raft's MsgSnapshot could not be encoded or decoded.
    #[error("MsgSnapshot: {0}")]
    RaftMessage(#[from] protobuf::ProtobufError),
    /// The received file is not the snapshot the chunks announced.
    #[error(
        "file holds index {file_index} term {file_term}, chunks said index {index} term {term}"
    )]
    Mismatch {
        /// Index in the file.
        file_index: u64,
        /// Term in the file.
        file_term: u64,
        /// Index the chunks carried.
        index: u64,
        /// Term the chunks carried.
        term: u64,
    },
    /// The received file failed its checksum or could not be decoded.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The raft message that came with the chunks is not a MsgSnapshot from
    /// the link's node to us for the snapshot the chunks carry.
    #[error("the raft message with the snapshot ({kind:?} from {from} to {to}, index {index} term {term}) does not match the link and the chunks")]
    BadSnapshotMessage {
        /// Its kind.
        kind: MessageType,
        /// Its sender.
        from: u64,
        /// Its receiver.
        to: u64,
        /// The snapshot index it names.
        index: u64,
        /// The snapshot term it names.
        term: u64,
    },
    /// The shard's helper thread had no room to verify the file.
    #[error(transparent)]
    HelperBusy(#[from] Busy),
    /// The helper thread that verifies the file died.
    #[error("the snapshot verifier thread died")]
    VerifierDied,
    /// The follower verified the file and refused it, for this reason.
    #[error("follower refused: {0}")]
    Refused(String),
}

fn file_error<'a>(
    path: &'a Path,
    op: &'static str,
) -> impl FnOnce(std::io::Error) -> TransferError + 'a {
    move |source| TransferError::File {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// The MsgSnapshot on a snapshot link must be one, from the link's node to
/// us, in a term, and describe the snapshot the chunks carry: raft installs
/// what the message says, and the replica holds only what the file holds.
fn check_snapshot_message(
    message: &Message,
    link: SnapshotLink,
    index: u64,
    term: u64,
) -> Result<(), TransferError> {
    let metadata = message.get_snapshot().get_metadata();
    let well_formed = message.get_msg_type() == MessageType::MsgSnapshot
        && message.from == link.peer
        && message.to == link.me
        && message.term != 0
        && (metadata.index, metadata.term) == (index, term)
        && index > 0
        && term > 0
        && term <= message.term;
    if well_formed {
        Ok(())
    } else {
        Err(TransferError::BadSnapshotMessage {
            kind: message.get_msg_type(),
            from: message.from,
            to: message.to,
            index: metadata.index,
            term: metadata.term,
        })
    }
}

/// What the leader needs to send one snapshot.
pub struct Outgoing {
    /// The follower's peer port for this shard.
    pub addr: SocketAddr,
    /// Our Hello (kind is set to SNAPSHOT here).
    pub hello: Hello,
    /// Socket settings.
    pub socket: SocketOptions,
    /// Frame limit of the link.
    pub max_frame_bytes: usize,
    /// TLS for the link, when the cluster runs it.
    pub tls: Option<corekv_transport::PeerTls>,
    /// The snapshot file.
    pub path: PathBuf,
    /// Its metadata.
    pub meta: SnapshotMeta,
    /// raft's MsgSnapshot for the follower.
    pub message: Message,
}

/// Sends a snapshot and waits for the follower's verdict.
pub async fn send(outgoing: Outgoing) -> Result<(), TransferError> {
    let mut hello = outgoing.hello;
    hello.kind = LinkKind::Snapshot as i32;
    let (_, mut reader, mut writer) = connect_peer(
        outgoing.addr,
        &hello,
        &outgoing.socket,
        outgoing.max_frame_bytes,
        outgoing.tls.as_ref(),
    )
    .await?;
    let path = &outgoing.path;
    let len = std::fs::metadata(path)
        .map_err(file_error(path, "stat"))?
        .len();
    let file = monoio::fs::File::open(path)
        .await
        .map_err(file_error(path, "open"))?;
    let raft_message = Bytes::from(outgoing.message.write_to_bytes()?);
    let mut progress = Progress::new(
        outgoing.meta.shard,
        format!("sending snapshot to node {}", outgoing.message.to),
        Unit::Bytes,
        len,
    );
    let mut offset = 0u64;
    loop {
        let want = CHUNK_BYTES.min((len - offset) as usize);
        // monoio reads into a Vec's spare capacity.
        let (result, buf) = file.read_exact_at(Vec::with_capacity(want), offset).await;
        result.map_err(file_error(path, "read"))?;
        let last = offset + want as u64 == len;
        let chunk = SnapshotChunk {
            shard: outgoing.meta.shard,
            term: outgoing.meta.term,
            index: outgoing.meta.index,
            offset,
            data: Bytes::from(buf),
            last,
            raft_message: if offset == 0 {
                raft_message.clone()
            } else {
                Bytes::new()
            },
            total_bytes: len,
        };
        let frame = encode_frame_bytes(&PeerFrame {
            msg: Some(peer_frame::Msg::SnapshotChunk(chunk)),
        });
        let (result, _) = writer.write_all(frame).await;
        result.map_err(|source| TransferError::Send { offset, source })?;
        offset += want as u64;
        progress.update(offset);
        if last {
            break;
        }
    }
    progress.finish();
    let _ = file.close().await;
    let frame = match monoio::time::timeout(ACK_TIMEOUT, reader.next_frame()).await {
        Ok(Ok(Some(frame))) => frame,
        Ok(Ok(None)) => {
            return Err(TransferError::Closed {
                when: "before its ack",
            })
        }
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => {
            return Err(TransferError::TimedOut {
                waiting_for: "ack",
                after: ACK_TIMEOUT,
            })
        }
    };
    let _ = writer.shutdown().await;
    match decode_message::<PeerFrame>(frame)?.msg {
        Some(peer_frame::Msg::SnapshotAck(ack)) if ack.ok => Ok(()),
        Some(peer_frame::Msg::SnapshotAck(ack)) => Err(TransferError::Refused(ack.reason)),
        other => Err(TransferError::Unexpected {
            expected: "a snapshot ack",
            got: format!("{other:?}"),
        }),
    }
}

/// A verified snapshot received from the leader.
pub struct Incoming {
    /// The decoded snapshot.
    pub snapshot: LoadedSnapshot,
    /// raft's MsgSnapshot that came with it.
    pub message: Message,
}

/// Who is at either end of a snapshot link: the MsgSnapshot that comes
/// with the file must be from the node that did the handshake, to us.
#[derive(Clone, Copy, Debug)]
pub struct SnapshotLink {
    /// The shard.
    pub shard: u32,
    /// The node id the peer proved in its Hello.
    pub peer: u64,
    /// This node's id.
    pub me: u64,
}

/// Receives one snapshot on an accepted SNAPSHOT link, answers the ack, and
/// returns what to hand to the replica.
pub async fn receive<R, W>(
    mut reader: FrameReader<R>,
    mut writer: W,
    link: SnapshotLink,
    dir: PathBuf,
    helper: &Helper,
) -> Result<Incoming, TransferError>
where
    R: AsyncReadRent,
    W: AsyncWriteRent,
{
    let shard = link.shard;
    let result = receive_file(&mut reader, link, &dir, helper).await;
    let ack = match &result {
        Ok(incoming) => SnapshotAck {
            shard,
            index: incoming.snapshot.meta.index,
            ok: true,
            reason: String::new(),
        },
        Err(reason) => SnapshotAck {
            shard,
            index: 0,
            ok: false,
            reason: reason.to_string(),
        },
    };
    let frame = encode_frame_bytes(&PeerFrame {
        msg: Some(peer_frame::Msg::SnapshotAck(ack)),
    });
    let (sent, _) = writer.write_all(frame).await;
    if let Err(e) = sent {
        tracing::debug!(shard, error = %e, "could not send snapshot ack");
    }
    let _ = writer.shutdown().await;
    result
}

async fn receive_file<R: AsyncReadRent>(
    reader: &mut FrameReader<R>,
    link: SnapshotLink,
    dir: &Path,
    helper: &Helper,
) -> Result<Incoming, TransferError> {
    std::fs::create_dir_all(dir).map_err(file_error(dir, "create directory"))?;
    // Two transfers to one shard (a retry while the first still runs) must
    // not write the same file.
    let number = NEXT_TRANSFER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!("receiving-{}-{number}.tmp", std::process::id()));
    let file = monoio::fs::File::create(&tmp)
        .await
        .map_err(file_error(&tmp, "create"))?;
    let written = write_chunks(reader, link, &file, &tmp, helper).await;
    let _ = file.close().await;
    let (index, term, message) = match written {
        Ok(first) => first,
        Err(e) => {
            remove_off_thread(helper, tmp);
            return Err(e);
        }
    };
    let shard = link.shard;
    // Checksum, decode and rename are blocking work: a helper thread does it.
    let (tx, rx) = futures_channel::oneshot::channel();
    let final_path = dir.join(snapshot::file_name(index, term));
    let cleanup = tmp.clone();
    let submitted = helper.submit(move || {
        let result = snapshot::read_logged(shard, "verifying received snapshot", &tmp)
            .map_err(TransferError::from)
            .and_then(|(meta, image)| {
                if (meta.index, meta.term) != (index, term) {
                    return Err(TransferError::Mismatch {
                        file_index: meta.index,
                        file_term: meta.term,
                        index,
                        term,
                    });
                }
                std::fs::rename(&tmp, &final_path).map_err(file_error(&tmp, "rename"))?;
                snapshot::sync_dir(final_path.parent().expect("has a parent"))?;
                Ok((meta, image))
            });
        if result.is_err() {
            let _ = corekv_wal::remove_in_steps(&tmp);
        }
        let _ = tx.send(result);
    });
    if let Err(busy) = submitted {
        remove_off_thread(helper, cleanup);
        return Err(busy.into());
    }
    let (meta, image) = rx.await.map_err(|_| TransferError::VerifierDied)??;
    Ok(Incoming {
        snapshot: LoadedSnapshot { meta, image },
        message,
    })
}

/// Writes the chunks of one transfer to `file`; returns the snapshot's index
/// and term and the MsgSnapshot that came with the first chunk.
async fn write_chunks<R: AsyncReadRent>(
    reader: &mut FrameReader<R>,
    link: SnapshotLink,
    file: &monoio::fs::File,
    tmp: &Path,
    helper: &Helper,
) -> Result<(u64, u64, Message), TransferError> {
    let shard = link.shard;
    let mut expected_offset = 0u64;
    let mut first: Option<(u64, u64, Message)> = None;
    let mut progress: Option<Progress> = None;
    let mut pacer = ReceivePacer::new(file).map_err(file_error(tmp, "dup"))?;
    loop {
        let frame = match monoio::time::timeout(FRAME_TIMEOUT, reader.next_frame()).await {
            Ok(Ok(Some(frame))) => frame,
            Ok(Ok(None)) => {
                return Err(TransferError::Closed {
                    when: "mid-transfer",
                })
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                return Err(TransferError::TimedOut {
                    waiting_for: "chunk",
                    after: FRAME_TIMEOUT,
                })
            }
        };
        let chunk = match decode_message::<PeerFrame>(frame)?.msg {
            Some(peer_frame::Msg::SnapshotChunk(chunk)) => chunk,
            other => {
                return Err(TransferError::Unexpected {
                    expected: "a snapshot chunk",
                    got: format!("{other:?}"),
                })
            }
        };
        if chunk.shard != shard || chunk.offset != expected_offset {
            return Err(TransferError::WrongChunk {
                shard: chunk.shard,
                offset: chunk.offset,
                expected_shard: shard,
                expected_offset,
            });
        }
        if first.is_none() {
            let message = Message::parse_from_carllerche_bytes(&chunk.raft_message)?;
            check_snapshot_message(&message, link, chunk.index, chunk.term)?;
            first = Some((chunk.index, chunk.term, message));
            progress = Some(Progress::new(
                shard,
                format!("receiving snapshot from node {}", link.peer),
                Unit::Bytes,
                chunk.total_bytes,
            ));
        }
        let len = chunk.data.len() as u64;
        let (written, _) = file.write_all_at(chunk.data, chunk.offset).await;
        written.map_err(file_error(tmp, "write"))?;
        expected_offset += len;
        if let Some(progress) = &mut progress {
            progress.update(expected_offset);
        }
        pacer.wrote(len, helper).await;
        if chunk.last {
            break;
        }
    }
    file.sync_all().await.map_err(file_error(tmp, "fsync"))?;
    if let Some(progress) = &mut progress {
        progress.finish();
    }
    Ok(first.expect("at least one chunk was read"))
}

/// Keeps a received snapshot from piling up dirty pages that the final
/// fsync (and, meanwhile, the WAL's fdatasync on the same disk) would have
/// to wait for: every `SNAPSHOT_WRITEBACK_CHUNK_BYTES` written start their
/// writeback on the helper thread, after the chunk before them is on disk,
/// and the transfer slows to `SNAPSHOT_BYTES_PER_SECOND`, as a snapshot the
/// node writes itself. Waiting here is async: the shard goes on, the leader
/// sees TCP back-pressure.
struct ReceivePacer {
    /// A duplicate of the temp file's descriptor, for the helper thread.
    fd: std::sync::Arc<std::os::fd::OwnedFd>,
    written: u64,
    started: u64,
    began: std::time::Instant,
}

impl ReceivePacer {
    fn new(file: &monoio::fs::File) -> std::io::Result<ReceivePacer> {
        use std::os::fd::{AsRawFd as _, BorrowedFd};
        // SAFETY: the descriptor stays open for this call (the file is
        // borrowed); the duplicate is owned and closed by the pacer.
        let fd = unsafe { BorrowedFd::borrow_raw(file.as_raw_fd()) }.try_clone_to_owned()?;
        Ok(ReceivePacer {
            fd: std::sync::Arc::new(fd),
            written: 0,
            started: 0,
            began: std::time::Instant::now(),
        })
    }

    async fn wrote(&mut self, bytes: u64, helper: &Helper) {
        use std::os::fd::AsRawFd as _;
        let chunk = snapshot::SNAPSHOT_WRITEBACK_CHUNK_BYTES;
        self.written += bytes;
        while self.written - self.started >= chunk {
            let (fd, start) = (self.fd.clone(), self.started);
            let (tx, rx) = futures_channel::oneshot::channel();
            let submitted = helper.submit(move || {
                snapshot::writeback_chunk(fd.as_raw_fd(), start, chunk);
                let _ = tx.send(());
            });
            // A busy helper only means this chunk's writeback is left to
            // the kernel; the final fsync still makes the file durable.
            if submitted.is_ok() {
                let _ = rx.await;
            }
            self.started += chunk;
            let rate = snapshot::SNAPSHOT_BYTES_PER_SECOND;
            if let Some(ahead) = snapshot::ahead_of_rate(self.started, rate, self.began) {
                monoio::time::sleep(ahead).await;
            }
        }
    }
}

/// Deletes a broken transfer's temp file on the helper thread. If the helper
/// has no room the file stays; `snapshot::prune` deletes it later.
fn remove_off_thread(helper: &Helper, path: PathBuf) {
    let _ = helper.submit(move || {
        let _ = corekv_wal::remove_in_steps(&path);
    });
}
