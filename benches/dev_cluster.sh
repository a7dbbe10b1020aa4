# Sourced by the bench scripts (run from the repository root, after
# benches/corekv_binary.sh, with WORK set): a 3-node `corekv dev` cluster in
# $WORK/cluster on PORT_BASE (default 7000), with TLS when TLS=1.
#
#   start_dev_cluster   starts it and waits until every shard has a leader
#   stop_dev_cluster    stops it by the pids it started (SIGTERM, then KILL)
#
# Sets ENDPOINTS, ADMIN (comma-separated client and admin addresses),
# TLS_FLAGS (the client flags, empty without TLS) and DEV_PID.

PORT_BASE=${PORT_BASE:-7000}
DEV_PID=""
ENDPOINTS="127.0.0.1:$((PORT_BASE + 100)),127.0.0.1:$((PORT_BASE + 200)),127.0.0.1:$((PORT_BASE + 300))"
ADMIN="127.0.0.1:$((PORT_BASE + 190)),127.0.0.1:$((PORT_BASE + 290)),127.0.0.1:$((PORT_BASE + 390))"
TLS_FLAGS=()
if [[ "${TLS:-0}" == 1 ]]; then
    TLS_FLAGS=(--cacert "$WORK/cluster/tls/ca.pem" --cert "$WORK/cluster/tls/client.pem"
        --key "$WORK/cluster/tls/client-key.pem")
fi

start_dev_cluster() {
    echo "starting a 3-node dev cluster in $WORK/cluster (port base $PORT_BASE)" >&2
    "$COREKV" dev --nodes 3 --dir "$WORK/cluster" --port-base "$PORT_BASE" ${SHARDS:+--shards "$SHARDS"} \
        ${TLS_FLAGS[0]:+--tls} >"$WORK/dev.log" 2>&1 &
    DEV_PID=$!
    # Ready when `corekv status` reaches every node and every shard has a leader.
    local out
    for _ in $(seq 1 600); do
        if ! kill -0 "$DEV_PID" 2>/dev/null; then
            echo "corekv dev exited during start-up" >&2
            return 1
        fi
        if out=$("$COREKV" --endpoints "$ENDPOINTS" ${TLS_FLAGS[@]+"${TLS_FLAGS[@]}"} --timeout 1s status 2>/dev/null) &&
            ! grep -q "NO LEADER" <<<"$out"; then
            echo "cluster ready" >&2
            return 0
        fi
        sleep 0.1
    done
    echo "the dev cluster did not become ready within 60 s" >&2
    return 1
}

stop_dev_cluster() {
    if [[ -n "$DEV_PID" ]] && kill -0 "$DEV_PID" 2>/dev/null; then
        # `corekv dev` stops its nodes on SIGTERM and waits for them.
        kill -TERM "$DEV_PID" 2>/dev/null || true
        for _ in $(seq 1 200); do
            kill -0 "$DEV_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$DEV_PID" 2>/dev/null; then
            echo "corekv dev (pid $DEV_PID) did not stop; killing it and its nodes" >&2
            # The node pids are the ones dev printed when it started them.
            for pid in $(sed -n 's/^started node [0-9]* (pid \([0-9]*\)).*/\1/p' "$WORK/dev.log"); do
                kill -KILL "$pid" 2>/dev/null || true
            done
            kill -KILL "$DEV_PID" 2>/dev/null || true
        fi
        wait "$DEV_PID" 2>/dev/null || true
    fi
}
