#!/usr/bin/env bash
# Fill .whl/ with the wheels the GPU device machine (Python 3.12, torch 2.11+cu130, no network)
# lacks for ModelOpt PTQ/export + lm-eval in-process evaluation. Run from anywhere; it works in
# the repo root. On the device:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# (see scripts/device_run.md for the full call pattern).
#
# Versions: the project's tested set, read from .venv where a package is installed there
# (fallbacks below otherwise). Every requirement of every wheel is then checked by
# scripts/check_wheels.py against .whl/ plus the device image's package list.
#
# Options:
#   --pyarrow   also put pyarrow (the .venv's version, ~40 MB) into build/stage/pyarrow/, for a
#               separate staging call, in case the device image's pyarrow is < 24 (datasets
#               5.2 needs >= 24). Not needed as long as the image's pyarrow is new enough.
#   --no-check  skip the metadata consistency check.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

WITH_PYARROW=0
CHECK=1
for arg in "$@"; do
  case "$arg" in
    --pyarrow) WITH_PYARROW=1 ;;
    --no-check) CHECK=0 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown option: $arg" >&2; exit 2 ;;
  esac
done

PY="${PY:-python3}"
VENV_PY="$ROOT/.venv/bin/python"
WHL="$ROOT/.whl"
BUDGET_MB=40

# name=fallback-version. Binary/pure wheels downloaded from PyPI as-is.
WHEELS=(
  nvidia-modelopt=0.47.0
  transformers=5.14.1
  tokenizers=0.22.2          # the image's 0.23.2 fails transformers 5.14's import-time check
  lm-eval=0.4.13
  datasets=5.2.0
  evaluate=0.4.6
  dill=0.4.1                 # datasets: dill<0.4.2
  multiprocess=0.70.19       # datasets: multiprocess<0.70.20
  fsspec=2026.9.0            # datasets: fsspec<=2026.9.0; the image's version is unknown
  omegaconf=2.4.0
  pulp=3.3.2
  pydantic=2.14.3
  pydantic-core=2.50.4
  annotated-types=0.8.0
  typing-inspection=0.4.5
  typing-extensions=4.16.0   # pydantic 2.14 needs >=4.16; the image's version is unknown
  pytablewriter=1.2.1
  dataproperty=1.1.1
  mbstrdecoder=1.1.5
  pathvalidate=3.3.1
  tabledata=1.3.5
  tcolorpy=0.1.7
  typepy=1.3.5
  pytz=2026.6                # typepy[datetime] (pytablewriter); not in the image
  chardet=6.0.0.post1
  nltk=3.10.4
  more-itertools=11.2.1
  defusedxml=0.7.1
  gguf=0.19.0
  tenacity=9.2.1             # lm-eval[api] (the completions client for endpoint gates)
)
# sdists only on PyPI (pure Python): built here with pip wheel.
SDISTS=(
  rouge-score=0.1.2
  sqlitedict=2.1.0
  word2number=1.1
)

PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
  manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64
  manylinux_2_35_x86_64)

venv_version() {  # installed version of $1 in .venv, or nothing
  [ -x "$VENV_PY" ] || return 0
  "$VENV_PY" - "$1" <<'EOF' 2>/dev/null || true
import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass
EOF
}

pin() {  # "name=fallback" -> "name==version", preferring the .venv's version
  local name="${1%%=*}" fallback="${1#*=}" v
  v="$(venv_version "$name")"
  if [ -n "$v" ] && [ "$v" != "$fallback" ]; then
    echo "note: $name: .venv has $v (script fallback $fallback); using $v" >&2
  fi
  echo "$name==${v:-$fallback}"
}

PINNED=()
for w in "${WHEELS[@]}"; do PINNED+=("$(pin "$w")"); done
SDIST_PINNED=()
for w in "${SDISTS[@]}"; do SDIST_PINNED+=("$(pin "$w")"); done

# datasets: the brief's rule is "same version as .venv"; say so explicitly.
echo "datasets pinned to: $(printf '%s\n' "${PINNED[@]}" | grep '^datasets==')"

