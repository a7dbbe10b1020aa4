//! `corekv member add|promote|remove|list`: membership changes applied to
//! every shard, one shard at a time.
//!
//! Each change is first checked on every shard's leader (a dry run), so a
//! change that one shard would refuse changes nothing anywhere. Then it is
//! made shard by shard; a shard that already is as asked answers
//! "unchanged", so running an interrupted command again finishes it. `list`
//! shows each shard's membership as its leader applied it, and names the
//! shards that disagree.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Subcommand;
use corekv_client::{Client, ClientError};
use corekv_proto::client::{
    ChangeMembership, ErrorCode, MembershipAction, MembershipResult, NodeInfo, ShardMembership,
};
use serde_json::json;

/// A membership command.
#[derive(Subcommand, Debug)]
pub enum MemberCommand {
    /// Add a node to every shard as a learner (it receives the log, does not
    /// vote). Start the node first with `corekv run --join`.
    Add {
        /// Node id of the new node (never an id that was removed before).
        #[arg(long)]
        id: u64,
        /// Host name or IP address the other nodes and clients dial.
        #[arg(long)]
        host: String,
        /// Its first client port.
        #[arg(long)]
        client_port: u16,
        /// Its first peer port.
        #[arg(long)]
        peer_port: u16,
        /// Its admin HTTP port.
        #[arg(long)]
        admin_port: Option<u16>,
        /// Only check the change on every shard; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Make a learner a voter on every shard; refused while it is behind on
    /// any shard.
    Promote {
        /// Node id of the learner.
        id: u64,
        /// Only check the change on every shard; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove a voter or learner from every shard. A shard led by the node
    /// hands leadership away first.
    Remove {
        /// Node id to remove.
        id: u64,
        /// Remove even if a shard is left without a quorum of live voters.
        #[arg(long)]
        force: bool,
        /// Only check the change on every shard; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Every member, its role on each shard, and any shard that disagrees.
    List,
}

/// Pause before asking a shard again about a change whose outcome is not
/// known.
const CHANGE_RETRY_PAUSE: Duration = Duration::from_millis(200);
/// A shard's change is asked again while its outcome is unknown, for up to
/// this many times --timeout.
const CHANGE_ATTEMPTS: u32 = 3;

/// Runs `command` against the cluster `client` is connected to.
pub async fn run(
    client: &Client,
    command: MemberCommand,
    json: bool,
    timeout: Duration,
) -> ExitCode {
    let (action, node, force, dry_run, what) = match command {
        MemberCommand::List => return list(client, json).await,
        MemberCommand::Add {
            id,
            host,
            client_port,
            peer_port,
            admin_port,
            dry_run,
        } => {
            let node = NodeInfo {
                node_id: id,
                host,
                client_port: u32::from(client_port),
                peer_port: u32::from(peer_port),
                admin_port: admin_port.map_or(0, u32::from),
            };
            let what = "added as a learner";
            (MembershipAction::AddLearner, node, false, dry_run, what)
        }
        MemberCommand::Promote { id, dry_run } => {
            let what = "promoted to voter";
            (MembershipAction::Promote, node_id(id), false, dry_run, what)
        }
        MemberCommand::Remove { id, force, dry_run } => (
            MembershipAction::Remove,
            node_id(id),
            force,
            dry_run,
            "removed",
        ),
    };
    let id = node.node_id;
    let shards = client.topology().shards;
    let request = |shard, check_only| ChangeMembership {
        shard,
        action: action as i32,
        node: Some(node.clone()),
        force,
        dry_run: check_only,
    };
    // 1. Every shard's leader checks the change; one refusal stops it all.
    let mut to_change = Vec::new();
    for shard in 0..shards {
        match client.change_membership(request(shard, true)).await {
            Ok(result) if result.unchanged => {}
            Ok(_) => to_change.push(shard),
            Err(e) => return refused(shard, &e),
        }
    }
    if to_change.is_empty() {
        let state = match action {
            MembershipAction::AddLearner => "is already a member",
            MembershipAction::Promote => "is already a voter",
            _ => "is not a member",
        };
        eprintln!("error: node {id} {state} of every shard; nothing changed");
        return ExitCode::from(2);
    }
    if dry_run {
        print_checked(json, id, what, &to_change);
        return ExitCode::SUCCESS;
    }
    // 2. Shard by shard; an outcome not known in time is asked again (the
    // change is idempotent: a shard that has it answers "unchanged"). One
    // attempt may spend the whole --timeout following a leadership that is
    // moving away from a leaving node, so each shard gets a few.
    let mut done = Vec::new();
    for shard in to_change {
        let deadline = Instant::now() + timeout * CHANGE_ATTEMPTS;
        let result = loop {
            match client.change_membership(request(shard, false)).await {
                Ok(result) => break result,
                Err(e) if unknown_outcome(&e) && Instant::now() < deadline => {
                    monoio::time::sleep(CHANGE_RETRY_PAUSE).await;
                }
                Err(e) => {
                    eprintln!(
                        "error: shard {shard}: {e}; shards {done:?} are changed: run the same command again to finish"
                    );
                    return ExitCode::from(2);
                }
            }
        };
        if !json {
            println!("shard {shard}: node {id} {what}{}", applied_at(&result));
        }
        done.push(shard);
    }
    if json {
        println!(
            "{}",
            json!({ "node_id": id, "action": what, "shards": done })
        );
    }
    ExitCode::SUCCESS
}

fn print_checked(json: bool, id: u64, what: &str, shards: &[u32]) {
    if json {
        println!(
            "{}",
            json!({ "node_id": id, "action": what, "dry_run": true, "shards": shards })
        );
    } else {
        println!("dry run: node {id} can be {what} on shards {shards:?}; nothing changed");
    }
}

fn node_id(id: u64) -> NodeInfo {
    NodeInfo {
        node_id: id,
        ..Default::default()
    }
}

/// Where the change landed. The dry run found the change still to do, so
/// an "unchanged" answer here means an earlier attempt of this command
/// made it (its answer was lost to a leader change).
fn applied_at(result: &MembershipResult) -> String {
    match &result.membership {
        Some(m) => format!(" (membership at log index {})", m.index),
        None => String::new(),
    }
}

/// A failure after which the change may or may not have been made.
fn unknown_outcome(error: &ClientError) -> bool {
    matches!(
        error,
        ClientError::Timeout { .. }
            | ClientError::Server {
                code: ErrorCode::Timeout,
                ..
            }
    )
}

fn refused(shard: u32, error: &ClientError) -> ExitCode {
    eprintln!("error: shard {shard}: {error}; nothing changed");
    ExitCode::from(2)
}

/// One shard's membership and who reported it.
struct ShardView {
    membership: ShardMembership,
    /// The node whose view it is, and whether the topology names it the
    /// shard's leader.
    from: u64,
    from_leader: bool,
}

async fn list(client: &Client, json: bool) -> ExitCode {
    let topology = match client.refresh_topology().await {
        Ok(topology) => topology,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let mut statuses = Vec::new();
    for (node, addr) in client.node_addrs() {
        let Ok(addr) = addr.parse() else { continue };
        if let Ok(status) = client.status_at(addr).await {
            statuses.push((node, status));
        }
    }
    let mut views = Vec::new();
    for shard in 0..topology.shards {
        let leader = topology.leaders.get(shard as usize).copied().unwrap_or(0);
        // The newest membership any node has applied: a change is applied
        // only once committed, so the highest index is the group's current
        // one (a node that was removed, or lags, reports an older one).
        let view = statuses
            .iter()
            .filter_map(|(id, status)| {
                let membership = status.shards.get(shard as usize)?.membership.clone()?;
                Some(ShardView {
                    membership,
                    from: *id,
                    from_leader: *id == leader,
                })
            })
            .max_by_key(|v| (v.membership.index, v.from_leader));
        match view {
            Some(view) => views.push(view),
            None => {
                eprintln!("error: no node answered with shard {shard}'s membership");
                return ExitCode::from(2);
            }
        }
    }
    print_members(&views, json);
    ExitCode::SUCCESS
}

fn role_on(membership: &ShardMembership, id: u64) -> &'static str {
    if membership.voters.contains(&id) {
        "voter"
    } else if membership.learners.contains(&id) {
        "learner"
    } else {
        "-"
    }
}

/// The shards whose voters and learners differ from shard 0's.
fn disagreeing(views: &[ShardView]) -> Vec<u32> {
    let Some(first) = views.first() else {
        return Vec::new();
    };
    let key = |m: &ShardMembership| {
        (
            m.voters.clone(),
            m.learners.clone(),
            m.voters_outgoing.clone(),
        )
    };
    views
        .iter()
        .filter(|v| key(&v.membership) != key(&first.membership))
        .map(|v| v.membership.shard)
        .collect()
}

fn print_members(views: &[ShardView], json: bool) {
    let mut nodes: Vec<NodeInfo> = Vec::new();
    for view in views {
        for node in &view.membership.nodes {
            if !nodes.iter().any(|n| n.node_id == node.node_id) {
                nodes.push(node.clone());
            }
        }
    }
    nodes.sort_by_key(|n| n.node_id);
    let disagree = disagreeing(views);
    if json {
        let members: Vec<_> = nodes
            .iter()
            .map(|n| {
                let roles: Vec<_> = views
                    .iter()
                    .map(|v| role_on(&v.membership, n.node_id))
                    .collect();
                json!({
                    "id": n.node_id,
                    "host": n.host,
                    "client_port": n.client_port,
                    "peer_port": n.peer_port,
                    "admin_port": n.admin_port,
                    "roles": roles,
                })
            })
            .collect();
        let shards: Vec<_> = views
            .iter()
            .map(|v| {
                json!({
                    "shard": v.membership.shard,
                    "voters": v.membership.voters,
                    "learners": v.membership.learners,
                    "voters_outgoing": v.membership.voters_outgoing,
                    "index": v.membership.index,
                    "reported_by": v.from,
                    "reported_by_leader": v.from_leader,
                })
            })
            .collect();
        println!(
            "{}",
            json!({ "members": members, "shards": shards, "disagreeing_shards": disagree })
        );
        return;
    }
    let shard_columns: String = views
        .iter()
        .map(|v| format!("  shard {:<3}", v.membership.shard))
        .collect();
    println!(
        "{:<6} {:<28} {:>6} {:>6} {:>6}{shard_columns}",
        "ID", "HOST", "CLIENT", "PEER", "ADMIN"
    );
    for n in &nodes {
        let roles: String = views
            .iter()
            .map(|v| format!("  {:<9}", role_on(&v.membership, n.node_id)))
            .collect();
        let admin = if n.admin_port == 0 {
            "-".to_string()
        } else {
            n.admin_port.to_string()
        };
        println!(
            "{:<6} {:<28} {:>6} {:>6} {:>6}{roles}",
            n.node_id, n.host, n.client_port, n.peer_port, admin
        );
    }
    for view in views.iter().filter(|v| !v.from_leader) {
        println!(
            "shard {}: shown as node {} applied it (not its leader, or no leader known)",
            view.membership.shard, view.from
        );
    }
    if disagree.is_empty() {
        println!("every shard has the same members");
    } else {
        println!(
            "shards {disagree:?} differ from shard 0: a membership change did not reach every shard; \
             run it again to finish it"
        );
    }
}
