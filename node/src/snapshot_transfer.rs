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
    connect_peer, decode_message, encode_frame_bytes, FrameReader, SocketOptions,
};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use protobuf::Message as _;
use raft::prelude::Message;

use crate::replica::LoadedSnapshot;
use crate::snapshot::{self, SnapshotMeta};

/// Bytes of snapshot data per chunk frame.
pub const CHUNK_BYTES: usize = 1 << 20;
/// How long the leader waits for the follower's verdict after the last chunk.
const ACK_TIMEOUT: Duration = Duration::from_secs(120);
/// How long either side waits for the next frame mid-transfer.
const FRAME_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// The snapshot file.
    pub path: PathBuf,
    /// Its metadata.
    pub meta: SnapshotMeta,
    /// raft's MsgSnapshot for the follower.
    pub message: Message,
}

/// Sends a snapshot and waits for the follower's verdict.
pub async fn send(outgoing: Outgoing) -> Result<(), String> {
    let mut hello = outgoing.hello;
    hello.kind = LinkKind::Snapshot as i32;
    let (_, mut reader, mut writer) = connect_peer(
        outgoing.addr,
        &hello,
        &outgoing.socket,
        outgoing.max_frame_bytes,
    )
    .await
    .map_err(|e| e.to_string())?;
    let path = &outgoing.path;
    let len = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    let file = monoio::fs::File::open(path)
        .await
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let raft_message = Bytes::from(
        outgoing
            .message
            .write_to_bytes()
            .map_err(|e| format!("cannot encode MsgSnapshot: {e}"))?,
    );
    let mut offset = 0u64;
    loop {
        let want = CHUNK_BYTES.min((len - offset) as usize);
        // monoio reads into a Vec's spare capacity.
        let (result, buf) = file.read_exact_at(Vec::with_capacity(want), offset).await;
        result.map_err(|e| format!("{} at offset {offset}: {e}", path.display()))?;
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
        };
        let frame = encode_frame_bytes(&PeerFrame {
            msg: Some(peer_frame::Msg::SnapshotChunk(chunk)),
        });
        let (result, _) = writer.write_all(frame).await;
        result.map_err(|e| format!("sending chunk at {offset}: {e}"))?;
        offset += want as u64;
        if last {
            break;
        }
    }
    let _ = file.close().await;
    let frame = match monoio::time::timeout(ACK_TIMEOUT, reader.next_frame()).await {
        Ok(Ok(Some(frame))) => frame,
        Ok(Ok(None)) => return Err("follower closed the connection before its ack".into()),
        Ok(Err(e)) => return Err(format!("waiting for ack: {e}")),
        Err(_) => return Err(format!("no ack within {ACK_TIMEOUT:?}")),
    };
    let _ = writer.shutdown().await;
    match decode_message::<PeerFrame>(frame).map(|f| f.msg) {
        Ok(Some(peer_frame::Msg::SnapshotAck(ack))) if ack.ok => Ok(()),
        Ok(Some(peer_frame::Msg::SnapshotAck(ack))) => {
            Err(format!("follower refused: {}", ack.reason))
        }
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(e) => Err(format!("undecodable ack: {e}")),
    }
}

/// A verified snapshot received from the leader.
pub struct Incoming {
    /// The decoded snapshot.
    pub snapshot: LoadedSnapshot,
    /// raft's MsgSnapshot that came with it.
    pub message: Message,
}

/// Receives one snapshot on an accepted SNAPSHOT link, answers the ack, and
/// returns what to hand to the replica.
pub async fn receive<R, W>(
    mut reader: FrameReader<R>,
    mut writer: W,
    shard: u32,
    dir: PathBuf,
) -> Result<Incoming, String>
where
    R: AsyncReadRent,
    W: AsyncWriteRent,
{
    let result = receive_file(&mut reader, shard, &dir).await;
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
            reason: reason.clone(),
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
    shard: u32,
    dir: &Path,
) -> Result<Incoming, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let tmp = dir.join(format!("receiving-{}.tmp", std::process::id()));
    let file = monoio::fs::File::create(&tmp)
        .await
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    let mut expected_offset = 0u64;
    let mut first: Option<(u64, u64, Message)> = None;
    loop {
        let frame = match monoio::time::timeout(FRAME_TIMEOUT, reader.next_frame()).await {
            Ok(Ok(Some(frame))) => frame,
            Ok(Ok(None)) => return Err("leader closed the transfer early".into()),
            Ok(Err(e)) => return Err(format!("transfer broken: {e}")),
            Err(_) => return Err(format!("no chunk within {FRAME_TIMEOUT:?}")),
        };
        let chunk = match decode_message::<PeerFrame>(frame).map(|f| f.msg) {
            Ok(Some(peer_frame::Msg::SnapshotChunk(chunk))) => chunk,
            other => return Err(format!("expected a snapshot chunk, got {other:?}")),
        };
        if chunk.shard != shard || chunk.offset != expected_offset {
            return Err(format!(
                "chunk for shard {} at offset {}, expected shard {shard} at offset {expected_offset}",
                chunk.shard, chunk.offset
            ));
        }
        if first.is_none() {
            let message = Message::parse_from_carllerche_bytes(&chunk.raft_message)
                .map_err(|e| format!("undecodable MsgSnapshot: {e}"))?;
            first = Some((chunk.index, chunk.term, message));
        }
        let len = chunk.data.len() as u64;
        let (written, _) = file.write_all_at(chunk.data, chunk.offset).await;
        written.map_err(|e| format!("{}: {e}", tmp.display()))?;
        expected_offset += len;
        if chunk.last {
            break;
        }
    }
    file.sync_all()
        .await
        .map_err(|e| format!("{}: fsync: {e}", tmp.display()))?;
    let _ = file.close().await;
    let (index, term, message) = first.expect("at least one chunk was read");
    // Checksum, decode and rename are blocking work: a helper thread does it.
    let (tx, rx) = futures_channel::oneshot::channel();
    let final_path = dir.join(snapshot::file_name(index, term));
    std::thread::spawn(move || {
        let result = snapshot::read(&tmp)
            .map_err(|e| e.to_string())
            .and_then(|(meta, map)| {
                if (meta.index, meta.term) != (index, term) {
                    return Err(format!(
                        "file holds index {} term {}, chunks said index {index} term {term}",
                        meta.index, meta.term
                    ));
                }
                std::fs::rename(&tmp, &final_path).map_err(|e| format!("rename: {e}"))?;
                snapshot::sync_dir(final_path.parent().expect("has a parent"))
                    .map_err(|e| e.to_string())?;
                Ok((meta, map))
            });
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        let _ = tx.send(result);
    });
    let (meta, map) = rx.await.map_err(|_| "verifier thread died".to_string())??;
    Ok(Incoming {
        snapshot: LoadedSnapshot { meta, map },
        message,
    })
}
