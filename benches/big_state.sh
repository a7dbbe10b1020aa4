#!/usr/bin/env bash
# State that grows (issue 13), measured on a local 3-node cluster whose nodes
# this script starts itself (so it can kill, wipe and restart one):
#
#   1. prefill KEYS keys x VALUE_SIZE bytes, then report each node's RSS
#      against the payload it holds (keys x (key + value bytes));
#   2. BASE:    4 clients x 64 pipelined puts for DURATION, nothing else;
#               the memory again right after it and SETTLE_SECONDS later;
#   3. RESTART: the same load while one follower is killed with SIGKILL and
#               started again: seconds from its start until /health/ready
#               answers 200;
#   4. CATCHUP: the same load while one follower is killed, its data dir
#               wiped, and started again: seconds until it is ready, having
#               received the state by snapshot transfer.
#
# The follower chosen leads no shard, so the load's latency shows what the
# restart costs the leader, not an election.
#
# Environment (all optional):
#   KEYS        keys prefilled (default 1000000)
#   VALUE_SIZE  value bytes (default 1024); keys are 16 bytes
#   DURATION    measured window of each load phase (default 20s)
#   PORT_BASE   port base (default 7000: clients on 7100, 7200, 7300)
#   SHARDS      shards per node (default: corekv dev's default)
#   COREKV      a corekv binary instead of building one in release mode
#   KEEP        keep the cluster's directory at this path: logs, and the nodes'
#               data (several GB per node at the default size)
#   MEMORY_ONLY set to 1 to stop after the memory table (e.g. for
#               KEYS=10000000 VALUE_SIZE=64)
#   PHASES      the phases after BASE (default "RESTART CATCHUP")
#   SETTLE_SECONDS  how long after BASE the memory is read again, with no
#               load (default 15)
#
# Needs jq and curl. Every node this script started is killed by its pid on
# exit; the temp directory is removed unless KEEP is set.
set -euo pipefail

cd "$(dirname "$0")/.."

KEYS=${KEYS:-1000000}
VALUE_SIZE=${VALUE_SIZE:-1024}
DURATION=${DURATION:-20s}
SETTLE_SECONDS=${SETTLE_SECONDS:-15}
PORT_BASE=${PORT_BASE:-7000}
SHARDS=${SHARDS:-}
KEY_SIZE=16

for tool in jq curl; do
    command -v "$tool" >/dev/null || {
        echo "big_state.sh needs $tool (apt-get install $tool)" >&2
        exit 2
    }
done

# shellcheck source=benches/corekv_binary.sh
source benches/corekv_binary.sh

WORK=${KEEP:-$(mktemp -d -t corekv-big.XXXXXX)}
mkdir -p "$WORK"
declare -A PID=()
LOAD_PID=""

cleanup() {
    local status=$?
    [[ -n "$LOAD_PID" ]] && kill -KILL "$LOAD_PID" 2>/dev/null || true
    for i in "${!PID[@]}"; do
        kill -KILL "${PID[$i]}" 2>/dev/null || true
        wait "${PID[$i]}" 2>/dev/null || true
    done
    if [[ $status -ne 0 ]]; then
        for i in 1 2 3; do
            [[ -f "$WORK/node$i.log" ]] || continue
            echo "--- last lines of node $i ($WORK/node$i.log) ---" >&2
            tail -n 10 "$WORK/node$i.log" >&2 || true
        done
    fi
    [[ -n "${KEEP:-}" ]] || rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

client_port() { echo $((PORT_BASE + 100 * $1)); }
admin_port() { echo $((PORT_BASE + 100 * $1 + 90)); }
ENDPOINTS="127.0.0.1:$(client_port 1),127.0.0.1:$(client_port 2),127.0.0.1:$(client_port 3)"
ADMIN="127.0.0.1:$(admin_port 1),127.0.0.1:$(admin_port 2),127.0.0.1:$(admin_port 3)"

start_node() {
    "$COREKV" run --config "$WORK/cluster/node$1/corekv.toml" >>"$WORK/node$1.log" 2>&1 &
    PID[$1]=$!
}

# Seconds (with millis) since the epoch.
now() { date +%s.%N; }

# Waits until node $1 answers /health/ready with 200; prints the seconds
# since $2. Gives up after $3 seconds.
wait_ready() {
    local node=$1 since=$2 limit=$3
    local url="http://127.0.0.1:$(admin_port "$node")/health/ready"
    while true; do
        if [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" || true)" == 200 ]]; then
            awk -v a="$since" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'
            return 0
        fi
        kill -0 "${PID[$node]}" 2>/dev/null || {
            echo "node $node exited" >&2
            return 1
        }
        if awk -v a="$since" -v b="$(now)" -v l="$limit" 'BEGIN { exit !(b - a > l) }'; then
            echo "node $node not ready within $limit s" >&2
            return 1
        fi
        sleep 0.2
    done
}

