//! Snapshot orchestration: writing one on a helper thread, deleting what it
//! made obsolete, and streaming one to a follower on a connection of its own.

use corekv_proto::peer::{Hello, LinkKind};
use raft::prelude::Message;

use crate::replica::Output;
use crate::shared::CrossCore;
use crate::snapshot::{self, SnapshotError, SnapshotMeta};
use crate::snapshot_transfer;

use super::inputs::Input;
use super::Shard;

impl Shard {
    pub(super) fn start_snapshot_transfer(&mut self, message: Message) {
        let to = message.to;
        let metadata = message.get_snapshot().get_metadata();
        let path = self
            .snap_dir
            .join(snapshot::file_name(metadata.index, metadata.term));
        if self.snapshots_sending.contains(&to) {
            return;
        }
        let Some(addr) = self.peer_addrs.get(&to).copied() else {
            tracing::warn!(
                shard = self.local.shard,
                peer = to,
                "cannot send snapshot: no address for the peer"
            );
            self.replica.report_snapshot(to, false);
            return;
        };
        let meta = SnapshotMeta {
            shard: self.local.shard,
            index: metadata.index,
            term: metadata.term,
            ..Default::default()
        };
        tracing::info!(
            shard = self.local.shard,
            peer = to,
            index = meta.index,
            "sending snapshot"
        );
        self.snapshots_sending.insert(to);
        let config = &self.node.config;
        let outgoing = snapshot_transfer::Outgoing {
            addr,
            hello: Hello {
                cluster_id: config.cluster_id,
                node_id: config.node_id,
                shard: self.local.shard,
                protocol_version: corekv_proto::PEER_PROTOCOL_VERSION,
                shards: config.shards,
                kind: LinkKind::Snapshot as i32,
            },
            socket: self.node.socket_options(),
            max_frame_bytes: config.max_frame_bytes,
            tls: self.node.tls.as_ref().map(|tls| tls.peer_tls(to)),
            path,
            meta,
            message,
        };
        let local = self.local.clone();
        monoio::spawn(async move {
            let result = snapshot_transfer::send(outgoing).await;
            local.inbox.push(Input::SnapshotSent { peer: to, result });
        });
    }

    /// Hands blocking snapshot work (writing one, freeing a state an
    /// install replaced, deleting what it made obsolete) to the shard's
    /// helper thread.
    pub(super) fn handle_snapshot_outputs(&mut self, out: &mut Output) {
        if let Some((meta, image)) = out.snapshot_to_write.take() {
            let dir = self.snap_dir.clone();
            let reply = self.node.cross[self.local.shard as usize].clone();
            let submitted = self.local.helper.submit(move || {
                let result = snapshot::write(&dir, &meta, &image).map(|path| {
                    let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
                    (meta, path, bytes)
                });
                // Dropping the view here, off the shard thread, frees what
                // the shard no longer shares.
                drop(image);
                let _ = reply.send(CrossCore::SnapshotWritten(result));
            });
            if submitted.is_err() {
                // Dropping the job drops the map's view with it; the next
                // threshold tries again.
                let error = SnapshotError::Io {
                    path: self.snap_dir.clone(),
                    op: "queue the write",
                    source: std::io::Error::other("the shard's helper thread is busy"),
                };
                // An Err outcome only logs and clears the in-progress mark.
                let _ = self.replica.on_snapshot_written(Err(error));
            }
        }
        for retired in out.retired_states.drain(..) {
            // With the helper's queue full the state is freed here: a stall
            // rather than a queue without a bound.
            let _ = self.local.helper.submit(move || drop(retired));
        }
        if let Some(meta) = out.snapshot_installed.take() {
            tracing::info!(
                shard = self.local.shard,
                index = meta.index,
                term = meta.term,
                "snapshot applied"
            );
        }
        self.obsolete_segments
            .extend(self.replica.take_obsolete_segments());
        if !self.obsolete_segments.is_empty() {
            let obsolete = std::mem::take(&mut self.obsolete_segments);
            let kept = obsolete.clone();
            let dir = self.snap_dir.clone();
            let shard = self.local.shard;
            // Compaction runs a snapshot behind, so each one retires about
            // one interval of log, and the next interval writes as much
            // again: kept, all of it is reused and no new segment is made
            // (a new file's pages are fresh memory, which costs the first
            // toucher; see the README's "Fresh memory"). Twice the interval
            // leaves room for the log written while a snapshot is; a state
            // that shrank gives back the rest.
            let keep_free_bytes = self
                .node
                .config
                .wal_recycle_bytes
                .min(self.replica.snapshot_interval_bytes().saturating_mul(2));
            let submitted = self.local.helper.submit(move || {
                let count = obsolete.len();
                match corekv_wal::remove_segments(obsolete, keep_free_bytes) {
                    Ok(()) => tracing::info!(shard, segments = count, "WAL compacted"),
                    Err(e) => tracing::warn!(shard, error = %e, "cannot delete WAL segments"),
                }
                snapshot::prune(&dir);
            });
            if submitted.is_err() {
                // Deleted at a later turn, when the helper has room.
                self.obsolete_segments = kept;
            }
        }
    }
}
