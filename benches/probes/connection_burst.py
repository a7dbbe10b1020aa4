#!/usr/bin/env python3
"""Connection-burst probe: does a node give back what bursts of client
connections cost it?

Bursts: --rounds rounds (25 by default) of --connections concurrent
connections (2,000 by default) to one node's client port. Every connection
sends one stale get, the probe holds them all open for --hold seconds (1 by
default) and reads what came back, then closes them all and waits --settle
seconds (1 by default). After each round it reads that node's admin
/metrics: process_resident_memory_bytes, process_open_fds,
client_connections and client_connections_rejected_total, and, when it
knows the node's pid (--pid, or DATA_DIR/LOCK under --dev-dir), the
anonymous part of its RSS from /proc/PID/status (RSS also counts the pages
of the WAL's mapped segments). A node allows
max_client_connections (4096 by default) at once; more than that in one
round are answered UNAVAILABLE and counted as rejected.

Sequential: then --sequential connections (40,000 by default; 0 skips it)
one after another, each connecting, sending one stale get, reading the
answer and closing. The node's RSS and fds are read before, every 10,000
connections and after.

One table: a row per round (connections that got an answer, UNAVAILABLE,
or none; RSS, fds, open connections and rejected total after the round),
a row after --after-seconds (10 by default) of quiet, and rows for the
sequential run.

The probe raises its own open-file limit (RLIMIT_NOFILE) to what a round
needs when the hard limit allows. Usage, against a release 3-node dev
cluster on this machine:

    cargo build --release
    target/release/corekv dev --dir /tmp/kv &       # clients 7100/7200/7300, admin 7190/7290/7390
    python3 benches/probes/connection_burst.py --dev-dir /tmp/kv
    python3 benches/probes/connection_burst.py --endpoints 127.0.0.1:7100 --admin 127.0.0.1:7190 \\
        --rounds 5 --connections 5000 --sequential 0

Python 3.11+ standard library only. The request loops are bounded in count
and time and talk only to the addresses given.
"""

import argparse
import errno
import os
import resource
import selectors
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import probe_common as pc  # noqa: E402

GET_KEY = b"probe/connection-burst/key"
CONNECT_TIMEOUT_SECONDS = 10
# File descriptors the probe needs besides its connections.
SPARE_FDS = 64


