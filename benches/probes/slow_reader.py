#!/usr/bin/env python3
"""Slow-reader probe: what one client that never reads its answers costs a
running corekv cluster and its other clients.

It writes one large value (512 KiB by default), then opens one socket to
the leader of that key's shard that pipelines gets of it and never reads an
answer, for --duration seconds (20 by default). Meanwhile --put-clients
sequential clients (1 by default; 1..4 is the useful range on a small
machine) put 256-byte values to the same leader and time every put. The run
has three windows: before (--phase-seconds without the slow reader), during,
and after (--after-seconds once the slow reader has closed its socket).

One table, a row per window:
  puts, entries the target node saw committed (raft_commit_index: about
    the puts, unless someone else writes to the cluster too), puts/s,
    p50/p99/max put latency (ms) and put errors;
  RSS of the node the slow reader hits (MB; the peak sampled during the
    window and the value at its end), from process_resident_memory_bytes,
    and its anonymous part at the end (/proc/PID/status RssAnon, when the
    pid is known: --pid, or DATA_DIR/LOCK under --dev-dir; RSS also counts
    the pages of the WAL's mapped segments, which grow with the puts);
  CPU seconds that node and the whole cluster spent in the window
    (process_cpu_seconds_total);
  log lines all nodes wrote in the window (their log files: DIR/node*/corekv.log
    for a `corekv dev` cluster);
  get requests the slow reader sent, and the connections the nodes closed as
    slow readers (client_connections_closed_total{reason="slow_reader"}).

A node that cuts the slow reader off resets its socket; with --reconnect the
probe opens a new one at once (a client that keeps coming back), otherwise
it stops sending and just waits for the window to end.

Usage, against a release 3-node dev cluster on this machine:

    cargo build --release
    target/release/corekv dev --dir /tmp/kv &       # clients 7100/7200/7300, admin 7190/7290/7390
    python3 benches/probes/slow_reader.py --dev-dir /tmp/kv
    python3 benches/probes/slow_reader.py --endpoints 127.0.0.1:7100,127.0.0.1:7200,127.0.0.1:7300 \\
        --admin 127.0.0.1:7190,127.0.0.1:7290,127.0.0.1:7390 --log /tmp/kv/node1/corekv.log ...

Python 3.11+ standard library only. The request loops are bounded in time and
talk only to the addresses given.
"""

import argparse
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import probe_common as pc  # noqa: E402

VALUE_KEY = b"probe/slow-reader/value"
PUT_VALUE_BYTES = 256
# Gets encoded per send() of the slow reader.
GETS_PER_BATCH = 256


class SlowReader(threading.Thread):
    """Pipelines gets of one key on one socket and never reads."""

    def __init__(self, addr, key, consistency, reconnect):
        super().__init__(daemon=True)
        self.addr, self.key, self.consistency = addr, key, consistency
        self.reconnect = reconnect
        self.stop = threading.Event()
        self.requests_sent = 0
        self.connections = 0
        self.resets = []  # seconds from the socket's open to the node's reset
        self.next_id = 1

    def batch(self):
        frames = [pc.get_request(self.next_id + i, self.key, self.consistency) for i in range(GETS_PER_BATCH)]
        self.next_id += GETS_PER_BATCH
        return memoryview(b"".join(frames))

    def run(self):
        while not self.stop.is_set():
            sock = socket.create_connection(pc.split_addr(self.addr), timeout=5)
            sock.settimeout(0.2)
            self.connections += 1
            opened = time.monotonic()
            pending = self.batch()
            try:
                while not self.stop.is_set():
                    try:
                        pending = pending[sock.send(pending) :]
                    except socket.timeout:
                        continue  # the node stopped reading: our send buffer is full
                    if not pending:
                        self.requests_sent += GETS_PER_BATCH
                        pending = self.batch()
            except OSError:
                self.resets.append(time.monotonic() - opened)
                if not self.reconnect:
                    self.stop.wait()
            finally:
                sock.close()


