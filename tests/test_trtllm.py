"""The TensorRT-LLM checkpoint validator (`optimize check`) on good and deliberately broken
checkpoints; the facts table (optimizer/trtllm/facts.py) its rules come from, and agreement
with the trtllm-build test double that reads the same table."""

import ast
import json
import shutil
import struct
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file
from tiny import REPO, run_tiny_recipe

from optimizer import formats, trtllm
from optimizer.cli import main
from optimizer.trtllm import checkpoint, facts


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory, tiny_llama):
    base = tmp_path_factory.mktemp("ckpt")
    assert (
        run_tiny_recipe(base, tiny_llama, ["ptq: {format: fp8, kv_cache: fp8}", "export: {}"]) == 0
    )
    return base / "run" / "trtllm_checkpoint"


def broken(src, dst, edit_config=None, edit_tensors=None):
    shutil.copytree(src, dst)
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    if edit_tensors:
        tensors = load_file(dst / "rank0.safetensors")
        edit_tensors(tensors)
        save_file(tensors, dst / "rank0.safetensors")
    return [str(p) for p in trtllm.check_checkpoint(dst)]


def test_good_checkpoint_passes(fp8_checkpoint, capsys):
    assert trtllm.check_checkpoint(fp8_checkpoint) == []
    assert main(["check", str(fp8_checkpoint)]) == 0
    assert "ok:" in capsys.readouterr().out


def test_unknown_quantization_key(fp8_checkpoint, tmp_path):
    found = broken(
        fp8_checkpoint, tmp_path / "c", lambda c: c["quantization"].update(fp8_scales="x")
    )
    assert found == [
        "quantization.fp8_scales is not a key TensorRT-LLM accepts (it rejects unknown keys)"
    ]


def test_missing_activation_scaling_factor_on_an_fp8_layer(fp8_checkpoint, tmp_path):
    name = "transformer.layers.1.mlp.proj.activation_scaling_factor"
    found = broken(fp8_checkpoint, tmp_path / "c", edit_tensors=lambda t: t.pop(name))
    assert found == [f"rank0: {name} is missing on a FP8 layer"]


def test_missing_rank_file(fp8_checkpoint, tmp_path):
    found = broken(
        fp8_checkpoint, tmp_path / "c", lambda c: c["mapping"].update(world_size=2, tp_size=2)
    )
    assert found == ["rank1.safetensors is missing (world_size is 2)"]


def test_unsupported_quant_algo(fp8_checkpoint, tmp_path):
    found = broken(
        fp8_checkpoint, tmp_path / "c", lambda c: c["quantization"].update(quant_algo="W4A16_NVFP4")
    )
    assert found == ["quantization.quant_algo 'W4A16_NVFP4' is not supported by TensorRT-LLM"]


def test_missing_kv_cache_scale_and_wrong_shapes(fp8_checkpoint, tmp_path):
    import torch

    def edit(t):
        t.pop("transformer.layers.0.attention.kv_cache_scaling_factor")
        t["transformer.layers.0.mlp.fc.weight"] = t["transformer.layers.0.mlp.fc.weight"][
            :10
        ].contiguous()
        t["transformer.layers.1.attention.dense.weight"] = torch.zeros(
            128, 128, dtype=torch.bfloat16
        )

    found = broken(fp8_checkpoint, tmp_path / "c", edit_tensors=edit)
    assert (
        "rank0: transformer.layers.0.attention.kv_cache_scaling_factor is missing (FP8 KV cache)"
        in found
    )
    assert (
        "rank0: transformer.layers.0.mlp.fc.weight has shape [10, 128], expected [256, 128] (FP8)"
        in found
    )
    assert (
        "rank0: transformer.layers.1.attention.dense.weight is BF16, expected F8_E4M3 for FP8"
        in found
    )