metric() { # node, metric name: the sum of its samples
    curl -s --max-time 5 "http://127.0.0.1:$(admin_port "$1")/metrics" |
        awk -v m="$2" '$1 == m || index($1, m "{") == 1 { s += $2 } END { printf "%.0f", s }'
}

# A field of /proc/PID/status in bytes: VmRSS (all resident pages), RssAnon
# (heap: the state machine), RssFile (mapped files: the WAL segments).
status_bytes() { awk -v f="$2:" '$1 == f { printf "%.0f", $2 * 1024 }' "/proc/$1/status"; }

"$COREKV" dev --no-start --nodes 3 --dir "$WORK/cluster" --port-base "$PORT_BASE" ${SHARDS:+--shards "$SHARDS"} >/dev/null
for i in 1 2 3; do start_node "$i"; done
t0=$(now)
for i in 1 2 3; do wait_ready "$i" "$t0" 60 >/dev/null; done
echo "cluster ready" >&2

BENCH=(--endpoints "$ENDPOINTS" --json bench --key-size "$KEY_SIZE" --value-size "$VALUE_SIZE"
    --keyspace "$KEYS" --seed 1 --admin "$ADMIN")
LOAD=(--clients 4 --pipeline 64 --mix put=100 --warmup 1s --duration "$DURATION")

echo "prefilling $KEYS keys x $VALUE_SIZE B" >&2
"$COREKV" "${BENCH[@]}" --prefill --clients 4 --pipeline 64 --mix put=100 --warmup 0s --ops 1 >"$WORK/prefill.json" 2>"$WORK/prefill.log"
jq -r '"prefill: \(.prefill.keys) keys in \(.prefill.seconds | floor) s, errors \(.prefill.errors)"' "$WORK/prefill.json"

# Memory once the prefill's writes are applied everywhere.
for i in 1 2 3; do
    for _ in $(seq 1 300); do
        [[ "$(metric "$i" state_machine_keys)" -ge "$KEYS" ]] && break
        sleep 0.2
    done
done
payload=$((KEYS * (KEY_SIZE + VALUE_SIZE)))
memory_table() {
    echo
    echo "memory $1 (payload: $KEYS x ($KEY_SIZE + $VALUE_SIZE) B = $((payload >> 20)) MiB)"
    printf '%-5s %10s %14s %8s %9s %9s %12s %13s\n' node keys accounted_MiB RSS_MiB anon_MiB file_MiB RSS/payload anon/payload
    local i pid rss anon file
    for i in 1 2 3; do
        pid=${PID[$i]}
        rss=$(status_bytes "$pid" VmRSS)
        anon=$(status_bytes "$pid" RssAnon)
        file=$(status_bytes "$pid" RssFile)
        printf '%-5s %10s %14s %8s %9s %9s %12s %13s\n' "$i" "$(metric "$i" state_machine_keys)" \
            "$(($(metric "$i" state_machine_bytes) >> 20))" "$((rss >> 20))" "$((anon >> 20))" "$((file >> 20))" \
            "$(awk -v r="$rss" -v p="$payload" 'BEGIN { printf "%.2f", r / p }')" \
            "$(awk -v r="$anon" -v p="$payload" 'BEGIN { printf "%.2f", r / p }')"
    done
    echo "(anon: heap, the state machine; file: mapped WAL segments, page cache the kernel can drop)"
}
memory_table "after the prefill"

