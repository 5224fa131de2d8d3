#!/usr/bin/env bash
# The GPU session behind bench/results/pipeline_vs_bare-gpu.{json,md} (issue 17): one
# background job (a device call lasts at most 10 minutes; the bench takes ~15), polled.
#   bash bench/gpu_pipeline_vs_bare.sh start      # launches the bench, returns at once
#   bash bench/gpu_pipeline_vs_bare.sh wait S     # waits up to S seconds, prints progress
#   bash bench/gpu_pipeline_vs_bare.sh pack DIR   # results + logs into DIR ($OUT)
# BENCH_ARGS replaces the default arguments (e.g. "--models builtin" for a short session;
# a later session merges into bench/results/pipeline_vs_bare-gpu.json when the checkout has it);
# BENCH_WORK is the work directory (default /tmp/pvb: 16 GB model + ~33 GB of outputs at a
# time, weight files deleted after each side).
set -u
W=${BENCH_WORK:-/tmp/pvb}
ARGS=${BENCH_ARGS:---models builtin llama8b-shape --memory-cap 8 --memory-cap-bare}
mkdir -p "$W"

case ${1:-} in
start)
    # Results of an earlier session carried in the checkout are merged into, not replaced.
    mkdir -p "$W/out"
    cp bench/results/pipeline_vs_bare-gpu.json "$W/out/" 2> /dev/null || true
    # shellcheck disable=SC2086  # ARGS is a list of words
    setsid nohup python3 bench/pipeline_vs_bare.py $ARGS --out "$W/out" --work "$W" \
        > "$W/bench.log" 2>&1 < /dev/null &
    echo $! > "$W/bench.pid"
    echo "bench: pid $(cat "$W/bench.pid"), log $W/bench.log"
    ;;
wait)
    end=$((SECONDS + ${2:-500}))
    pid=$(cat "$W/bench.pid")
    while kill -0 "$pid" 2> /dev/null && ((SECONDS < end)); do
        sleep 15
    done
    tail -n 25 "$W/bench.log"
    if kill -0 "$pid" 2> /dev/null; then echo "still running"; else echo "finished"; fi
    ;;
pack)
    cp "$W"/out/pipeline_vs_bare-* "$2"/ 2> /dev/null
    cp "$W/bench.log" "$2"/
    tar -C "$W" -czf "$2/pipeline_vs_bare-logs.tgz" logs \
        $(cd "$W" && find . -name run.log -path "*/run/logs/*" -o -name phases.json | sed 's|^\./||')
    ls -l "$2"
    ;;
*)
    echo "usage: $0 start | wait SECONDS | pack DIR" >&2
    exit 2
    ;;
esac