mkdir -p "$WHL"
rm -f "$WHL"/*.whl   # exactly this set, one version each

PLAT_ARGS=()
for p in "${PLATFORMS[@]}"; do PLAT_ARGS+=(--platform "$p"); done

echo "== downloading ${#PINNED[@]} wheels for cp312 manylinux x86_64"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp "${PLAT_ARGS[@]}" -d "$WHL" "${PINNED[@]}" \
  2> >(grep -v "^WARNING: Location 'file:" >&2)

# pulp ships CBC solver binaries for six platforms (16 MB); ModelOpt's auto_quantize search
# (modelopt/torch/opt/searcher.py) runs the linux/i64 one only. Drop the others and their
# RECORD rows: 16 MB -> ~3 MB. Same name and version; pip does not hash-check RECORD.
"$PY" - "$WHL"/pulp-*.whl <<'PYEOF'
import os, sys, zipfile
src = sys.argv[1]
drop = ("pulp/solverdir/cbc/linux/arm64/", "pulp/solverdir/cbc/linux/i32/",
        "pulp/solverdir/cbc/osx/", "pulp/solverdir/cbc/win/")
before = os.path.getsize(src)
tmp = src + ".tmp"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        if info.filename.startswith(drop):
            continue
        data = zin.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            rows = data.decode().splitlines(keepends=True)
            data = "".join(r for r in rows if not r.startswith(drop)).encode()
        info.compress_type = zipfile.ZIP_DEFLATED
        zout.writestr(info, data)  # the ZipInfo keeps the mode bits (cbc stays executable)
os.replace(tmp, src)
print(f"slimmed {os.path.basename(src)}: {before / 2**20:.1f} -> "
      f"{os.path.getsize(src) / 2**20:.1f} MiB (linux/i64 CBC kept)")
PYEOF

echo "== building ${#SDIST_PINNED[@]} pure-Python wheels from sdists"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-binary=:all: \
  -w "$TMP" "${SDIST_PINNED[@]}" 2> >(grep -v "^WARNING: Location 'file:" >&2)
for f in "$TMP"/*.whl; do
  case "$(basename "$f")" in
    *-py3-none-any.whl|*-py2.py3-none-any.whl) cp "$f" "$WHL"/ ;;
    *) echo "error: $(basename "$f") is not a pure-Python wheel" >&2; exit 1 ;;
  esac
done

# one version per project (two stop the device install)
dups="$(ls "$WHL" | sed -E 's/^([^-]+)-.*/\1/' | tr 'A-Z' 'a-z' | tr '.-' '__' | sort | uniq -d)"
if [ -n "$dups" ]; then echo "error: several versions of: $dups" >&2; exit 1; fi

echo "== .whl/ ($(ls "$WHL"/*.whl | wc -l) wheels)"
ls -l "$WHL" | awk 'NR>1 {printf "%10d  %s\n", $5, $9}'
du -sh "$WHL"
total_kb=$(du -sk "$WHL" | cut -f1)
if [ "$total_kb" -gt $((BUDGET_MB * 1024)) ]; then
  echo "WARNING: .whl is over the ${BUDGET_MB} MB budget (the 64 MiB carry also holds the repo)" >&2
fi

if [ "$WITH_PYARROW" = 1 ]; then
  STAGE="$ROOT/build/stage/pyarrow"
  mkdir -p "$STAGE"
  rm -f "$STAGE"/*.whl
  PA="$(pin pyarrow=26.0.1)"
  echo "== $PA into build/stage/pyarrow (separate carry call)"
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp "${PLAT_ARGS[@]}" -d "$STAGE" "$PA" \
    2> >(grep -v "^WARNING: Location 'file:" >&2)
  du -sh "$STAGE"
fi

if [ "$CHECK" = 1 ]; then
  echo "== consistency check"
  CHECK_PY="$PY"
  [ -x "$VENV_PY" ] && CHECK_PY="$VENV_PY"
  EXTRA=()
  [ "$WITH_PYARROW" = 1 ] && EXTRA=("$ROOT/build/stage/pyarrow")
  "$CHECK_PY" "$ROOT/scripts/check_wheels.py" "$WHL" "${EXTRA[@]}"
fi
