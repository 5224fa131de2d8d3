#!/usr/bin/env bash
# The GPU session behind bench/results/search-gpu.md, sweep-gpu.md, the 2-minute EAGLE-3 and
# 1200-step Medusa cells of speculative-gpu.md, and pipeline_vs_bare-gpu.md: every job a
# concurrent process on one H200 (the 135M model leaves it mostly idle).
#   bash bench/gpu_search_sweep.sh start    # launches everything, returns
#   bash bench/gpu_search_sweep.sh wait S   # waits up to S seconds, prints progress
#   bash bench/gpu_search_sweep.sh pack DIR # results as a tarball in DIR
# Every job resumes (optimize run/sweep --resume; bench cells) when started again.
set -u
# shellcheck source=bench/gpu_jobs.sh
source "$(dirname "$0")/gpu_jobs.sh"

case ${1:-} in
start)
    launch search "python -m optimizer run builtin-search-int4 -o $W/search --resume; echo exit \$?"
    launch sweep "python -m optimizer sweep bench/sweep-builtin.yaml \
        --grid stages.ptq.format=fp8,int8_sq,int8_wo,nvfp4 --grid stages.ptq.kv_cache=none,fp8 \
        -o $W/sweep --resume; echo exit \$?"
    launch speculative-eagle3 python bench/speculative.py --methods eagle3 --steps 400 \
        --out "$W/speculative-out" --work "$W/speculative"
    launch speculative-medusa python bench/speculative.py --methods medusa --steps 1200 \
        --out "$W/speculative-out" --work "$W/speculative"
    ;;
wait)
    end=$((SECONDS + ${2:-500}))
    while pgrep -f "[o]ptimizer (run|sweep)|bench/[s]peculative.py|bench/[p]ipeline_vs_bare" > /dev/null && ((SECONDS < end)); do
        sleep 20
    done
    for f in "$W"/logs/*.log; do echo "== $f"; tail -n 3 "$f" | cut -c1-300; done
    pgrep -fa "[o]ptimizer (run|sweep)|bench/[s]peculative.py|bench/[p]ipeline_vs_bare" | cut -c1-150 || echo "all finished"
    ;;
pack)
    tar -C "$W" --exclude='*.safetensors' --exclude='*.pth' --exclude='*.bin' --exclude='*.pt' \
        -czf "$2/results.tgz" logs search sweep speculative-out
    ;;
*)
    echo "usage: $0 start | wait SECONDS | pack DIR" >&2
    exit 2
    ;;
esac
