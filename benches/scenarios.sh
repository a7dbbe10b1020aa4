#!/usr/bin/env bash
# The benchmark scenarios of issue 7 on a fresh local 3-node `corekv dev`
# cluster, then one summary table.
#
#   L     1 client, puts            W64   64 clients, puts
#   W256  256 clients, puts         R64   64 clients, linearizable gets (prefilled)
#   S64   64 clients, stale gets (prefilled)
#   M64   64 clients, 50 % puts / 50 % gets
#   WP    64 clients x 16 pipelined puts
#   SP    64 clients x 16 pipelined stale gets (prefilled)
#   RF64  R64 served by the followers (--read-from follower); not in the
#         default set: SCENARIOS="R64 RF64" compares them
#   BIG   1M keys x 1 KiB prefilled (about 1 GB a node), then 4 clients x 64
#         pipelined puts for BIG_DURATION (default 30s); not in the default set
#   BIGREF  the same load on 100k keys x 256 B (prefilled), BIG's yardstick;
#         run it first: SCENARIOS="BIGREF BIG" RUNS=3
#   BIGVAL  the same load on 100k keys x 1 KiB (prefilled): BIG's values on
#         a tenth of its state, so BIG / BIGVAL is what the state's size
#         alone costs, BIGVAL / BIGREF what the values' size costs
#
# All but BIG: 16 B keys, 256 B values, 100k keyspace, DURATION measured
# after WARMUP.
#
# Environment (all optional):
#   PORT_BASE   port base of the dev cluster (default 7000: clients on 7100,
#               7200, 7300; admin on 7190, 7290, 7390)
#   DURATION    measured window per scenario (default 20s)
#   WARMUP      warm-up per scenario (default 2s)
#   SCENARIOS   which to run, space-separated (default: all but BIG, BIGREF
#               and BIGVAL, in order; the get scenarios write every key first, so
#               they never read an empty keyspace whatever runs before them)
#   COREKV      a corekv binary to use instead of building one in release mode
#   OUT_DIR     where the JSON of each scenario is kept (default: a temp dir)
#   RUNS        runs per scenario (default 1); the table shows, per scenario,
#               the run with the median ops/s (RUNS=3 for the README table)
#   SHARDS      shards per node (default: corekv dev's default, the cores)
#   TLS         1: the cluster runs TLS on every connection (`corekv dev
#               --tls`: mutual TLS between nodes, client certificates
#               required), and every client command connects with it
#
# Needs jq for the summary. The cluster (and its data) lives in a temp dir
# that is removed on exit; the cluster is stopped on exit, by the pid this
# script started.
set -euo pipefail

cd "$(dirname "$0")/.."

DURATION=${DURATION:-20s}
BIG_DURATION=${BIG_DURATION:-30s}
WARMUP=${WARMUP:-2s}
SCENARIOS=${SCENARIOS:-"L W64 W256 R64 S64 M64 WP SP"}
RUNS=${RUNS:-1}
SHARDS=${SHARDS:-}

command -v jq >/dev/null || {
    echo "scenarios.sh needs jq for its summary (apt-get install jq)" >&2
    exit 2
}

# shellcheck source=benches/corekv_binary.sh
source benches/corekv_binary.sh

WORK=$(mktemp -d -t corekv-scenarios.XXXXXX)
OUT_DIR=${OUT_DIR:-$WORK/results}
mkdir -p "$OUT_DIR"
# shellcheck source=benches/dev_cluster.sh
source benches/dev_cluster.sh

stop_cluster() {
    local status=$?
    stop_dev_cluster
    if [[ $status -ne 0 && -f "$WORK/dev.log" ]]; then
        echo "--- last lines of the dev cluster's output ($WORK/dev.log) ---" >&2
        tail -n 20 "$WORK/dev.log" >&2 || true
    fi
    if [[ "$OUT_DIR" == "$WORK/results" ]]; then
        rm -rf "$WORK"
    else
        rm -rf "$WORK/cluster"
    fi
    exit "$status"
}
trap stop_cluster EXIT
trap 'exit 130' INT TERM

start_dev_cluster

COMMON=(--endpoints "$ENDPOINTS" ${TLS_FLAGS[@]+"${TLS_FLAGS[@]}"} --json bench
    --key-size 16 --warmup "$WARMUP" --seed 1 --admin "$ADMIN")
SMALL=(--value-size 256 --keyspace 100000 --duration "$DURATION")

scenario_flags() {
    case "$1" in
    L) echo "${SMALL[*]} --clients 1 --mix put=100" ;;
    W64) echo "${SMALL[*]} --clients 64 --mix put=100" ;;
    W256) echo "${SMALL[*]} --clients 256 --mix put=100" ;;
    R64) echo "${SMALL[*]} --clients 64 --mix get=100 --consistency linearizable --prefill" ;;
    S64) echo "${SMALL[*]} --clients 64 --mix get=100 --consistency stale --prefill" ;;
    M64) echo "${SMALL[*]} --clients 64 --mix put=50,get=50" ;;
    # The fast path (issue 15): 16 requests in flight per connection.
    WP) echo "${SMALL[*]} --clients 64 --pipeline 16 --mix put=100" ;;
    SP) echo "${SMALL[*]} --clients 64 --pipeline 16 --mix get=100 --consistency stale --prefill" ;;
    RF64) echo "${SMALL[*]} --clients 64 --mix get=100 --consistency linearizable --prefill --read-from follower" ;;
    # State that grows (issue 13): 1M keys x 1 KiB prefilled (about 1 GB
    # per node), then pipelined puts over them.
    BIG) echo "--value-size 1024 --keyspace 1000000 --duration $BIG_DURATION --clients 4 --pipeline 64 --mix put=100 --prefill" ;;
    BIGREF) echo "--value-size 256 --keyspace 100000 --duration $BIG_DURATION --clients 4 --pipeline 64 --mix put=100 --prefill" ;;
    BIGVAL) echo "--value-size 1024 --keyspace 100000 --duration $BIG_DURATION --clients 4 --pipeline 64 --mix put=100 --prefill" ;;
    *)
        echo "unknown scenario $1 (known: L W64 W256 R64 S64 M64 WP SP RF64 BIG BIGREF BIGVAL)" >&2
        return 1
        ;;
    esac
}