def raise_fd_limit(needed):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SystemExit(f"need {needed} open files but the hard limit is {hard}: raise it (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


class BurstConn:
    """One connection of a burst: connecting, then waiting for its answer,
    then done."""

    def __init__(self, sock):
        self.sock = sock
        self.state = "connecting"
        self.buf = bytearray()
        self.answer = None


def burst(addr, count, hold_seconds, request):
    """Opens `count` connections at once, sends `request` on each as soon as
    it is connected and reads its answer; once all are connected (or after
    CONNECT_TIMEOUT_SECONDS) holds them `hold_seconds` more, then closes them.
    Returns (answered, unavailable, no answer, failed to connect)."""
    host, port = pc.split_addr(addr)
    selector = selectors.DefaultSelector()
    conns, failed = [], 0
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        code = s.connect_ex((host, port))
        if code not in (0, errno.EINPROGRESS):
            s.close()
            failed += 1
            continue
        conn = BurstConn(s)
        conns.append(conn)
        selector.register(s, selectors.EVENT_WRITE, conn)
    connecting = len(conns)
    connect_deadline = time.monotonic() + CONNECT_TIMEOUT_SECONDS
    hold_until = None
    while True:
        now = time.monotonic()
        if hold_until is None and (connecting == 0 or now >= connect_deadline):
            hold_until = now + hold_seconds
        if hold_until is not None and now >= hold_until:
            break
        for key, _ in selector.select(timeout=0.05):
            conn = key.data
            if conn.state == "connecting":
                connecting -= 1
                if conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    failed += 1
                    conn.state = "failed"
                    selector.unregister(conn.sock)
                    continue
                try:
                    conn.sock.send(request)
                except OSError:
                    failed += 1
                    conn.state = "failed"
                    selector.unregister(conn.sock)
                    continue
                conn.state = "sent"
                selector.modify(conn.sock, selectors.EVENT_READ, conn)
                continue
            try:
                chunk = conn.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            conn.buf += chunk
            if len(conn.buf) >= 4:
                (length,) = struct.unpack(">I", conn.buf[:4])
                if len(conn.buf) >= 4 + length:
                    conn.answer = pc.Response(bytes(conn.buf[4 : 4 + length]))
            if conn.answer is not None or not chunk:
                conn.state = "done"
                selector.unregister(conn.sock)
    selector.close()
    for conn in conns:
        conn.sock.close()
    answers = [c.answer for c in conns if c.answer is not None]
    unavailable = sum(1 for a in answers if a.kind == "error" and a.error_code == 6)
    no_answer = sum(1 for c in conns if c.state == "sent" or (c.state == "done" and c.answer is None))
    failed += sum(1 for c in conns if c.state == "connecting")  # not connected by the deadline
    return len(answers) - unavailable, unavailable, no_answer, failed


def sequential(addr, count, request, on_progress):
    errors = 0
    for i in range(1, count + 1):
        try:
            s = socket.create_connection(pc.split_addr(addr), timeout=5)
            s.sendall(request)
            pc.recv_response(s)
            s.close()
        except OSError:
            errors += 1
        if i % 10000 == 0 or i == count:
            on_progress(i, errors)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    pc.add_cluster_args(parser)
    parser.add_argument("--target-node", type=int, default=1, help="node id the connections go to (default 1)")
    parser.add_argument("--rounds", type=int, default=25, help="bursts (default 25; 0 skips them)")
    parser.add_argument("--connections", type=int, default=2000, help="connections per burst (default 2000)")
    parser.add_argument("--hold", type=float, default=1.0, help="seconds a burst is held open (default 1)")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds after a burst before reading metrics (default 1)")
    parser.add_argument("--after-seconds", type=float, default=10, help="quiet seconds after the last burst (default 10)")
    parser.add_argument("--sequential", type=int, default=40000, help="sequential connections (default 40000; 0 skips)")
    args = parser.parse_args()

    raise_fd_limit(args.connections + SPARE_FDS)
    cluster = pc.Cluster.from_args(args)
    target = cluster.index_of_node(args.target_node)
    addr = cluster.port_for(target, GET_KEY)
    admin, pid = cluster.admins[target], cluster.pids[target]
    request = pc.get_request(1, GET_KEY, "stale")

    header = ["step", "conns", "answered", "UNAVAILABLE", "no answer", "connect failed",
              "seconds", "RSS MB", "anon MB", "fds", "open conns", "rejected total"]
    rows = []

    def row(step, conns, outcome, seconds):
        s = pc.NodeStats(admin, pid)
        rows.append([step, conns, *outcome, f"{seconds:.1f}", pc.mb(s.rss_bytes), pc.mb(s.rss_anon_bytes),
                     f"{s.open_fds:.0f}",
                     f"{s.connections:.0f}", f"{s.rejected:.0f}"])
        print("  ".join(str(c) for c in rows[-1]), file=sys.stderr, flush=True)

    row("baseline", 0, ["", "", "", ""], 0)
    for r in range(1, args.rounds + 1):
        start = time.monotonic()
        outcome = burst(addr, args.connections, args.hold, request)
        seconds = time.monotonic() - start
        time.sleep(args.settle)
        row(f"round {r}", args.connections, list(outcome), seconds)
    if args.rounds:
        time.sleep(args.after_seconds)
        row(f"+{args.after_seconds:.0f} s quiet", 0, ["", "", "", ""], 0)
    if args.sequential:
        start = time.monotonic()

        def progress(done, errors):
            row(f"sequential {done}", done, [done - errors, "", "", errors], time.monotonic() - start)

        sequential(addr, args.sequential, request, progress)
    pc.print_table(
        f"connection bursts on {addr} (node {args.target_node}, admin {admin}): {args.rounds} rounds of "
        f"{args.connections} concurrent connections, each one stale get, held {args.hold:g} s, "
        f"metrics {args.settle:g} s after closing; then {args.sequential} sequential connections",
        header,
        rows,
    )


if __name__ == "__main__":
    main()
