"""Compute dtype by capability: float32 math where bf16 is emulated, artifacts in the recipe's
dtype, and the float32 path's scales and tensors agreeing with the bf16 path."""

import json
from pathlib import Path

import pytest
from tiny import CALIBRATION, TINY_FP8_RECIPE

from optimizer import hardware
from optimizer.cli import main
from optimizer.trtllm import read_safetensors_header

AVX2_EPYC = {"fpu", "sse2", "avx", "avx2", "fma", "f16c", "avx512f"}  # no avx512_bf16 / amx
SAPPHIRE_RAPIDS = AVX2_EPYC | {"avx512_bf16", "amx_bf16", "amx_tile"}


@pytest.mark.parametrize(
    ("storage", "requested", "cuda", "flags", "expected"),
    [
        ("bfloat16", "auto", False, AVX2_EPYC, "float32"),  # emulated bf16: compute in fp32
        ("bfloat16", "auto", False, SAPPHIRE_RAPIDS, "bfloat16"),  # native bf16 (AMX)
        ("bfloat16", "auto", True, AVX2_EPYC, "bfloat16"),  # a GPU keeps the recipe's dtype
        ("float16", "auto", False, SAPPHIRE_RAPIDS, "float32"),  # bf16 support is not fp16
        ("float32", "auto", False, AVX2_EPYC, "float32"),
        ("bfloat16", "bfloat16", False, AVX2_EPYC, "bfloat16"),  # a recipe can force either
        ("bfloat16", "float32", True, SAPPHIRE_RAPIDS, "float32"),
    ],
)
def test_compute_dtype_follows_the_hardware(storage, requested, cuda, flags, expected):
    assert hardware.compute_dtype(storage, requested, cuda=cuda, flags=flags) == expected


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert hardware.cpu_flags(x86) == {"fpu", "avx2", "avx512_bf16"}
    assert hardware.cpu_has_native("bfloat16", hardware.cpu_flags(arm))
    assert hardware.cpu_flags(tmp_path / "missing") == set()


def _run(tmp_path: Path, tiny_llama: Path, compute: str) -> Path:
    recipe = tmp_path / f"{compute}.yaml"
    recipe.write_text(
        TINY_FP8_RECIPE.format(model=tiny_llama, calib=CALIBRATION).replace(
            "  dtype: bfloat16\n", f"  dtype: bfloat16\n  compute_dtype: {compute}\n"
        )
    )
    run_dir = tmp_path / compute
    assert main(["run", str(recipe), "-o", str(run_dir), "-q"]) == 0
    return run_dir


@pytest.fixture(scope="module")
def both_paths(tmp_path_factory, tiny_llama):
    base = tmp_path_factory.mktemp("compute")
    return _run(base, tiny_llama, "float32"), _run(base, tiny_llama, "bfloat16")


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def test_float32_compute_keeps_every_artifact_in_the_recipe_dtype(both_paths):
    fp32, bf16 = both_paths
    rec = json.loads((fp32 / "run.json").read_text())
    assert rec["device"]["compute_dtype"] == "float32"
    assert json.loads((bf16 / "run.json").read_text())["device"]["compute_dtype"] == "bfloat16"
    for rel in (
        "trtllm_checkpoint/rank0.safetensors",
        "hf_checkpoint/model.safetensors",
        "stages/00-ptq/model/model.safetensors",
    ):
        a, b = read_safetensors_header(fp32 / rel), read_safetensors_header(bf16 / rel)
        assert a == b, f"{rel}: names, dtypes or shapes differ between the two paths"
    header = read_safetensors_header(fp32 / "hf_checkpoint" / "model.safetensors")
    assert header["model.norm.weight"]["dtype"] == "BF16"
    assert header["model.layers.0.mlp.down_proj.weight"]["dtype"] == "F8_E4M3"
    assert json.loads((fp32 / "trtllm_checkpoint" / "config.json").read_text())["dtype"] == (
        "bfloat16"
    )


def test_float32_compute_agrees_with_bf16_within_tolerance(both_paths):
    """Scales within 2 % (bf16 carries 8 significant bits, and calibration activations pass
    through every earlier layer in it), FP8 weight codes within one step."""
    import torch

    fp32, bf16 = both_paths
    a = _tensors(fp32 / "trtllm_checkpoint" / "rank0.safetensors")
    b = _tensors(bf16 / "trtllm_checkpoint" / "rank0.safetensors")
    scales = [k for k in a if k.endswith("scaling_factor")]
    assert len(scales) == 2 * 5 * 2  # 2 layers x (qkv, dense, fc, gate, proj) x (weight, act)
    for k in scales:
        rel = ((a[k].float() - b[k].float()).abs() / b[k].float().abs()).max().item()
        assert rel <= 0.02, f"{k}: float32 and bf16 calibration differ by {rel:.2%}"
    for k in a:
        if a[k].dtype == torch.float8_e4m3fn:
            x, y = a[k].float(), b[k].float()
            step = torch.maximum(x.abs(), y.abs()) / 8 + 2**-9  # one e4m3 step (3 mantissa bits)
            assert ((x - y).abs() <= step * 1.001).all(), f"{k}: FP8 codes differ by > 1 step"
            assert (x == y).float().mean() > 0.97, k
        elif a[k].is_floating_point() and not k.endswith("scaling_factor"):
            assert torch.equal(a[k], b[k]), f"{k}: unquantized weights must be identical"
