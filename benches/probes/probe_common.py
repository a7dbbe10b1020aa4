"""What the probes in this directory share: the client wire format, the
admin port, the cluster's addresses and the summary table. Python 3 stdlib
only; imported by slow_reader.py and connection_burst.py (it sits beside
them, so `python3 benches/probes/slow_reader.py` finds it).

Wire format (proto/proto/client.proto): every frame is a 4-byte big-endian
length N, then N bytes of one protobuf message. Only the fields the probes
use are encoded here, by hand:

    Request  { uint64 id = 1; bool no_forward = 2;
               oneof op { Put put = 10; Get get = 11; Topology topology = 15; } }
    Put      { bytes key = 1; bytes value = 2; }
    Get      { bytes key = 1; Consistency consistency = 2; }  // STALE = 2
    Response { uint64 id = 1;
               oneof result { Error error = 10; WriteResult write = 11;
                              GetResult get = 12; TopologyResult topology = 15; } }
    Error          { ErrorCode code = 1; string message = 2; uint64 leader_id = 3;
                     string leader_addr = 4; }
    WriteResult    { uint64 version = 1; }
    GetResult      { bool found = 1; bytes value = 2; uint64 version = 3; }
    TopologyResult { uint64 cluster_id = 1; uint32 shards = 2;
                     repeated NodeInfo nodes = 3; repeated uint64 leaders = 4; }
    NodeInfo       { uint64 node_id = 1; string host = 2; uint32 client_port = 3; }

Routing: shard(key) = crc32(key) % shards (zlib's CRC-32); a node with client
port C serves shard s on C + s.
"""

import glob
import os
import socket
import struct
import time
import tomllib
import urllib.request
import zlib

FRAME_HEADER_LEN = 4

CONSISTENCY = {"linearizable": 0, "lease": 1, "stale": 2}

ERROR_CODES = {
    0: "UNSPECIFIED",
    1: "NOT_LEADER",
    2: "WRONG_SHARD",
    3: "TIMEOUT",
    4: "TOO_LARGE",
    5: "INVALID_ARGUMENT",
    6: "UNAVAILABLE",
    7: "VERSION_MISMATCH",
    8: "INTERNAL",
}

# Field numbers of Request's oneof op.
OP_PUT, OP_GET, OP_TOPOLOGY = 10, 11, 15
# Field numbers of Response's oneof result.
RESULT_ERROR, RESULT_WRITE, RESULT_GET, RESULT_TOPOLOGY = 10, 11, 12, 15

WIRE_VARINT, WIRE_LEN = 0, 2


# --- protobuf, by hand -------------------------------------------------------


def varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_varint(number, value):
    return varint(number << 3 | WIRE_VARINT) + varint(value) if value else b""


def field_bytes(number, value):
    return varint(number << 3 | WIRE_LEN) + varint(len(value)) + value


def frame(message):
    return struct.pack(">I", len(message)) + message


def put_request(request_id, key, value):
    op = field_bytes(1, key) + field_bytes(2, value)
    return frame(field_varint(1, request_id) + field_bytes(OP_PUT, op))


def get_request(request_id, key, consistency="linearizable"):
    op = field_bytes(1, key) + field_varint(2, CONSISTENCY[consistency])
    return frame(field_varint(1, request_id) + field_bytes(OP_GET, op))


def topology_request(request_id):
    return frame(field_varint(1, request_id) + field_bytes(OP_TOPOLOGY, b""))


def read_varint(data, pos):
    shift = result = 0
    while True:
        if pos >= len(data):
            raise ValueError(f"varint runs past the end of a {len(data)}-byte message")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def fields(data):
    """(number, value) of every field: an int for varints, bytes for
    length-delimited fields. Other wire types are refused."""
    pos, out = 0, []
    while pos < len(data):
        key, pos = read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == WIRE_VARINT:
            value, pos = read_varint(data, pos)
        elif wire == WIRE_LEN:
            length, pos = read_varint(data, pos)
            if pos + length > len(data):
                raise ValueError(
                    f"field {number} announces {length} bytes, {len(data) - pos} left"
                )
            value, pos = data[pos : pos + length], pos + length
        else:
            raise ValueError(f"field {number}: wire type {wire} not used by client.proto")
        out.append((number, value))
    return out