[[ "${MEMORY_ONLY:-}" == 1 ]] && exit 0

# A node that leads no shard right now (leadership balancing may move a
# shard to its preferred node at any time, so this is asked at each kill).
pick_follower() {
    local i
    for i in 1 2 3; do
        if [[ "$(curl -s --max-time 5 "http://127.0.0.1:$(admin_port "$i")/status" |
            jq '[.shards[] | select(.role == "leader")] | length')" == 0 ]]; then
            echo "$i"
            return 0
        fi
    done
    echo "every node leads a shard; run with fewer SHARDS" >&2
    return 1
}
follower=""

phase() { # name, then what to do while the load runs (a function name or "")
    local name=$1 action=$2
    "$COREKV" "${BENCH[@]}" "${LOAD[@]}" >"$WORK/$name.json" 2>"$WORK/$name.log" &
    LOAD_PID=$!
    [[ -z "$action" ]] || "$action"
    wait "$LOAD_PID"
    LOAD_PID=""
}

restart_follower() {
    sleep 3
    follower=$(pick_follower)
    echo "restarting node $follower (${1:-keeping its data})" >&2
    kill -KILL "${PID[$follower]}"
    wait "${PID[$follower]}" 2>/dev/null || true
    [[ "${1:-}" == wipe ]] && rm -rf "$WORK/cluster/node$follower/data"
    local started
    started=$(now)
    start_node "$follower"
    wait_ready "$follower" "$started" 600 >"$WORK/ready_seconds"
}
restart() { restart_follower; }
catchup() { restart_follower wipe; }

declare -A SECONDS_TO_READY=()
phase BASE ""
memory_table "after BASE (random overwrites)"
# And once the node has settled: the writes of a snapshot round merged
# (shard ticks) and the freed values given back (jemalloc's 10 s decay).
sleep "$SETTLE_SECONDS"
memory_table "${SETTLE_SECONDS} s after BASE, no load"
PHASES=${PHASES-RESTART CATCHUP}
for name in $PHASES; do
    case $name in
    RESTART) phase RESTART restart ;;
    CATCHUP) phase CATCHUP catchup ;;
    *)
        echo "unknown phase $name (known: RESTART CATCHUP)" >&2
        exit 2
        ;;
    esac
    SECONDS_TO_READY[$name]=$(cat "$WORK/ready_seconds")
done

printf '\n%-8s %9s %8s %8s %8s %8s %13s %14s\n' phase "puts/s" p50_ms p99_ms max_ms errors term_changes ready_after_s
for name in BASE $PHASES; do
    jq -r --arg name "$name" --arg ready "${SECONDS_TO_READY[$name]:--}" '
        [$name, (.total.ops_per_s | floor),
         (.total.latency_us.p50 / 1000), (.total.latency_us.p99 / 1000), (.total.latency_us.max / 1000),
         (.total.errors | add // 0), .leadership.term_changes, $ready] | @tsv' "$WORK/$name.json" |
        awk -F'\t' '{ printf "%-8s %9s %8.1f %8.1f %8.1f %8s %13s %14s\n", $1, $2, $3, $4, $5, $6, $7, $8 }'
done
echo "(each phase: $DURATION of 4 clients x 64 pipelined puts; the restart or wipe happens 3 s in)"
[[ -n "$follower" ]] || exit 0
echo "progress lines of node $follower during the catch-up:"
grep -E "progress|snapshot (received|applied|loaded)|replay" "$WORK/node$follower.log" | tail -n 12 || true