class PutClient(threading.Thread):
    """Sequential puts to the leader of each key's shard, every one timed."""

    def __init__(self, cluster, number, samples):
        super().__init__(daemon=True)
        self.cluster, self.number, self.samples = cluster, number, samples
        self.stop = threading.Event()
        self.errors = []  # (time, what)
        self.conns = {}

    def conn(self, addr):
        if addr not in self.conns:
            self.conns[addr] = pc.Connection(addr)
        return self.conns[addr]

    def run(self):
        value = os.urandom(PUT_VALUE_BYTES // 2).hex().encode()
        i = 0
        while not self.stop.is_set():
            key = f"probe/slow-reader/put/{self.number}/{i % 1000}".encode()
            i += 1
            addr = self.cluster.port_for(self.cluster.leader_index(key), key)
            start = time.monotonic()
            try:
                answer = self.conn(addr).call(lambda rid: pc.put_request(rid, key, value))
            except OSError as e:
                self.errors.append((start, type(e).__name__))
                self.conns.pop(addr, None)
                time.sleep(0.05)
                continue
            done = time.monotonic()
            if answer.kind == "write":
                self.samples.append((done, done - start))
            else:
                self.errors.append((done, answer.error_name()))
                if answer.error_code == 1:
                    self.cluster.refresh_topology()


class RssSampler(threading.Thread):
    """Samples one node's RSS every `every` seconds."""

    def __init__(self, admin, every):
        super().__init__(daemon=True)
        self.admin, self.every = admin, every
        self.stop = threading.Event()
        self.samples = []  # (time, rss bytes)

    def run(self):
        while not self.stop.wait(self.every):
            try:
                self.samples.append((time.monotonic(), pc.NodeStats(self.admin).rss_bytes))
            except OSError:
                pass


def write_value(cluster, value_bytes):
    addr = cluster.port_for(cluster.leader_index(VALUE_KEY), VALUE_KEY)
    conn = pc.Connection(addr)
    try:
        value = os.urandom(value_bytes)
        answer = conn.call(lambda rid: pc.put_request(rid, VALUE_KEY, value))
        if answer.kind != "write":
            raise SystemExit(f"{addr}: put of the {value_bytes}-byte value answered {answer.error_name()}")
        check = conn.call(lambda rid: pc.get_request(rid, VALUE_KEY, "stale"))
        if check.value_len != value_bytes:
            raise SystemExit(f"{addr}: read back {check.value_len} bytes, wrote {value_bytes}")
    finally:
        conn.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    pc.add_cluster_args(parser)
    parser.add_argument("--duration", type=float, default=20, help="seconds the slow reader sends (default 20)")
    parser.add_argument("--phase-seconds", type=float, default=5, help="window before the slow reader (default 5)")
    parser.add_argument("--after-seconds", type=float, default=10, help="window after it closed (default 10)")
    parser.add_argument("--put-clients", type=int, default=1, help="sequential put clients (default 1)")
    parser.add_argument("--value-bytes", type=int, default=512 << 10, help="size of the value read (default 512 KiB)")
    parser.add_argument("--consistency", choices=sorted(pc.CONSISTENCY), default="stale",
                        help="consistency of the slow reader's gets (default stale)")
    parser.add_argument("--target-node", type=int, help="node id the slow reader connects to "
                        "(default: the leader of the value's shard)")
    parser.add_argument("--reconnect", action="store_true", help="open a new socket each time the node resets one")
    args = parser.parse_args()

    cluster = pc.Cluster.from_args(args)
    write_value(cluster, args.value_bytes)
    target = cluster.leader_index(VALUE_KEY) if args.target_node is None else cluster.index_of_node(args.target_node)
    reader_addr = cluster.port_for(target, VALUE_KEY)
    target_admin = cluster.admins[target]

    samples = []
    putters = [PutClient(cluster, n, samples) for n in range(args.put_clients)]
    sampler = RssSampler(target_admin, 0.5)
    reader = SlowReader(reader_addr, VALUE_KEY, args.consistency, args.reconnect)

    # Window boundaries: t[0] before starts, t[1] the slow reader starts,
    # t[2] it has closed, t[3] after ends. Stats and log lines at each.
    times, stats, lines, sent = [], [], [], []

    def mark():
        times.append(time.monotonic())
        stats.append(pc.stats_of(cluster))
        lines.append(sum(cluster.log_lines()))
        sent.append(reader.requests_sent)

    for p in putters:
        p.start()
    sampler.start()
    # Connections up: every put client has had an answer (or 30 s passed).
    deadline = time.monotonic() + 30
    while len(samples) < len(putters) and time.monotonic() < deadline:
        time.sleep(0.01)
    mark()
    time.sleep(args.phase_seconds)
    mark()
    reader.start()
    time.sleep(args.duration)
    reader.stop.set()
    reader.join()
    mark()
    time.sleep(args.after_seconds)
    mark()
    for p in putters:
        p.stop.set()
    sampler.stop.set()
    for p in putters:
        p.join()
    sampler.join()

    rows = []
    errors = [e for p in putters for e in p.errors]
    for w, name in enumerate(["before", "during", "after"]):
        start, end = times[w], times[w + 1]
        lat = sorted(l * 1e3 for t, l in samples if start <= t < end)
        errs = sum(1 for t, _ in errors if start <= t < end)
        rss = [r for t, r in sampler.samples if start <= t <= end] or [stats[w + 1][target].rss_bytes]
        a, b = stats[w], stats[w + 1]
        rows.append([
            name,
            f"{end - start:.1f}",
            len(lat),
            f"{b[target].commit_index - a[target].commit_index:.0f}",
            f"{len(lat) / (end - start):.0f}",
            f"{pc.percentile(lat, 50):.2f}",
            f"{pc.percentile(lat, 99):.2f}",
            f"{lat[-1] if lat else float('nan'):.1f}",
            errs,
            pc.mb(max(rss)),
            pc.mb(b[target].rss_bytes),
            pc.mb(b[target].rss_anon_bytes),
            f"{b[target].cpu_seconds - a[target].cpu_seconds:.2f}",
            f"{sum(y.cpu_seconds - x.cpu_seconds for x, y in zip(a, b)):.2f}",
            lines[w + 1] - lines[w],
            sent[w + 1] - sent[w],
            f"{sum(y.closed_slow_reader - x.closed_slow_reader for x, y in zip(a, b)):.0f}",
        ])
    node_id = cluster.node_ids[target]
    resets = ", ".join(f"{s:.2f}" for s in reader.resets[:5]) + (" ..." if len(reader.resets) > 5 else "")
    pc.print_table(
        f"slow reader: {args.value_bytes} B value, {args.consistency} gets on {reader_addr} (node {node_id}) "
        f"for {args.duration:.0f} s, {args.put_clients} put client(s) of {PUT_VALUE_BYTES} B; "
        f"{reader.connections} slow-reader socket(s), reset by the node after [{resets}] s; "
        f"RSS at start {pc.mb(stats[0][target].rss_bytes)} MB",
        ["window", "s", "puts", "commits", "puts/s", "p50 ms", "p99 ms", "max ms", "put errors",
         "RSS peak MB", "RSS end MB", "anon end MB", "node CPU s", "cluster CPU s", "log lines",
         "gets sent", "slow_reader closes"],
        rows,
    )


if __name__ == "__main__":
    main()