class Response:
    """The parts of a Response the probes look at."""

    def __init__(self, data):
        self.id = 0
        self.kind = None  # "error", "write", "get", "topology"
        self.error_code = None
        self.error_message = ""
        self.leader_addr = ""
        self.version = 0
        self.found = False
        self.value_len = 0
        self.shards = 0
        self.nodes = []  # (node_id, host, client_port)
        self.leaders = []
        for number, value in fields(data):
            if number == 1:
                self.id = value
            elif number == RESULT_ERROR:
                self.kind = "error"
                self.error_code = 0
                for n, v in fields(value):
                    if n == 1:
                        self.error_code = v
                    elif n == 2:
                        self.error_message = v.decode(errors="replace")
                    elif n == 4:
                        self.leader_addr = v.decode(errors="replace")
            elif number == RESULT_WRITE:
                self.kind = "write"
                self.version = dict(fields(value)).get(1, 0)
            elif number == RESULT_GET:
                self.kind = "get"
                for n, v in fields(value):
                    if n == 1:
                        self.found = bool(v)
                    elif n == 2:
                        self.value_len = len(v)
                    elif n == 3:
                        self.version = v
            elif number == RESULT_TOPOLOGY:
                self.kind = "topology"
                self._topology(value)

    def _topology(self, value):
        for n, v in fields(value):
            if n == 2:
                self.shards = v
            elif n == 3:
                node = dict(fields(v))
                host = node.get(2, b"").decode()
                self.nodes.append((node.get(1, 0), host, node.get(3, 0)))
            elif n == 4:
                if isinstance(v, bytes):  # packed repeated uint64
                    pos = 0
                    while pos < len(v):
                        leader, pos = read_varint(v, pos)
                        self.leaders.append(leader)
                else:
                    self.leaders.append(v)

    def error_name(self):
        return ERROR_CODES.get(self.error_code, str(self.error_code))


def recv_exact(sock, n):
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError(f"connection closed with {left} of {n} bytes missing")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv_response(sock):
    (length,) = struct.unpack(">I", recv_exact(sock, FRAME_HEADER_LEN))
    return Response(recv_exact(sock, length))


def shard_of(key, shards):
    return zlib.crc32(key) % shards


def split_addr(addr):
    host, _, port = addr.rpartition(":")
    return host, int(port)


class Connection:
    """One blocking client connection, one request at a time."""

    def __init__(self, addr, timeout=10.0):
        self.addr = addr
        self.sock = socket.create_connection(split_addr(addr), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.next_id = 1

    def call(self, encode):
        """Sends `encode(request_id)` and returns its Response."""
        request_id = self.next_id
        self.next_id += 1
        self.sock.sendall(encode(request_id))
        response = recv_response(self.sock)
        if response.id != request_id:
            raise ValueError(f"{self.addr}: answer to request {response.id}, expected {request_id}")
        return response

    def close(self):
        self.sock.close()


# --- the cluster -------------------------------------------------------------


class Cluster:
    """Client and admin addresses of the nodes (node i at index i-1, so the
    i-th admin address belongs to the i-th endpoint) and their log files."""

    def __init__(self, endpoints, admins, logs, pids=None):
        if len(endpoints) != len(admins):
            raise SystemExit(
                f"{len(endpoints)} endpoints but {len(admins)} admin addresses: "
                "give one admin address per endpoint, in the same order"
            )
        self.endpoints = endpoints
        self.admins = admins
        self.logs = logs
        # Node pids, for anonymous and file-backed RSS from /proc; None where unknown.
        self.pids = pids or [None] * len(endpoints)
        self.shards = 1
        self.leaders = []
        self.node_ids = list(range(1, len(endpoints) + 1))

    @staticmethod
    def from_args(args):
        """From --dev-dir (reads DIR/node*/corekv.toml, logs DIR/node*/corekv.log,
        pids from DATA_DIR/LOCK) or from --endpoints, --admin, --log and --pid."""
        if args.dev_dir:
            endpoints, admins, logs, pids = [], [], [], []
            for path in sorted(glob.glob(os.path.join(args.dev_dir, "node*", "corekv.toml"))):
                with open(path, "rb") as f:
                    config = tomllib.load(f)
                host = config.get("advertise_host") or config.get("listen_host", "127.0.0.1")
                endpoints.append(f"{host}:{config['client_port']}")
                admins.append(f"{host}:{config['admin_port']}")
                logs.append(os.path.join(os.path.dirname(path), "corekv.log"))
                pids.append(lock_holder(config.get("data_dir", "")))
            if not endpoints:
                raise SystemExit(f"no node*/corekv.toml under {args.dev_dir}")
            cluster = Cluster(endpoints, admins, logs, pids)
        else:
            if not args.endpoints or not args.admin:
                raise SystemExit("give --dev-dir, or --endpoints and --admin")
            pids = [int(p) for p in args.pid.split(",")] if args.pid else None
            cluster = Cluster(args.endpoints.split(","), args.admin.split(","), args.log or [], pids)
        cluster.refresh_topology()
        return cluster

    def refresh_topology(self):
        conn = Connection(self.endpoints[0])
        try:
            topology = conn.call(topology_request)
        finally:
            conn.close()
        if topology.kind != "topology":
            raise SystemExit(f"{self.endpoints[0]}: Topology answered {topology.kind} {topology.error_name()}")
        self.shards = topology.shards or 1
        self.leaders = topology.leaders
        # Map node ids to our endpoint order by client port.
        by_port = {port: node_id for node_id, _host, port in topology.nodes}
        self.node_ids = [by_port.get(split_addr(e)[1], i + 1) for i, e in enumerate(self.endpoints)]

    def index_of_node(self, node_id):
        return self.node_ids.index(node_id)

    def leader_index(self, key):
        """Index of the node that leads `key`'s shard (0 if unknown)."""
        shard = shard_of(key, self.shards)
        leader = self.leaders[shard] if shard < len(self.leaders) else 0
        return self.index_of_node(leader) if leader in self.node_ids else 0

    def port_for(self, index, key):
        """`host:port` of node `index`'s client port for `key`'s shard."""
        host, port = split_addr(self.endpoints[index])
        return f"{host}:{port + shard_of(key, self.shards)}"

    def log_lines(self):
        """Lines in each node's log file now (0 for a missing file)."""
        counts = []
        for path in self.logs:
            try:
                with open(path, "rb") as f:
                    counts.append(sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b"")))
            except FileNotFoundError:
                counts.append(0)
        return counts