def test_truncated_rank_file_and_missing_config_key(fp8_checkpoint, tmp_path):
    dst = tmp_path / "c"
    shutil.copytree(fp8_checkpoint, dst)
    data = (dst / "rank0.safetensors").read_bytes()
    (dst / "rank0.safetensors").write_bytes(data[: len(data) // 2])
    found = [str(p) for p in trtllm.check_checkpoint(dst)]
    assert len(found) == 1 and found[0].startswith("rank0.safetensors is unreadable: truncated")
    found = broken(fp8_checkpoint, tmp_path / "d", lambda c: c.pop("architecture"))
    assert found == ["config.json lacks required key 'architecture'"]


def test_check_cli_prints_problems_with_hints_and_exits_2(fp8_checkpoint, tmp_path, capsys):
    broken(
        fp8_checkpoint, tmp_path / "c", lambda c: c["quantization"].update(quant_algo="NVFP4_AWQ")
    )
    assert main(["check", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "quant_algo 'NVFP4_AWQ' is not supported" in err and "hint: " in err


def test_check_cli_dispatches_an_hf_checkpoint_to_the_hf_checker(tiny_llama, capsys):
    """A Hugging Face directory goes to the unified-checkpoint checker (tests/test_unified_check.py)."""
    assert main(["check", str(tiny_llama)]) == 0
    assert "Hugging Face checkpoint, unquantized" in capsys.readouterr().out


# --------------------------------------------------------------------------- the facts table

FACTS_FILE = REPO / "optimizer" / "trtllm" / "facts.py"
DOUBLE = REPO / "tests" / "doubles" / "trtllm-build"


def test_facts_import_with_the_standard_library_only():
    """The trtllm-build double loads facts.py by path under any python3: no third-party module
    (nor the rest of this package) may be imported by it."""
    tree = ast.parse(FACTS_FILE.read_text())
    imported = {
        (a.name if isinstance(n, ast.Import) else n.module).split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in (n.names if isinstance(n, ast.Import) else [n])
    }
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('trtllm_facts', {str(FACTS_FILE)!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules[spec.name] = m\n"
        "spec.loader.exec_module(m)\n"
        "extra = sorted(n for n in sys.modules if n.split('.')[0] not in sys.stdlib_module_names\n"
        "               and n not in ('__main__', 'trtllm_facts'))\n"
        "print(extra, m.DEFAULT_IMAGE)\n"
    )
    # -I -S: isolated and without site, so neither site-packages nor PYTHONPATH (this
    # package) is importable.
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[]", "nvcr.io/nvidia/tensorrt-llm/release:1.2.0"]


def test_the_package_re_exports_the_table_and_the_validator():
    assert trtllm.QUANT_ALGOS is facts.QUANT_ALGOS and trtllm.DEFAULT_IMAGE == facts.DEFAULT_IMAGE
    assert trtllm.check_checkpoint is checkpoint.check_checkpoint
    assert {"use_meta_recipe", "mamba_ssm_cache_dtype"} <= facts.QUANTIZATION_KEYS
    assert set(facts.ALGO_FACTS) <= facts.QUANT_ALGOS
    assert sorted(facts.KV_CACHE_QUANT_ALGOS) == ["FP8", "INT8", "NVFP4"]


@pytest.mark.parametrize(
    "algo,group,tp,hidden,found",
    [
        ("W4A16_AWQ", 128, 1, 576, "multiples of 128 (max(64, group_size 128) x tp 1)"),
        ("W4A16_AWQ", 128, 1, 4096, None),
        ("W4A16_AWQ", 64, 1, 576, None),
        ("W4A16_AWQ", 64, 2, 576, "multiples of 128 (max(64, group_size 64) x tp 2)"),
        ("W4A16_AWQ", None, 1, 576, "multiples of 128"),  # the default group is 128
        ("W4A8_AWQ", 32, 1, 576, "multiples of 128 (max(128, group_size 32) x tp 1)"),
        ("W4A8_AWQ", 64, 1, 4096, "does not implement W4A8 AWQ with group_size 64"),
        ("W4A8_AWQ", 128, 4, 4096, None),
        ("FP8", 128, 1, 576, None),  # not AWQ: no padding rule
        (None, None, 1, 576, None),
    ],
)
def test_awq_layout_rule(algo, group, tp, hidden, found):
    problems = facts.awq_layout_problems(algo, group, tp, {"hidden_size": hidden, "other": None})
    if found is None:
        assert problems == []
    else:
        (msg,) = problems
        assert found in msg and (f"hidden_size = {hidden}" in msg or "group_size 64" in msg)


def test_formats_delegate_the_awq_rule_to_the_table():
    model = {"hidden_size": 576, "num_attention_heads": 9, "intermediate_size": 1536}
    (msg,) = formats.trtllm_layout_problems("int4_awq", None, 1, model)
    assert msg.startswith("int4_awq: TensorRT-LLM 1.2 pads W4A16_AWQ GEMM dimensions")
    assert "multiples of 128" in msg and "hidden_size (q/k/v, gate/up inputs) = 576" in msg
    assert formats.trtllm_layout_problems("int4_awq", 64, 1, model) == []
    assert formats.trtllm_layout_problems("fp8", None, 1, model) == []


def _synthetic_checkpoint(path, quantization, hidden=576, heads=9):
    """config.json + an empty rank file: enough for the config-level and AWQ rules."""
    path.mkdir()
    config = {
        "architecture": "LlamaForCausalLM",
        "dtype": "bfloat16",
        "hidden_size": hidden,
        "num_hidden_layers": 1,
        "num_attention_heads": heads,
        "intermediate_size": 1536,
        "quantization": quantization,
    }
    (path / "config.json").write_text(json.dumps(config))
    (path / "rank0.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    return path


def test_the_validator_applies_the_awq_rule_with_hints(tmp_path):
    ckpt = _synthetic_checkpoint(tmp_path / "a", {"quant_algo": "W4A16_AWQ", "group_size": 128})
    awq = [p for p in trtllm.check_checkpoint(ckpt) if "GEMM dimensions" in p.message]
    assert len(awq) == 1 and "multiples of 128" in awq[0].message
    assert "hidden_size = 576" in awq[0].message and awq[0].hint == checkpoint.HINTS["shape"]
    ckpt = _synthetic_checkpoint(tmp_path / "b", {"quant_algo": "W4A8_AWQ", "group_size": 64})
    w4a8 = [p for p in trtllm.check_checkpoint(ckpt) if "does not implement" in p.message]
    assert len(w4a8) == 1 and w4a8[0].hint == checkpoint.HINTS["algo"]
    ckpt = _synthetic_checkpoint(
        tmp_path / "c", {"quant_algo": "W4A16_AWQ", "group_size": 128}, hidden=4096, heads=32
    )
    assert not [p for p in trtllm.check_checkpoint(ckpt) if "GEMM dimensions" in p.message]


def _build(algo, kv=None, sm=None, paged=True, fp8_fmha=False):
    return facts.engine_build_problems(
        algo, kv, sm, use_paged_context_fmha=paged, use_fp8_context_fmha=fp8_fmha
    )


@pytest.mark.parametrize(
    "algo,kv,sm,found",
    [
        ("FP8", None, 8.6, "FP8 needs SM 8.9+ (Ada/Hopper); target is 8.6 (quant_algo FP8)"),
        ("FP8", None, 8.9, None),
        ("FP8", None, 10.0, None),
        (None, "FP8", 8.0, "FP8 needs SM 8.9+ (Ada/Hopper); target is 8.0 (FP8 KV cache)"),
        ("W4A8_AWQ", None, 8.6, "FP8 needs SM 8.9+"),
        ("MIXED_PRECISION", None, 8.0, "FP8 needs SM 8.9+"),
        ("W4A16_AWQ", None, 8.0, None),  # int4 weight-only runs on Ampere
        ("NVFP4", None, 9.0, "NVFP4 engines need SM 10.0+ (Blackwell); target is 9.0"),
        ("NVFP4", None, 10.0, None),
        ("W4A16_AWQ", None, 10.0, "TensorRT-LLM 1.2 rejects W4A16_AWQ on SM 10.0"),
        ("W4A16_AWQ", None, 9.0, None),
        ("W8A8_SQ_PER_CHANNEL", None, 12.0, "rejects W8A8_SQ_PER_CHANNEL on SM 12.0"),
        ("FP8_PER_CHANNEL_PER_TOKEN", None, 10.0, "rejects FP8_PER_CHANNEL_PER_TOKEN on SM 10.0"),
        ("FP8", "INT8", 10.0, "TensorRT-LLM 1.2 rejects an INT8 KV cache on SM 10.0"),
        ("W4A16_AWQ", None, None, None),  # unknown target: no SM rule applies
    ],
)
def test_engine_build_sm_rules(algo, kv, sm, found):
    problems = _build(algo, kv, sm, paged=kv != "INT8")
    if found is None:
        assert problems == []
    else:
        assert [key for key, _ in problems] == ["gpu_compute_capability"]
        assert found in problems[0][1]


def test_engine_build_fmha_and_kv_cache_rules():
    (p,) = _build("FP8", None, fp8_fmha=True)
    assert p == (
        "use_fp8_context_fmha",
        "FP8 context FMHA needs an FP8 KV cache (ptq kv_cache: fp8)",
    )
    assert _build("FP8", "FP8", fp8_fmha=True) == []
    (p,) = _build("W4A16_AWQ", "FP8")
    assert p[0] == "" and "W4A16_AWQ with an FP8 KV cache" in p[1]
    assert "turns paged context FMHA off" in p[1]
    assert _build("W4A16_AWQ", "FP8", paged=False) == []
    assert _build("FP8", "FP8") == []
    (p,) = _build("W8A8_SQ_PER_CHANNEL", "INT8")
    assert p[0] == "use_paged_context_fmha" and "INT8 KV cache does not work" in p[1]
    assert _build("W8A8_SQ_PER_CHANNEL", "INT8", paged=False) == []
    # What trtllm-build itself raises on (the double enforces these) excludes the silent
    # degradation and the GPU rules.
    assert (
        facts.trtllm_build_errors(
            "W4A16_AWQ", "FP8", use_paged_context_fmha=True, use_fp8_context_fmha=False
        )
        == []
    )
    assert (
        len(
            facts.trtllm_build_errors(
                "FP8", "INT8", use_paged_context_fmha=True, use_fp8_context_fmha=True
            )
        )
        == 2
    )


@pytest.mark.parametrize(
    "version,found",
    [
        ("1.3.0", "TensorRT-LLM 1.3.0 has no trtllm-build engine path (removed after 1.2)"),
        ("1.3.0rc20", "no trtllm-build engine path"),
        ("2.0.0", "no trtllm-build engine path"),
        ("1.2.0", None),
        ("1.2.1.post1", None),
        ("1.0.0", None),
        ("0.21.0", "TensorRT-LLM 0.21.0 predates the checkpoints ModelOpt 0.47 writes"),
        ("unknown", "not a version number"),
    ],
)
def test_engine_version_rule(version, found):
    problem = facts.engine_version_problem(version)
    assert problem is None if found is None else found in problem


# --------------------------------------------------------------------------- double vs validator


def _double_accepts(ckpt, tmp_path, *flags) -> bool:
    # -I -S: the double runs without this package importable, as under a bare python3.
    proc = subprocess.run(
        [sys.executable, "-I", "-S", str(DOUBLE), "--checkpoint_dir", str(ckpt)]
        + ["--output_dir", str(tmp_path / "engine"), *flags],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 or "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode == 0


EXTRA_KEYS = sorted(facts.QUANTIZATION_KEYS - {"quant_algo", "kv_cache_quant_algo"})


@pytest.mark.parametrize(
    "edit,accepted",
    [
        (lambda q: None, True),
        (lambda q: q.update(fp8_scales="x"), False),  # a key outside the table
        (lambda q: q.update(quant_algo="W4A16_NVFP4"), False),  # an algo outside the table
        (lambda q: q.update(quant_algo="NVFP4_AWQ"), False),
        (lambda q: q.update(kv_cache_quant_algo="FP4"), False),
        (lambda q: q.update(kv_cache_quant_algo="INT4"), False),
        (lambda q: q.update(quant_algo="FP8_BLOCK_SCALES"), True),  # in the table
        (lambda q: q.update(dict.fromkeys(EXTRA_KEYS)), True),  # every accepted key
    ],
)
def test_the_double_and_the_validator_agree(fp8_checkpoint, tmp_path, edit, accepted):
    ckpt = tmp_path / "c"
    shutil.copytree(fp8_checkpoint, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    edit(config["quantization"])
    (ckpt / "config.json").write_text(json.dumps(config))
    assert (trtllm.check_checkpoint(ckpt) == []) is accepted
    assert _double_accepts(ckpt, tmp_path) is accepted


def test_the_double_enforces_the_tables_fmha_rules(fp8_checkpoint, tmp_path):
    ckpt = tmp_path / "c"
    shutil.copytree(fp8_checkpoint, ckpt)
    assert _double_accepts(ckpt, tmp_path, "--use_fp8_context_fmha", "enable")  # FP8 KV
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization"]["kv_cache_quant_algo"] = "INT8"
    (ckpt / "config.json").write_text(json.dumps(config))
    assert not _double_accepts(ckpt, tmp_path, "--use_fp8_context_fmha", "enable")
    assert not _double_accepts(ckpt, tmp_path, "--use_paged_context_fmha", "enable")
    assert _double_accepts(ckpt, tmp_path, "--use_paged_context_fmha", "disable")
