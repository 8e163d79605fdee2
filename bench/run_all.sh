#!/bin/sh
# Run the whole bench suite once, one script after the other, each with the sizes bench/README.md quotes,
# and keep every output in one directory (default /tmp/bench-out/run-<UTC time>).
#
#     sh bench/run_all.sh [OUT_DIR]        (from the repository root; about 8 minutes on 2 cores)
#
# PYTHON defaults to .venv/bin/python. Nothing else may load the machine meanwhile: every figure is
# CPU-bound somewhere, and the load average is recorded before and after to show whether it was quiet.
set -eu
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${1:-/tmp/bench-out/run-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "uncommitted changes under forwarder/: $(git status --short forwarder/ 2>/dev/null | wc -l)"
    echo "nproc: $(nproc)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    echo "kernel: $(uname -r)"
    echo "python: $($PYTHON -V 2>&1)"
    echo "temp dir filesystem: $(df -T "${TMPDIR:-/tmp}" | awk 'NR == 2 {print $1, $2}')"
    echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
} > "$OUT/machine.txt"

run() {
    name=$1
    shift
    echo "== $name: $PYTHON $*" >&2
    started=$(date +%s)
    "$PYTHON" "$@" > "$OUT/$name.txt" 2>&1
    echo "   $(( $(date +%s) - started )) s" >&2
}

run ack_latency bench/ack_latency.py --rounds 5 --requests 2000 --rabbitmq-requests 1000 --sequential 5000
run ack_budget bench/ack_budget.py
run concurrency bench/concurrency.py --producers 1 16 64 256 --seconds 3 --rounds 3
run concurrency-ping bench/concurrency.py --ping --producers 1 16 64 256 --seconds 3 --rounds 3
run drain bench/drain.py --delays 0 0.05 --concurrency 1 8 32 128 --seconds 3 --rounds 3 --backlog 20000
run ack_during_drain bench/ack_during_drain.py --concurrency 1 8 32 --seconds 6 --rounds 3 --backlog 20000
run scale bench/scale.py --messages 1000000 --rounds 3 --connections 4 --seconds 5
run hotspots bench/hotspots.py --seconds 5 --rate 250 --out "$OUT/py-spy"

echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/machine.txt"
echo "commit after: $(git rev-parse HEAD 2>/dev/null || echo unknown)" >> "$OUT/machine.txt"
echo "outputs in $OUT" >&2
