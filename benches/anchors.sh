#!/usr/bin/env bash
# corekv beside Redis, the speed anchor, on the same machine in one run:
# the same four workloads (16 B keys, 256 B values, 100k keyspace, 64
# connections, 1 or 16 requests in flight each) against
#
#   Redis   one unreplicated node, AOF with appendfsync always (one fsync
#           per event-loop turn for all clients), its own temp dir and port
#   corekv  a 3-node `corekv dev` cluster: every write is replicated to a
#           majority and fsynced on two of three nodes before it is answered
#
# then one table with both and the ratios (corekv / Redis). Reads: stale
# gets (from the leader's state machine, like Redis) and linearizable gets.
#
# Environment (all optional):
#   RUNS          runs of each workload (default 3); each row is the median
#   DURATION      corekv's measured window per run (default 10s, 2s warm-up)
#   REDIS_N_P1    requests per Redis run, 1 in flight (default 400000)
#   REDIS_N_P16   requests per Redis run, 16 in flight (default 3000000)
#   REDIS_PORT    (default 6390); PORT_BASE, SHARDS, COREKV as scenarios.sh
#
# Installs Debian's redis-server (redis-server, redis-benchmark,
# redis-cli) when missing, as root. Needs jq.
set -euo pipefail

cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
DURATION=${DURATION:-10s}
REDIS_N_P1=${REDIS_N_P1:-400000}
REDIS_N_P16=${REDIS_N_P16:-3000000}
REDIS_PORT=${REDIS_PORT:-6390}
SHARDS=${SHARDS:-}

command -v jq >/dev/null || {
    echo "anchors.sh needs jq (apt-get install jq)" >&2
    exit 2
}
if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
    if [[ $EUID -ne 0 ]]; then
        echo "anchors.sh needs redis-server and redis-benchmark (apt-get install redis-server)" >&2
        exit 2
    fi
    echo "installing Debian's redis-server" >&2
    # RUNLEVEL=1: the package must not start a Redis service of its own.
    RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >&2 ||
        { apt-get update -qq && RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >&2; }
fi

# shellcheck source=benches/corekv_binary.sh
source benches/corekv_binary.sh

WORK=$(mktemp -d -t corekv-anchors.XXXXXX)
# shellcheck source=benches/dev_cluster.sh
source benches/dev_cluster.sh
REDIS_PID=""

cleanup() {
    local status=$?
    stop_dev_cluster
    if [[ -n "$REDIS_PID" ]] && kill -0 "$REDIS_PID" 2>/dev/null; then
        kill -TERM "$REDIS_PID" 2>/dev/null || true
        wait "$REDIS_PID" 2>/dev/null || true
    fi
    if [[ $status -ne 0 ]]; then
        for log in "$WORK/dev.log" "$WORK/redis.log"; do
            [[ -f "$log" ]] && { echo "--- $log ---" >&2; tail -n 20 "$log" >&2; }
        done
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

median() { sort -g | awk '{ v[NR] = $0 } END { print v[int((NR + 1) / 2)] }'; }

# ---- Redis ----
mkdir -p "$WORK/redis"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK/redis" --save "" \
    --appendonly yes --appendfsync always --daemonize no >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
for _ in $(seq 1 100); do
    [[ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]] && break
    sleep 0.1
done
[[ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]] || {
    echo "redis-server did not start" >&2
    exit 1
}

# Requests per second of one redis-benchmark run of TEST (set|get) with
# PIPELINE requests in flight per connection.
redis_rps() {
    local n=$REDIS_N_P1
    [[ $2 -gt 1 ]] && n=$REDIS_N_P16
    redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c 64 -r 100000 -d 256 -t "$1" -P "$2" \
        -n "$n" --csv 2>/dev/null | awk -F'","' 'NR == 2 { print $2 }'
}

declare -A REDIS
for workload in "set 1" "set 16" "get 1" "get 16"; do
    read -r test pipeline <<<"$workload"
    echo "== redis $test -P $pipeline ($RUNS runs)" >&2
    REDIS[$test.$pipeline]=$(for _ in $(seq 1 "$RUNS"); do redis_rps "$test" "$pipeline"; done | median)
done
kill -TERM "$REDIS_PID"
wait "$REDIS_PID" 2>/dev/null || true
REDIS_PID=""

# ---- corekv ----
start_dev_cluster
COMMON=(--endpoints "$ENDPOINTS" ${TLS_FLAGS[@]+"${TLS_FLAGS[@]}"} --json bench
    --key-size 16 --value-size 256 --keyspace 100000 --clients 64 --warmup 2s
    --duration "$DURATION" --seed 1 --admin "$ADMIN")
declare -A COREKV_JSON
run_corekv() {
    local name=$1
    shift
    echo "== corekv $name ($RUNS runs): $*" >&2
    for run in $(seq 1 "$RUNS"); do
        "$COREKV" "${COMMON[@]}" "$@" >"$WORK/$name.$run.json"
    done
    local best
    best=$(for run in $(seq 1 "$RUNS"); do
        printf '%s %s\n' "$(jq '.total.ops_per_s' "$WORK/$name.$run.json")" "$run"
    done | sort -g | awk -v n="$RUNS" 'NR == int((n + 1) / 2) { print $2 }')
    COREKV_JSON[$name]="$WORK/$name.$best.json"
}
run_corekv W64 --pipeline 1 --mix put=100
run_corekv WP --pipeline 16 --mix put=100
run_corekv S64 --pipeline 1 --mix get=100 --consistency stale --prefill
run_corekv R64 --pipeline 1 --mix get=100 --consistency linearizable
run_corekv SP --pipeline 16 --mix get=100 --consistency stale
run_corekv RP --pipeline 16 --mix get=100 --consistency linearizable

printf '\n%-34s %12s %12s %7s %9s %13s\n' workload redis_ops/s corekv_ops/s ratio p99_us cpu_us_per_op
row() {
    local label=$1 redis=$2 name=$3
    jq -r --arg workload "$label" --argjson redis "$redis" '
        [$workload, ($redis | floor), (.total.ops_per_s | floor),
         (.total.ops_per_s / $redis * 100 | round / 100),
         .total.latency_us.p99,
         (if .cpu.cpu_us_per_op == null then "-" else (.cpu.cpu_us_per_op * 10 | round / 10) end)]
        | @tsv' "${COREKV_JSON[$name]}" |
        awk -F'\t' '{ printf "%-34s %12s %12s %7s %9s %13s\n", $1, $2, $3, $4, $5, $6 }'
}
row "64 conns x 1 put: SET / W64" "${REDIS[set.1]}" W64
row "64 conns x 16 puts: SET -P16 / WP" "${REDIS[set.16]}" WP
row "64 conns x 1 get: GET / S64" "${REDIS[get.1]}" S64
row "64 conns x 1 get: GET / R64" "${REDIS[get.1]}" R64
row "64 conns x 16 gets: GET -P16 / SP" "${REDIS[get.16]}" SP
row "64 conns x 16 gets: GET -P16 / RP" "${REDIS[get.16]}" RP
echo "(median of $RUNS runs each; ratio = corekv / Redis; p99 and CPU are corekv's, CPU summed over its 3 nodes)"
echo "$(redis-server --version | cut -d' ' -f1-3); corekv: 3 nodes on this machine, $DURATION per run"
