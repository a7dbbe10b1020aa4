#!/usr/bin/env bash
# What TLS costs: benches/scenarios.sh on a plaintext 3-node dev cluster,
# then on a TLS one (`corekv dev --tls`: mutual TLS between nodes, client
# certificates required), the same scenarios in one run of this script,
# then one table side by side.
#
# Environment (all optional): SCENARIOS (default "L W64 R64"), DURATION,
# WARMUP, RUNS (default 3: each row is the median run), PORT_BASE, SHARDS,
# COREKV, as scenarios.sh takes them.
set -euo pipefail

cd "$(dirname "$0")/.."

# shellcheck source=benches/corekv_binary.sh
source benches/corekv_binary.sh
export COREKV
export SCENARIOS=${SCENARIOS:-"L W64 R64"}
export RUNS=${RUNS:-3}

OUT=$(mktemp -d -t corekv-tls-cost.XXXXXX)
trap 'rm -rf "$OUT"' EXIT

for mode in plain tls; do
    mkdir -p "$OUT/$mode"
    echo "==== $mode" >&2
    TLS=$([[ $mode == tls ]] && echo 1 || echo 0) OUT_DIR="$OUT/$mode" \
        benches/scenarios.sh >"$OUT/$mode.table"
    cat "$OUT/$mode.table" >&2
done

printf '\n%-8s %12s %12s %7s %12s %12s %10s\n' scenario plain_ops/s tls_ops/s ratio plain_p50_us tls_p50_us p50_delta
for name in $SCENARIOS; do
    jq -rn --arg name "$name" \
        --slurpfile plain "$OUT/plain/$name.json" --slurpfile tls "$OUT/tls/$name.json" '
        [$name,
         ($plain[0].total.ops_per_s | floor),
         ($tls[0].total.ops_per_s | floor),
         ($tls[0].total.ops_per_s / $plain[0].total.ops_per_s * 100 | round / 100),
         $plain[0].total.latency_us.p50,
         $tls[0].total.latency_us.p50,
         ($tls[0].total.latency_us.p50 - $plain[0].total.latency_us.p50)]
        | @tsv' |
        awk -F'\t' '{ printf "%-8s %12s %12s %7s %12s %12s %10s\n", $1, $2, $3, $4, $5, $6, $7 }'
done
echo "(each side: the median of $RUNS runs by ops/s; ratio = TLS / plaintext ops/s)"
