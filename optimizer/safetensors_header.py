"""What a safetensors file holds — tensor names, dtypes, shapes — read from its header alone.

Shared by the checkpoint checkers (:mod:`optimizer.trtllm.checkpoint`,
:mod:`optimizer.unified.check`) and tests: checking a multi-gigabyte export must not read its
data. stdlib-only.

The header is trusted only as far as it is consistent: every tensor's byte range must match
its dtype and shape, the ranges must tile the data buffer without gaps or overlaps (the
safetensors format forbids holes), and the buffer must end exactly where the file does. A
header that lies about sizes is rejected, as the safetensors library itself would reject it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

#: Bits per element of each safetensors dtype (sub-byte float formats included).
DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
#: Headers larger than this are refused (the safetensors library's own limit).
MAX_HEADER = 100 * 2**20


def _whole(value: Any) -> bool:
    """A size or byte offset: an int >= 0 (JSON true/false are not numbers here)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def tensor_nbytes(dtype: str, shape: list[int]) -> int:
    """Bytes one tensor of ``dtype`` and ``shape`` occupies (raises KeyError for a dtype
    safetensors does not define)."""
    numel = 1
    for d in shape:
        numel *= d
    return (numel * DTYPE_BITS[dtype] + 7) // 8


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Tensor name -> {dtype, shape} from a safetensors file, reading only its header.

    Raises ValueError (with a one-line reason) for a file that is not safetensors, is
    truncated, or whose header disagrees with itself or with the file's size.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError("file is shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, MAX_HEADER):
            raise ValueError("header length is larger than the file")
        try:
            header = json.loads(fh.read(n))
        except ValueError as e:
            raise ValueError(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    header.pop("__metadata__", None)
    out: dict[str, dict[str, Any]] = {}
    spans = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"tensor {name}: entry lacks dtype, shape or data_offsets") from None
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise ValueError(f"tensor {name}: unknown dtype {dtype!r}")
        if not isinstance(entry["shape"], list) or not all(_whole(d) for d in shape):
            raise ValueError(f"tensor {name}: shape {entry['shape']!r} is not a list of sizes")
        if not (_whole(begin) and _whole(end) and begin <= end):
            raise ValueError(f"tensor {name}: data_offsets {[begin, end]} are not a byte range")
        want = tensor_nbytes(dtype, shape)
        if end - begin != want:
            raise ValueError(
                f"tensor {name}: data_offsets span {end - begin} bytes, but {dtype} {shape} "
                f"needs {want}"
            )
        spans.append((begin, end, name))
        out[name] = {"dtype": dtype, "shape": shape}
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            what = "overlaps the previous tensor" if begin < position else "leaves a gap"
            raise ValueError(f"tensor {name}: data_offsets start at {begin} and {what}")
        position = end
    if 8 + n + position > size:
        raise ValueError(f"truncated: tensors need {8 + n + position} bytes, the file has {size}")
    if 8 + n + position < size:
        raise ValueError(
            f"the file has {size - 8 - n - position} bytes after the last tensor (the header "
            "does not describe them)"
        )
    return out
