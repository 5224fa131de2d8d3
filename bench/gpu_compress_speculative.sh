#!/usr/bin/env bash
# The GPU session behind bench/results/compress-gpu.md (width, both) and
# bench/results/speculative-gpu.md: every chain as a concurrent process on one H200 (a 135M
# model leaves it mostly idle), then the latency pass alone.
#   bash bench/gpu_compress_speculative.sh start    # launches everything, returns
#   bash bench/gpu_compress_speculative.sh wait S   # waits up to S seconds, prints progress
#   bash bench/gpu_compress_speculative.sh latency  # forward latency of the new variants
#   bash bench/gpu_compress_speculative.sh pack DIR # results as two tarballs in DIR
# Cells are resumable: a chain killed with its machine is redone from its last finished step.
set -u
# shellcheck source=bench/gpu_jobs.sh
source "$(dirname "$0")/gpu_jobs.sh"

case ${1:-} in
start)
    for v in width both; do
        launch "compress-$v" python bench/compress.py --variants $v --no-latency \
            --out "$W/compress-out" --work "$W/compress"
    done
    launch speculative-eagle3 python bench/speculative.py --methods eagle3 --steps 1200 3000 6000 \
        --parallel --out "$W/speculative-out" --work "$W/speculative"
    launch speculative-medusa python bench/speculative.py --methods medusa --steps 1200 3000 \
        --parallel --out "$W/speculative-out" --work "$W/speculative"
    # draft-target: the pruned (20 of 30 layers) + distilled model as the draft
    launch speculative-draft-target "python bench/compress.py --variants depth \
        --steps-to-run distill --no-latency --out $W/compress-depth --work $W/compress && \
        python bench/speculative.py --methods draft_target \
        --draft-model $W/compress/depth/run/stages/01-distill/model \
        --out $W/speculative-out --work $W/speculative"
    ;;
wait)
    end=$((SECONDS + ${2:-500}))
    while pgrep -f "bench/(compress|speculative).py" > /dev/null && ((SECONDS < end)); do
        sleep 20
    done
    for f in "$W"/logs/*.log; do echo "== $f"; tail -n 4 "$f"; done
    ls "$W"/compress-out "$W"/speculative-out 2>/dev/null
    pgrep -fa "bench/(compress|speculative).py" | cut -c1-150 || echo "all finished"
    ;;
latency)
    python bench/compress.py --variants width both --out "$W/compress-out" --work "$W/compress"
    ;;
pack)
    tar -C "$W" -czf "$2/compress.tgz" compress-out logs
    tar -C "$W" -czf "$2/speculative.tgz" speculative-out
    ;;
*)
    echo "usage: $0 start | wait SECONDS | latency | pack DIR" >&2
    exit 2
    ;;
esac