def lock_holder(data_dir):
    """The pid in DATA_DIR/LOCK (the running node writes it there), or None."""
    try:
        with open(os.path.join(data_dir, "LOCK")) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def proc_rss(pid):
    """(anonymous, file-backed) resident bytes of `pid` from /proc/PID/status,
    or (None, None). File-backed includes the WAL's mapped segments."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("RssAnon", "RssFile", "RssShmem"):
                    values[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, TypeError):
        return None, None
    return values.get("RssAnon"), values.get("RssFile", 0) + values.get("RssShmem", 0)


# --- admin port --------------------------------------------------------------


def scrape(admin, timeout=5.0):
    """Samples of `GET /metrics` as {(name, frozenset(labels)): value}."""
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=timeout) as answer:
        text = answer.read().decode()
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name, _, labels = name_labels.partition("{")
        pairs = []
        for item in labels.rstrip("}").split(","):
            if "=" in item:
                k, _, v = item.partition("=")
                pairs.append((k.strip(), v.strip().strip('"')))
        try:
            samples[(name.strip(), frozenset(pairs))] = float(value)
        except ValueError:
            continue
    return samples


def metric(samples, name, **labels):
    """Sum of every sample of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


class NodeStats:
    """The process and connection metrics of one node at one moment."""

    def __init__(self, admin, pid=None):
        s = scrape(admin)
        self.rss_anon_bytes, self.rss_file_bytes = proc_rss(pid) if pid else (None, None)
        self.rss_bytes = metric(s, "process_resident_memory_bytes")
        self.cpu_seconds = metric(s, "process_cpu_seconds_total")
        self.open_fds = metric(s, "process_open_fds")
        self.connections = metric(s, "client_connections")
        self.rejected = metric(s, "client_connections_rejected_total")
        self.closed_slow_reader = metric(s, "client_connections_closed_total", reason="slow_reader")
        self.closed_idle = metric(s, "client_connections_closed_total", reason="idle")
        self.commit_index = metric(s, "raft_commit_index")


def stats_of(cluster):
    return [NodeStats(admin, pid) for admin, pid in zip(cluster.admins, cluster.pids)]


# --- numbers and the table ---------------------------------------------------


def percentile(sorted_values, p):
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


def mb(n_bytes):
    return "?" if n_bytes is None else f"{n_bytes / 1e6:.1f}"


def print_table(title, header, rows):
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    print(title)
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))))


def add_cluster_args(parser):
    parser.add_argument("--dev-dir", help="directory of a running `corekv dev` cluster: "
                        "addresses from its node*/corekv.toml, logs from node*/corekv.log")
    parser.add_argument("--endpoints", help="client addresses host:port,... (node 1 first)")
    parser.add_argument("--admin", help="admin addresses host:port,..., same order as --endpoints")
    parser.add_argument("--log", action="append", help="a node's log file (repeat per node)")
    parser.add_argument("--pid", help="node pids, same order as --endpoints, for anonymous RSS from /proc")


def now():
    return time.monotonic()
