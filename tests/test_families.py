"""Model families beyond Llama (optimizer/architectures.py) on tiny random models built from
their transformers configs: every supported cell of the README's support matrix goes through
ptq -> export -> check -> gate -> deploy here, and every unsupported one is refused at validation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tiny import TINY_SUITE as SUITE
from tiny import make_tiny_family, plant_a_dead_expert, run_tiny_recipe

from optimizer import architectures
from optimizer.cli import main
from optimizer.techniques.moe import routers

torch = pytest.importorskip("torch")

FAMILIES = {t: f for f in architectures.FAMILIES for t in f.model_types}
NON_LLAMA = [t for t in FAMILIES if t != "llama"]  # (Llama: every other test file)


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {t: make_tiny_family(root / t, t) for t in NON_LLAMA}


def pipeline(tmp_path, model, model_type, fmt):
    fam = FAMILIES[model_type]
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE)
    trt = "{tp: 1, pp: 1}" if fam.trtllm_checkpoint else "null"
    group = ", group_size: 32" if "awq" in fmt else ""
    return run_tiny_recipe(
        tmp_path,
        model,
        [
            f"ptq: {{format: {fmt}{group}}}",
            f"export: {{trtllm_checkpoint: {trt}, hf_checkpoint: true}}",
            f"gate: {{suite: {suite}}}",
            f"deploy: {{targets: [{', '.join(runtimes(fmt))}], smoke_test: false}}",
        ],
    )


def runtimes(fmt: str) -> list[str]:
    """The deploy targets that load ``fmt`` (vLLM and SGLang load no ModelOpt INT4 AWQ)."""
    return ["trtllm", "vllm", "sglang"] if fmt == "fp8" else ["trtllm"]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float().flatten()


IDS = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))


SUPPORTED = [(t, fmt) for t in NON_LLAMA for fmt in ("fp8", "int4_awq")]


@pytest.mark.parametrize(("model_type", "fmt"), SUPPORTED)
def test_every_supported_cell_goes_through_the_pipeline(
    family_models, tmp_path, model_type, fmt, capsys
):
    from transformers import AutoModelForCausalLM

    from optimizer.unified.rebuild import rebuild

    fam = FAMILIES[model_type]
    model = family_models[model_type]
    assert pipeline(tmp_path, model, model_type, fmt) == 0, capsys.readouterr().err
    run = tmp_path / "run"
    rec = json.loads((run / "run.json").read_text())
    assert rec["status"] == "success"
    exports = ["hf_checkpoint", *(["trtllm_checkpoint"] if fam.trtllm_checkpoint else [])]
    for what in exports:
        assert main(["check", str(run / what)]) == 0, capsys.readouterr().out
    # What a server loads computes what the model computes: the model rebuilt from the export
    # correlates with the unquantized source's logits, and a control that lost its
    # quantization scales does not.
    plain = logits(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), IDS)
    got = logits(rebuild(run / "hf_checkpoint", "float32").model, IDS)
    corr = torch.corrcoef(torch.stack([plain, got]))[0, 1].item()
    # measured 0.994-0.999 (FP8), 0.96-0.994 (INT4 AWQ; Gemma lowest)
    assert corr > (0.98 if fmt == "fp8" else 0.93), corr
    if fmt == "fp8" and not fam.moe:  # (transformers cannot even load an MoE export plainly)
        # the control: the FP8 export through plain from_pretrained, which drops the scales
        # (measured -0.02-0.22, Gemma 3 0.86)
        dropped = logits(
            AutoModelForCausalLM.from_pretrained(run / "hf_checkpoint", dtype=torch.float32), IDS
        )
        assert torch.corrcoef(torch.stack([plain, dropped]))[0, 1].item() < 0.95
    deploy = json.loads((run / "deploy" / "deploy.json").read_text())
    assert deploy, "deploy.json is empty"
    assert [t["runtime"] for t in deploy["targets"]] == runtimes(fmt)
    for runtime in runtimes(fmt):
        assert (run / "deploy" / runtime).is_dir()
    gate = json.loads(Path(rec["artifacts"]["gate"]).read_text())
    assert gate["metrics"] and gate["metrics"][0]["candidate"] is not None


@pytest.mark.parametrize(
    ("model_type", "stages", "message"),
    [
        (
            "gemma2",
            ["ptq: {format: fp8}", "export: {hf_checkpoint: true}"],
            "stages[1].export.trtllm_checkpoint: ModelOpt 0.47 writes no TensorRT-LLM checkpoint "
            "for Gemma 2 (ModelOpt's TensorRT-LLM exporter has no config for it); set "
            "trtllm_checkpoint: null",
        ),
        (
            "phi3",
            ["ptq: {format: fp8}", "export: {}"],
            "writes no TensorRT-LLM checkpoint for Phi-3",
        ),
        (
            "qwen3_moe",
            ["ptq: {format: fp8}", "export: {tp: 1}"],
            "stages[1].export.tp: unknown key",
        ),
        (
            "qwen3_moe",
            ["ptq: {format: fp8}", "export: {}"],
            "stages[1].export.trtllm_checkpoint: no TensorRT-LLM checkpoint for Qwen3-MoE: "
            "ModelOpt 0.47's MoE config builder knows no Qwen3-MoE decoder; set",
        ),
        (
            "mixtral",
            ["ptq: {format: fp8}", "export: {}"],
            "no TensorRT-LLM checkpoint for Mixtral: ModelOpt 0.47 writes its experts stacked",
        ),
        (
            "mixtral",
            [
                "ptq: {format: w4a8_awq, group_size: 32}",
                "export: {trtllm_checkpoint: null, hf_checkpoint: true}",
            ],
            "stages[1].export: w4a8_awq cannot be exported for Mixtral: ModelOpt 0.47's gate/up "
            "amax sync",
        ),
        (
            "qwen3_moe",
            ["ptq: {format: fp8, exclude: ['*experts.1.*']}"],
            "stages[0].ptq.exclude: '*experts.1.*' matches expert projections of Qwen3-MoE: "
            "the gate's rebuild reads a block's experts in one format",
        ),
        (
            "mixtral",
            ["ptq: {format: fp8, exclude: ['*down_proj*']}"],
            "stages[0].ptq.exclude: '*down_proj*' matches expert projections of Mixtral",
        ),
        (
            "qwen3_moe",
            ["search: {format: int4_awq, suite: quick}"],
            "search on Qwen3-MoE is not supported yet",
        ),
        (
            "qwen3",
            [
                "auto_quantize: {effective_bits: 6.0, formats: [fp8, int4_awq], "
                "cost_model: active_moe}"
            ],
            "stages[0].auto_quantize.cost_model: active_moe weighs routed experts' weights; a "
            "qwen3 model has no routed experts",
        ),
        (
            "qwen3",
            [
                "auto_quantize: {effective_bits: 6.0, formats: [fp8, int4_awq], "
                "active_moe_expert_ratio: 0.25}"
            ],
            "stages[0].auto_quantize.active_moe_expert_ratio: applies to cost_model active_moe only",
        ),
        (
            "mixtral",
            [
                "auto_quantize: {effective_bits: 6.0, formats: [fp8, int4_awq], "
                "active_moe_expert_ratio: 1.5}"
            ],
            "stages[0].auto_quantize.active_moe_expert_ratio: Input should be less than or equal to 1",
        ),
    ],
)
def test_unsupported_cells_are_refused_at_validation(
    family_models, tmp_path, capsys, model_type, stages, message
):
    assert run_tiny_recipe(tmp_path, family_models[model_type], stages) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_the_refusals_are_modelopts_own_limits(family_models, tmp_path):
    """The table's ✗ for a TensorRT-LLM checkpoint of Gemma 2 is ModelOpt's: its exporter
    raises (when a ModelOpt release learns the family, this test says to update the table)."""
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM

    from optimizer.exporters import export_trtllm_checkpoint
    from optimizer.techniques.quantize import QuantizeConfig

    model = AutoModelForCausalLM.from_pretrained(family_models["gemma2"], dtype=torch.float32)
    mtq.quantize(model, QuantizeConfig(format="fp8").modelopt_config(), lambda m: m(IDS))
    with pytest.raises(NotImplementedError, match="Cannot export tensorrt_llm checkpoint"):
        export_trtllm_checkpoint(model, tmp_path, dtype="bfloat16", tp=1, pp=1)


def test_the_readme_holds_the_generated_support_matrix():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert architectures.support_matrix() in readme


@pytest.mark.parametrize("planted", [False, True])
def test_experts_the_calibration_never_reached_are_reported(family_models, tmp_path, planted):
    model = family_models["qwen3_moe"]
    if planted:
        model = plant_a_dead_expert(model, tmp_path / "dead")
    assert run_tiny_recipe(tmp_path, model, ["ptq: {format: fp8}"], num_samples=4) == 0
    rec = json.loads((tmp_path / "run" / "run.json").read_text())
    moe = rec["stages"][0]["metrics"]["moe_calibration"]
    assert moe["routers"] == 2 and moe["experts"] == 8
    cold = ["model.layers.0.mlp.gate[3]", "model.layers.1.mlp.gate[3]"] if planted else []
    assert moe["experts_without_tokens"] == cold
    assert (moe["fewest_tokens"] == 0) is planted
    log = (tmp_path / "run" / "logs" / "run.log").read_text()
    assert ("2 of 8 experts received no calibration tokens" in log) is planted


def test_a_dense_model_has_no_moe_calibration_entry(family_models, tmp_path):
    assert run_tiny_recipe(tmp_path, family_models["qwen3"], ["ptq: {format: fp8}"]) == 0
    rec = json.loads((tmp_path / "run" / "run.json").read_text())
    assert "moe_calibration" not in rec["stages"][0]["metrics"]
    assert routers_of(family_models["qwen3"]) == {}


def routers_of(path):
    from transformers import AutoModelForCausalLM

    return routers(AutoModelForCausalLM.from_pretrained(path))


@pytest.mark.parametrize(
    ("model_type", "tensor"),
    [
        ("gemma2", "model.layers.1.post_feedforward_layernorm.weight"),
        ("gemma3_text", "model.layers.0.self_attn.q_norm.weight"),
        ("phi3", "model.layers.1.self_attn.qkv_proj.weight_scale"),
        ("mixtral", "model.layers.1.block_sparse_moe.experts.3.w2.weight"),
        ("qwen3_moe", "model.layers.0.mlp.gate.weight"),
    ],
)
def test_check_knows_each_familys_full_tensor_list(family_models, tmp_path, model_type, tensor):
    """A unified export missing one tensor of its family's layout (a Gemma norm, Phi-3's
    fused q/k/v scale, an expert, a router) is refused by `optimize check`."""
    from safetensors.torch import load_file, save_file

    from optimizer.unified.check import check_hf_checkpoint

    stages = ["ptq: {format: fp8}", "export: {trtllm_checkpoint: null, hf_checkpoint: true}"]
    assert run_tiny_recipe(tmp_path, family_models[model_type], stages) == 0
    export = tmp_path / "run" / "hf_checkpoint"
    assert check_hf_checkpoint(export) == []
    weights = export / "model.safetensors"
    tensors = load_file(weights)
    del tensors[tensor]
    save_file(tensors, weights, metadata={"format": "pt"})
    problems = [p.message for p in check_hf_checkpoint(export)]
    assert any(tensor in m for m in problems), problems


@pytest.mark.parametrize(
    ("model_type", "fmt", "bound"),
    [
        ("mixtral", "fp8", 1.0),
        ("qwen3_moe", "fp8", 1.0),
        ("mixtral", "int4_awq", 1.0),
        ("qwen3_moe", "int4_awq", 1.0),
        ("qwen3_moe", "int8_sq", 0.25),
    ],
)
def test_the_rebuilt_moe_export_computes_what_the_quantized_model_computes(
    family_models, tmp_path, model_type, fmt, bound
):
    """The yardstick of tests/test_unified_rebuild.py for MoE experts: the rebuilt export's
    mean logit error from the in-memory quantized model (its saved hand-over checkpoint,
    reloaded with unfused experts), relative to the quantization's own effect, is below
    ``bound`` (measured 0.72-0.75 FP8; 0.79-0.90 INT4 AWQ, whose export merges the gate/up
    block scales the in-memory model kept apart; 0.05 INT8 SmoothQuant); an expert read with
    quadrupled weight scales puts it far above."""
    from safetensors.torch import load_file, save_file

    from optimizer.models import load_model
    from optimizer.unified.rebuild import rebuild

    src = family_models[model_type]
    group = ", group_size: 32" if "awq" in fmt else ""
    stages = [
        f"ptq: {{format: {fmt}{group}}}",
        "export: {trtllm_checkpoint: null, hf_checkpoint: true}",
    ]
    assert run_tiny_recipe(tmp_path, src, stages) == 0
    run = tmp_path / "run"
    assert main(["check", str(run / "hf_checkpoint")]) == 0
    quantized = logits(load_model(run / "stages" / "00-ptq" / "model", "float32"), IDS)
    effect = (quantized - logits(load_model(src, "float32"), IDS)).abs().mean()

    def ratio():
        got = logits(rebuild(run / "hf_checkpoint", "float32").model, IDS)
        return ((got - quantized).abs().mean() / effect).item()

    assert ratio() < bound
    weights = run / "hf_checkpoint" / "model.safetensors"
    tensors = load_file(weights)
    scales = [k for k in tensors if ".experts.1." in k and k.endswith("weight_scale")]
    assert len(scales) == 6  # gate, up, down of expert 1 in both layers
    if fmt != "fp8":  # AWQ / SmoothQuant smooth every expert's inputs
        assert all(k.replace("weight_scale", "pre_quant_scale") in tensors for k in scales)
    for k in scales:
        tensors[k] = tensors[k] * 4
    save_file(tensors, weights, metadata={"format": "pt"})
    assert ratio() > 2.0  # measured 2.8 (INT8 SmoothQuant) to 16


@pytest.mark.parametrize(("model_type", "bias"), [("qwen2", True), ("qwen3", False)])
def test_qwen_tensorrt_llm_checkpoints_say_their_qwen_type(
    family_models, tmp_path, model_type, bias
):
    """TensorRT-LLM's Qwen model builds from config.json's qwen_type (q/k layernorm for
    qwen3) and attn_bias, which ModelOpt does not write: the export adds them, and the
    checker refuses a Qwen checkpoint without them."""
    from optimizer.trtllm import check_checkpoint

    stages = ["ptq: {format: fp8}", "export: {}"]
    assert run_tiny_recipe(tmp_path, family_models[model_type], stages) == 0
    ckpt = tmp_path / "run" / "trtllm_checkpoint"
    config = json.loads((ckpt / "config.json").read_text())
    assert (config["qwen_type"], config["attn_bias"]) == (model_type, bias)
    del config["qwen_type"]
    (ckpt / "config.json").write_text(json.dumps(config))
    assert any("qwen_type is None" in p.message for p in check_checkpoint(ckpt))


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_qwen_prunes_to_a_standard_checkpoint_that_exports_and_gates(
    family_models, tmp_path, model_type, capsys
):
    """Every axis at once on Qwen's Llama-like layout (q/k/v biases, q/k norms): the pruned
    model has exactly the target shapes, reloads with from_pretrained, computes finite
    logits, and quantizes, exports validator-clean and gates."""
    from transformers import AutoModelForCausalLM

    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE)
    stages = [
        "prune: {ffn_hidden_size: 64, num_attention_heads: 2, num_key_value_heads: 1, "
        "hidden_size: 48, num_layers: 1}",
        "ptq: {format: fp8}",
        "export: {hf_checkpoint: true}",
        f"gate: {{suite: {suite}}}",
    ]
    assert run_tiny_recipe(tmp_path, family_models[model_type], stages) == 0, (
        capsys.readouterr().err
    )
    run = tmp_path / "run"
    pruned = AutoModelForCausalLM.from_pretrained(run / "stages" / "00-prune" / "model")
    c = pruned.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (48, 64, 1)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2, 1, 16)
    attn = pruned.model.layers[0].self_attn
    assert tuple(attn.q_proj.weight.shape) == (32, 48) and tuple(attn.k_proj.weight.shape) == (
        16,
        48,
    )
    if model_type == "qwen2":
        assert tuple(attn.q_proj.bias.shape) == (32,) and tuple(attn.k_proj.bias.shape) == (16,)
    else:
        assert tuple(attn.q_norm.weight.shape) == (16,)
    assert torch.isfinite(logits(pruned, IDS)).all()
    for what in ("hf_checkpoint", "trtllm_checkpoint"):
        assert main(["check", str(run / what)]) == 0, capsys.readouterr().out


def _tamper_expert_1(tensors):
    del tensors["model.layers.0.mlp.experts.1.gate_proj.weight_scale"]
    del tensors["model.layers.0.mlp.experts.1.gate_proj.input_scale"]


def _mismatch_scales(tensors):
    key = "model.layers.0.mlp.experts.2.up_proj.input_scale"
    tensors[key] = tensors[key] * 4


def _cut_up_proj(tensors):
    key = "model.layers.1.mlp.experts.0.up_proj.weight"
    tensors[key] = tensors[key][:, :56].contiguous()


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (_tamper_expert_1, "experts.1.gate_proj.weight is stored as torch.float8_e4m3fn without"),
        (_mismatch_scales, "gate_proj and up_proj read the same input but store different"),
        (_cut_up_proj, "experts.0.up_proj.weight is (64, 56), the architecture needs (64, 64)"),
    ],
)
def test_a_damaged_moe_export_is_refused_by_the_rebuild(family_models, tmp_path, tamper, message):
    from safetensors.torch import load_file, save_file

    from optimizer.errors import OptimizerError
    from optimizer.unified.rebuild import rebuild

    stages = ["ptq: {format: fp8}", "export: {trtllm_checkpoint: null, hf_checkpoint: true}"]
    assert run_tiny_recipe(tmp_path, family_models["qwen3_moe"], stages) == 0
    weights = tmp_path / "run" / "hf_checkpoint" / "model.safetensors"
    tensors = load_file(weights)
    tamper(tensors)
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(OptimizerError, match=re.escape(message)):
        rebuild(tmp_path / "run" / "hf_checkpoint", "float32")


def test_an_moe_config_without_its_expert_count_is_named(family_models, tmp_path):
    from optimizer.unified.check import check_hf_checkpoint

    stages = ["ptq: {format: fp8}", "export: {trtllm_checkpoint: null, hf_checkpoint: true}"]
    assert run_tiny_recipe(tmp_path, family_models["mixtral"], stages) == 0
    config_file = tmp_path / "run" / "hf_checkpoint" / "config.json"
    config = json.loads(config_file.read_text())
    del config["num_local_experts"]
    config_file.write_text(json.dumps(config))
    (problem,) = check_hf_checkpoint(tmp_path / "run" / "hf_checkpoint")
    assert "lacks the experts' count (num_local_experts / num_experts)" in problem.message


@pytest.mark.parametrize("model_type", ["qwen3", "gemma2", "phi3", "qwen3_moe"])
def test_sparsify_keeps_the_2_4_pattern_to_the_export(family_models, tmp_path, model_type):
    """2:4 magnitude sparsity -> FP8 -> unified export: every sparsified linear's stored FP8
    weight keeps two zeros in every group of four; an MoE's fused experts stay dense, and
    the run says so."""
    from safetensors.torch import load_file

    stages = [
        "sparsify: {method: magnitude}",
        "ptq: {format: fp8}",
        "export: {trtllm_checkpoint: null, hf_checkpoint: true}",
    ]
    assert run_tiny_recipe(tmp_path, family_models[model_type], stages) == 0
    run = tmp_path / "run"
    metrics = json.loads((run / "run.json").read_text())["stages"][0]["metrics"]
    assert main(["check", str(run / "hf_checkpoint")]) == 0
    tensors = load_file(run / "hf_checkpoint" / "model.safetensors")
    linears = [k for k in tensors if k.endswith("proj.weight") and ".experts." not in k]
    assert len(linears) == metrics["sparsified_layers"]
    for key in linears:
        groups = (tensors[key].float() == 0).reshape(-1, 4).sum(dim=1)
        assert bool((groups >= 2).all()), key
    log = (run / "logs" / "run.log").read_text()
    if FAMILIES[model_type].moe:
        assert len(metrics["dense_experts"]) == 2 and metrics["dense_expert_fraction"] > 0.1
        assert "the experts of 2 MoE blocks" in log
        expert = tensors["model.layers.0.mlp.experts.0.gate_proj.weight"].float()
        assert (expert == 0).float().mean() < 0.1
    else:
        assert metrics["dense_experts"] == [] and "MoE blocks" not in log
