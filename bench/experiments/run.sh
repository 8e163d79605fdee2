#!/bin/sh
# A/B runs of the suggested product changes, without touching forwarder/: each experiment directory holds a
# sitecustomize.py that patches one function at interpreter start; PYTHONPATH (absolute: the daemon runs in its scratch dir) puts it in front of the
# daemon (the harness passes its environment on). "base" runs the same command unpatched, right before.
#
#     sh bench/experiments/run.sh [OUT_DIR]        (from the repository root; about 5 minutes)
set -eu
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${1:-/tmp/bench-out/experiments}
mkdir -p "$OUT"
ab() {
    name=$1
    shift
    for variant in base patched; do
        if [ "$variant" = patched ]; then
            PYTHONPATH="$(pwd)/bench/experiments/$name" "$PYTHON" "$@" > "$OUT/$name-$variant.txt" 2>&1
        else
            "$PYTHON" "$@" > "$OUT/$name-$variant.txt" 2>&1
        fi
        echo "== $name $variant: $*"
        grep '^| ours\|^| [05]' "$OUT/$name-$variant.txt"
    done
}
ab ingest_asyncio_timeout bench/concurrency.py --no-rabbitmq --producers 64 --seconds 3 --rounds 3
ab sender_trust_env_off bench/drain.py --delays 0 0.05 --concurrency 8 128 --seconds 3 --rounds 3
ab no_flusher_wake bench/ack_latency.py --no-rabbitmq --rounds 3