# The floor on this disk: 4 KiB writes, each followed by fdatasync (dd's
# oflag=dsync), into a file in the cluster's directory; mean per write.
floor_file="$WORK/cluster/floor.dd"
dd if=/dev/zero of="$floor_file" bs=4k count=1000 2>/dev/null
floor=$(dd if=/dev/zero of="$floor_file" bs=4k count=1000 oflag=dsync conv=notrunc 2>&1 |
    awk '/copied/ { for (i = 1; i < NF; i++) if ($(i + 1) ~ /^s,?$/) s = $i; printf "%.0f", s * 1e6 / 1000 }')
rm -f "$floor_file"

for name in $SCENARIOS; do
    flags=$(scenario_flags "$name")
    for run in $(seq 1 "$RUNS"); do
        echo "== $name (run $run of $RUNS): $flags" >&2
        # shellcheck disable=SC2086 # the flags are meant to split into words
        "$COREKV" "${COMMON[@]}" $flags >"$OUT_DIR/$name.$run.json"
    done
    # The median run by ops/s stands for the scenario.
    median=$(for run in $(seq 1 "$RUNS"); do
        printf '%s %s\n' "$(jq '.total.ops_per_s' "$OUT_DIR/$name.$run.json")" "$run"
    done | sort -g | awk -v n="$RUNS" 'NR == int((n + 1) / 2) { print $2 }')
    cp "$OUT_DIR/$name.$median.json" "$OUT_DIR/$name.json"
done

# One table row: label, then the numbers of one bench JSON file.
row() {
    jq -r --arg name "$1" '
        [$name,
         (.total.ops_per_s | floor),
         .total.latency_us.p50,
         .total.latency_us.p99,
         .total.latency_us.max,
         (.total.errors | add // 0),
         (if .cpu.cpu_us_per_op == null then "-" else (.cpu.cpu_us_per_op * 10 | round / 10) end),
         .leadership.term_changes,
         (if .disk == null then "-" else .disk.snapshots end),
         (if .disk.snapshot_to_log_ratio == null then "-" else (.disk.snapshot_to_log_ratio * 100 | round / 100) end),
         (if .load_generator.cpu_us_per_op == null then "-" else (.load_generator.cpu_us_per_op * 10 | round / 10) end),
         (if .load_generator.host_cpu_pressure == null then "-" else (.load_generator.host_cpu_pressure * 100 | round) end)]
        | @tsv' "$2" |
        awk -F'\t' '{ printf "%-8s %10s %9s %9s %9s %8s %12s %13s %10s %9s %11s %9s\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12 }'
}

header() {
    printf '\n%-8s %10s %9s %9s %9s %8s %12s %13s %10s %9s %11s %9s\n' "$1" "ops/s" p50_us p99_us max_us errors cpu_us_per_op term_changes snapshots snap/log gen_us/op cpu_psi%
}

header scenario
for name in $SCENARIOS; do
    row "$name" "$OUT_DIR/$name.json"
done
if [[ -f "$OUT_DIR/BIG.json" && -f "$OUT_DIR/BIGREF.json" ]]; then
    jq -rn --slurpfile big "$OUT_DIR/BIG.json" --slurpfile ref "$OUT_DIR/BIGREF.json" \
        '"BIG / BIGREF ops/s: \($big[0].total.ops_per_s / $ref[0].total.ops_per_s * 100 | round / 100)"'
fi
if [[ -f "$OUT_DIR/BIG.json" && -f "$OUT_DIR/BIGVAL.json" ]]; then
    jq -rn --slurpfile big "$OUT_DIR/BIG.json" --slurpfile ref "$OUT_DIR/BIGVAL.json" \
        '"BIG / BIGVAL ops/s: \($big[0].total.ops_per_s / $ref[0].total.ops_per_s * 100 | round / 100)"'
fi
echo "snapshots: written by all nodes in the window; snap/log: their bytes over the bytes appended to the WALs"
echo "gen_us/op: the load generator's CPU per operation; cpu_psi%: the share of the window in which a runnable thread of this machine waited for a CPU (/proc/pressure/cpu)"

if [[ "$RUNS" -gt 1 ]]; then
    echo "(each row: the median of $RUNS runs by ops/s)"
    # Every run too: a median hides the run whose maximum was the worst.
    header run
    for name in $SCENARIOS; do
        for run in $(seq 1 "$RUNS"); do
            row "$name#$run" "$OUT_DIR/$name.$run.json"
        done
    done
fi
echo "floor: 4 KiB write + fdatasync (dd oflag=dsync) ${floor:-?} us mean"
if [[ "$OUT_DIR" != "$WORK/results" ]]; then
    echo "JSON of each scenario (every run, and NAME.json = the median run): $OUT_DIR" >&2
fi
