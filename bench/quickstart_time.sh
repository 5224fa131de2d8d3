#!/usr/bin/env bash
# Time the README's quickstart as a newcomer meets it: a fresh clone of this repository's
# HEAD, an empty optimizer cache (builtin model not yet converted, no cached baseline), the
# pip cache as it is. Install and run are timed separately.
#
#   bash bench/quickstart_time.sh            # writes bench/results/quickstart-cpu.md
#
# The machine's CPU model, core count and the flags that decide the compute dtype are
# recorded next to the times.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
OUT="$REPO/bench/results/quickstart-cpu.md"

git clone --quiet "$REPO" "$WORK/optimizer"
cd "$WORK/optimizer"
export OPTIMIZER_CACHE_DIR="$WORK/cache"   # empty: the first run converts the builtin model

t0=$(date +%s)
make .venv/.installed >"$WORK/install.log" 2>&1
t1=$(date +%s)
status=0
make quickstart >"$WORK/run.log" 2>&1 || status=$?
t2=$(date +%s)

install_s=$((t1 - t0))
run_s=$((t2 - t1))
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
flags=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|avx512f|avx512_bf16|amx_bf16|amx_tile)$' | tr '\n' ' ' || true)
gate=$(python3 - "$WORK/optimizer/runs/quickstart" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
try:
    rec = json.loads((run / "run.json").read_text())
    gate = json.loads((run / "report" / "gate.json").read_text())
except OSError as e:
    print(f"(no gate result: {e})"); sys.exit()
stages = ", ".join(f"{s['name']} {s.get('seconds', 0):.0f} s" for s in rec["stages"])
print(f"status {rec['status']}, compute dtype {rec['device'].get('compute_dtype')}; stages: {stages}")
for m in gate["metrics"]:
    print(f"- {m['metric']} (n={m['n']}): {m['baseline']:.4f} -> {m['candidate']:.4f}, "
          f"{m['verdict']} ({m['reason']})")
EOF
)

mkdir -p "$(dirname "$OUT")"
cat >"$OUT" <<EOF
# The quickstart from a fresh clone

Command: \`bash bench/quickstart_time.sh\` ($(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD))
Machine: $cpu, $(nproc) cores; flags of note: ${flags:-none}

| step | seconds |
|---|---|
| install (\`make .venv/.installed\`, pip cache warm) | $install_s |
| run (\`make quickstart\`, empty optimizer cache) | $run_s |

\`make quickstart\` exit status: $status

$gate
EOF
cat "$OUT"
exit "$status"
