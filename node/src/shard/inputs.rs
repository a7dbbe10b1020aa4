//! What the shard loop receives (its inputs) and where each answer goes.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Instant;

use corekv_proto::client::{Request, Response};
use corekv_transport::LinkEvent;
use corekv_wal::SyncOutcome;
use raft::prelude::Message;

use crate::command;
use crate::helper::Helper;
use crate::inbox::Inbox;
use crate::metrics;
use crate::sessions::SessionTag;
use crate::shared::CrossCore;
use crate::snapshot_transfer;

use super::client_conn::ClientConn;

/// Identifies a client connection within its shard.
pub(super) type ConnId = u64;

/// Where the answer to a request must go, and what to count it as.
#[derive(Clone, Debug)]
pub(super) struct Route {
    pub(super) dest: Dest,
    /// Index into `metrics::OPS`; None for a request without an operation.
    pub(super) op: Option<usize>,
    pub(super) started: Instant,
    /// The exactly-once session the request names, carried along when it
    /// is handed to another shard or forwarded to the leader.
    pub(super) tag: SessionTag,
}

impl Route {
    /// The route of `request`, which arrived at `started`.
    pub(super) fn new(dest: Dest, request: &Request, started: Instant) -> Route {
        Route {
            dest,
            op: request.op.as_ref().map(metrics::op_index),
            started,
            tag: command::tag_of(request),
        }
    }
}

/// Who asked.
#[derive(Clone, Debug)]
pub(super) enum Dest {
    /// A client connection of this shard, with the client's request id.
    Client { conn: ConnId, id: u64 },
    /// A follower that forwarded the request to us, with its forward id.
    Forwarded { origin_node: u64, id: u64 },
    /// A client connection of another shard of this node.
    CrossCore { shard: u32, conn: ConnId, id: u64 },
}

/// Everything the shard loop reacts to.
pub(super) enum Input {
    Tick,
    Raft(Box<Message>),
    Client {
        conn: ConnId,
        request: Request,
    },
    ConnClosed(ConnId),
    Forward {
        origin_node: u64,
        request: Request,
    },
    ForwardReply(Response),
    CrossCore(CrossCore),
    Synced {
        outcome: SyncOutcome,
        started: Instant,
    },
    Link {
        peer: u64,
        event: LinkEvent,
    },
    SnapshotSent {
        peer: u64,
        result: Result<(), snapshot_transfer::TransferError>,
    },
    SnapshotReceived(Box<snapshot_transfer::Incoming>),
}

/// Shard-local state shared between the loop and its tasks.
pub(super) struct Local {
    pub(super) shard: u32,
    pub(super) inbox: Inbox<Input>,
    pub(super) conns: RefCell<HashMap<ConnId, Rc<ClientConn>>>,
    pub(super) next_conn: Cell<ConnId>,
    /// The shard's helper thread, for blocking work.
    pub(super) helper: Helper,
    /// Who may open a peer link (the accept tasks read it).
    pub(super) gate: RefCell<super::members::PeerGate>,
    /// The time as of the loop's current step, read once per turn and once
    /// per dispatch: what a request's arrival, its latency and a
    /// connection's activity are measured with, instead of a clock read
    /// per request (2 % of the CPU of pipelined gets, perf).
    pub(super) clock: Cell<Instant>,
}
