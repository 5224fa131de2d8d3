"""The model rebuilt from a TensorRT-LLM checkpoint (optimizer/trtllm/rebuild.py) computes what
the quantized model computes, for every format the CPU can export, and an export bug shows.

Each case quantizes a tiny Llama with ModelOpt, exports it with our exporter (ModelOpt's
``export_tensorrt_llm_checkpoint`` + rope fix-up + validation) and rebuilds it from the files.
The tiny model's q/k projections are scaled by 8: at random initialisation attention is
nearly uniform, and then the rope base or a q/k mix-up would not change the logits at all
(measured: a q/k swap moved the ratio below from 0.73 to 1.0 only). Two yardsticks:

- closeness to the pipeline's in-memory model, as the brief of the gate: the rebuilt model's
  mean logit error from it relative to the quantization's own effect (in-memory quantized vs
  unquantized). Not 0, because the export itself changes the numbers: fused q/k/v and
  gate/up share one scale (ModelOpt's ``preprocess_linear_fusion``, which TensorRT-LLM's fused
  GEMMs need), AWQ/SmoothQuant ``prequant_scaling_factor`` is stored in bf16, and FP8
  KV-cache scales are clamped to >= 1. Measured: FP8 0.77, FP8 + FP8 KV 0.98, INT4 AWQ 0.84,
  W4A8 AWQ 0.90, INT8 SQ 0.17; planted bugs 3.7-8.4.
- exactness of the reading: the live model *after* the export (its quantizers now carry the
  fused scales) with the same bf16 rounding of ``pre_quant_scale`` and the stored KV scales
  computes the rebuilt model's logits to float rounding.
"""

from __future__ import annotations

import json
import shutil

import pytest
from tiny import make_tiny_llama, record_evaluations

from optimizer.errors import OptimizerError

torch = pytest.importorskip("torch")

IDS = torch.randint(3, 500, (4, 48), generator=torch.Generator().manual_seed(0))
CALIB = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny Llama with peaked attention (q/k x 8) and its unquantized logits."""
    from transformers import AutoModelForCausalLM

    path = make_tiny_llama(tmp_path_factory.mktemp("src") / "llama")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    model.save_pretrained(path)
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        logits = plain(IDS).logits.float()
    return path, logits


def _quantize_and_export(src, out, fmt: str, kv_cache: str = "none", tp: int = 1):
    """(in-memory quantized logits, the live model after the export)."""
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM

    from optimizer.exporters import export_trtllm_checkpoint
    from optimizer.techniques.quantize import QuantizeConfig

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    cfg = QuantizeConfig(format=fmt, kv_cache=kv_cache).modelopt_config()
    mtq.quantize(model, cfg, lambda m: m(CALIB))
    with torch.no_grad():
        quantized = model(IDS).logits.float()
    export_trtllm_checkpoint(model, out, dtype="bfloat16", tp=tp)
    return quantized, model


def _error_ratio(logits, quantized, plain) -> float:
    return float((logits - quantized).abs().mean() / (quantized - plain).abs().mean())


def _rebuilt_logits(path):
    from optimizer.trtllm.rebuild import rebuild

    r = rebuild(path, "float32", "cpu")
    with torch.no_grad():
        return r, r.model(IDS).logits.float()


def _as_stored(model, path) -> None:
    """The live model's quantizers set to what the checkpoint stores where the export rounds
    or clamps: pre_quant_scale in the checkpoint dtype, one FP8 KV scale per layer."""
    from safetensors.torch import load_file

    stored = load_file(str(path / "rank0.safetensors"))
    for module in model.modules():
        quantizer = getattr(module, "input_quantizer", None)
        if quantizer is not None and getattr(quantizer, "pre_quant_scale", None) is not None:
            quantizer.pre_quant_scale = quantizer.pre_quant_scale.to(torch.bfloat16).float()
    for i, layer in enumerate(model.model.layers):
        scale = stored.get(f"transformer.layers.{i}.attention.kv_cache_scaling_factor")
        if scale is not None:
            layer.self_attn.k_bmm_quantizer.amax = scale.reshape(()) * 448.0
            layer.self_attn.v_bmm_quantizer.amax = scale.reshape(()) * 448.0


@pytest.mark.parametrize(
    ("fmt", "kv", "algo", "bound"),
    [
        ("fp8", "none", "FP8", 0.9),
        ("fp8", "fp8", "FP8", 1.2),  # the clamped KV scales add 0.2 (see the module docstring)
        ("int4_awq", "none", "W4A16_AWQ", 1.0),
        ("w4a8_awq", "none", "W4A8_AWQ", 1.0),
        ("int8_sq", "none", "W8A8_SQ_PER_CHANNEL", 0.3),
    ],
)
def test_rebuilt_checkpoint_computes_the_quantized_model(source, tmp_path, fmt, kv, algo, bound):
    src, plain = source
    out = tmp_path / "trtllm"
    quantized, live = _quantize_and_export(src, out, fmt, kv)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == algo
    rebuilt, logits = _rebuilt_logits(out)
    assert rebuilt.quant_algo == algo and rebuilt.quantized_layers == 14  # 7 linears x 2 layers
    assert rebuilt.kv_cache_quant_algo == (None if kv == "none" else "FP8")
    ratio = _error_ratio(logits, quantized, plain)
    assert ratio < bound, f"{fmt}: rebuilt-vs-quantized error is {ratio:.2f} of the quantization's"
    _as_stored(live, out)
    with torch.no_grad():
        expected = live(IDS).logits.float()
    exact = _error_ratio(logits, expected, plain)
    assert exact < 0.005, f"{fmt}: the reading is off the exported numbers by {exact:.4f}"


def test_nvfp4_weights_are_read_within_the_format_rounding(source, tmp_path):
    """NVFP4 (ModelOpt calibrates it on a CPU but cannot run it): every dequantized q/k/v
    weight, split from the fused qkv, lies within one E2M1 step of the original."""
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM

    from optimizer.exporters import export_trtllm_checkpoint
    from optimizer.techniques.quantize import QuantizeConfig

    src, _ = source
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    original = {n: m.weight.float().clone() for n, m in model.named_modules() if n.endswith("proj")}
    mtq.quantize(model, QuantizeConfig(format="nvfp4").modelopt_config(), lambda m: m(CALIB))
    out = tmp_path / "nvfp4"
    export_trtllm_checkpoint(model, out, dtype="bfloat16")
    rebuilt, logits = _rebuilt_logits(out)
    assert rebuilt.quant_algo == "NVFP4" and rebuilt.quantized_layers == 14
    assert torch.isfinite(logits).all()
    weights = dict(rebuilt.model.named_modules())
    for name, w in original.items():
        err = (weights[name].weight.float() - w).abs()
        # E2M1's largest step is 2 (between 4 and 6) units of the block scale, amax/6 at most.
        bound = w.reshape(w.shape[0], -1, 16).abs().amax(-1, keepdim=True) / 6 * 2 * 1.15
        assert (err.reshape(w.shape[0], -1, 16) <= bound + 1e-6).all(), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="ModelOpt runs NVFP4 on CUDA only")
def test_nvfp4_checkpoint_computes_the_quantized_model(source, tmp_path):
    """NVFP4 end to end against ModelOpt's in-memory model (its NVFP4 activation quantizer
    needs CUDA), in bf16 on the GPU."""
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM

    from optimizer.exporters import export_trtllm_checkpoint
    from optimizer.techniques.quantize import QuantizeConfig
    from optimizer.trtllm.rebuild import rebuild

    src, _ = source
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).cuda()
    with torch.no_grad():
        plain = model(IDS.cuda()).logits.float()
    mtq.quantize(model, QuantizeConfig(format="nvfp4").modelopt_config(), lambda m: m(CALIB.cuda()))
    with torch.no_grad():
        quantized = model(IDS.cuda()).logits.float()
    out = tmp_path / "nvfp4"
    export_trtllm_checkpoint(model, out, dtype="bfloat16")
    rebuilt = rebuild(out, "bfloat16", "cuda")
    assert rebuilt.quant_algo == "NVFP4" and rebuilt.quantized_layers == 14
    with torch.no_grad():
        logits = rebuilt.model(IDS.cuda()).logits.float()
    assert _error_ratio(logits, quantized, plain) < 0.9


@pytest.fixture(scope="module")
def fp8_export(source, tmp_path_factory):
    src, plain = source
    out = tmp_path_factory.mktemp("fp8") / "trtllm"
    quantized, _ = _quantize_and_export(src, out, "fp8")
    return out, quantized, plain


def _planted(export, tmp_path, edit=None, config_edit=None):
    from safetensors.torch import load_file, save_file

    bad = shutil.copytree(export, tmp_path / "bad")
    if edit is not None:
        tensors = load_file(str(bad / "rank0.safetensors"))
        edit(tensors)
        save_file(tensors, str(bad / "rank0.safetensors"))
    if config_edit is not None:
        config = json.loads((bad / "config.json").read_text())
        config_edit(config)
        (bad / "config.json").write_text(json.dumps(config))
    return bad


def _swap_q_k(t):
    """An exporter that stacked [k, q, v] instead of [q, k, v] (4 q heads, 2 kv heads of 32)."""
    for i in range(2):
        w = t[f"transformer.layers.{i}.attention.qkv.weight"]
        t[f"transformer.layers.{i}.attention.qkv.weight"] = torch.cat(
            [w[128:192], w[:128], w[192:]]
        )


def _double_scale(t):
    t["transformer.layers.1.attention.qkv.weights_scaling_factor"] *= 2


@pytest.mark.parametrize(
    ("bug", "edit", "config_edit"),
    [
        ("rotary_base 500", None, lambda c: c.update(rotary_base=500.0)),
        ("qkv weights_scaling_factor x2", _double_scale, None),
        ("q/k swapped in the fused qkv", _swap_q_k, None),
    ],
)
def test_a_planted_export_bug_is_far_from_the_quantized_model(
    fp8_export, tmp_path, bug, edit, config_edit
):
    """The good export meets the 0.9 bound (0.77); each planted bug lands above 2.5 (measured
    5.9, 3.7, 8.4)."""
    export, quantized, plain = fp8_export
    _, good = _rebuilt_logits(export)
    assert _error_ratio(good, quantized, plain) < 0.9
    _, bad = _rebuilt_logits(_planted(export, tmp_path, edit, config_edit))
    assert _error_ratio(bad, quantized, plain) > 2.5, bug


def test_the_rebuilt_model_follows_the_checkpoint_config(fp8_export):
    from optimizer.trtllm.rebuild import rebuild

    export, _, _ = fp8_export
    config = rebuild(export, "float32", "cpu").model.config
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (128, 256, 2)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 32)
    assert config.rope_parameters["rope_theta"] == 10000.0 and config.rms_norm_eps == 1e-6
    assert config.vocab_size == 512 and config.tie_word_embeddings is False


def test_what_cannot_be_rebuilt_is_refused(fp8_export, tmp_path):
    from optimizer.trtllm.rebuild import rebuild, vocab_problem

    export, _, _ = fp8_export

    def refused(match, edit=None, config_edit=None, name="x"):
        bad = _planted(export, tmp_path / name, edit, config_edit)
        with pytest.raises(OptimizerError, match=match):
            rebuild(bad, "float32", "cpu")

    def algo(c):
        c["quantization"]["quant_algo"] = "W4A8_QSERVE_PER_GROUP"

    refused("quant_algo W4A8_QSERVE_PER_GROUP cannot be rebuilt", config_edit=algo, name="a")
    refused(
        "architecture 'GPTForCausalLM' cannot be rebuilt",
        config_edit=lambda c: c.update(architecture="GPTForCausalLM"),
        name="b",
    )

    def missing(t):
        del t["transformer.layers.1.post_layernorm.weight"]

    # What TensorRT-LLM itself would reject is refused through its validator (headers only).
    refused("would reject it: .*post_layernorm.weight is missing", missing, name="c")

    def unscaled(t):  # an FP8 weight without its scale would load as raw FP8 codes
        del t["transformer.layers.0.mlp.gate.weights_scaling_factor"]

    refused("mlp.gate.weights_scaling_factor is missing on a FP8 layer", unscaled, name="d")

    def stray(t):  # TensorRT-LLM only warns on an extra tensor; the rebuild cannot place it
        t["transformer.layers.0.attention.rel_attn_table"] = torch.zeros(2)

    refused("rel_attn_table is not a tensor of a Llama TensorRT-LLM checkpoint", stray, name="f")

    # The translation's own checks, behind the validator: a fused qkv of the wrong height and
    # a linear whose scales the config excludes.
    from safetensors.torch import load_file

    from optimizer.trtllm.rebuild import read_config, translate

    config, tensors = read_config(export), load_file(str(export / "rank0.safetensors"))
    short = dict(tensors)
    short["transformer.layers.0.attention.qkv.weight"] = tensors[
        "transformer.layers.0.attention.qkv.weight"
    ][:224]
    with pytest.raises(OptimizerError, match="qkv.weight has 224 rows; q/k/v of this config"):
        translate(config, short, export)
    config["quantization"]["exclude_modules"] = ["lm_head", "transformer.layers.0.mlp*"]
    with pytest.raises(OptimizerError, match="layers.0.mlp.fc carries quantization scales but"):
        translate(config, tensors, export)

    from tiny import make_tokenizer

    tokenizer = make_tokenizer()
    small = _planted(export, tmp_path / "g", config_edit=lambda c: c.update(vocab_size=256))
    assert "the tokenizer it is evaluated with has 512 tokens" in vocab_problem(small, tokenizer)
    assert vocab_problem(export, tokenizer) is None
    other = _planted(export, tmp_path / "h")
    make_tokenizer(vocab_size=300).save_pretrained(other)  # as the export stage saves one
    assert "the tokenizer saved with the checkpoint (300 tokens) differs" in vocab_problem(
        other, tokenizer
    )
    tokenizer.save_pretrained(other)
    assert vocab_problem(other, tokenizer) is None


def test_a_sharded_checkpoint_is_refused_with_exit_2(source, tmp_path):
    from optimizer.cli import main
    from optimizer.evaluation.candidates import checkpoint_problem

    src, _ = source
    out = tmp_path / "tp2"
    _quantize_and_export(src, out, "fp8", tp=2)
    assert "sharded (tp_size 2, pp_size 1)" in checkpoint_problem(out)
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: t\nlimit: 2\ntasks:\n  - {task: local_arc_easy, metric: acc}\n")
    args = ["gate", "--baseline", str(src), "--candidate", str(out), "--suite", str(suite)]
    assert main([*args, "-o", str(tmp_path / "g"), "-q"]) == 2


def test_the_gate_evaluates_a_trtllm_only_export(tiny_llama, tmp_path, monkeypatch):
    """ptq fp8 -> export trtllm_checkpoint only -> gate: the gate evaluates the model rebuilt
    from the TensorRT-LLM checkpoint (FP8 weights dequantized, 14 activation hooks, no ModelOpt
    quantizers), and `optimize gate --candidate` on that directory works."""
    from tiny import CALIBRATION

    from optimizer.cli import main

    monkeypatch.setenv("OPTIMIZER_CACHE_DIR", str(tmp_path / "cache"))
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: tiny\nlimit: 10\ntasks:\n  - {task: local_arc_easy, metric: acc}\n"
        "thresholds:\n  default: {max_drop: 0.5}\n"
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: g\nmodel: {{source: {tiny_llama}}}\n"
        f"calibration: {{dataset: {CALIBRATION}, num_samples: 4, seq_len: 64}}\n"
        "stages:\n  - ptq: {format: fp8}\n  - export: {trtllm_checkpoint: {tp: 1, pp: 1}}\n"
        f"  - gate: {{suite: {suite}}}\n"
    )
    evaluated = record_evaluations(monkeypatch)  # (quantizers on, hooked linears)
    assert main(["run", str(recipe), "-o", str(tmp_path / "run"), "-q"]) == 0
    report = json.loads((tmp_path / "run" / "report" / "gate.json").read_text())
    assert report["meta"]["evaluated"] == "export" and report["metrics"][0]["n"] == 10
    assert evaluated == [(0, 0), (0, 14)]  # the plain baseline, then the rebuilt checkpoint
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    checkpoint = record["artifacts"]["trtllm_checkpoint"]
    assert "hf_checkpoint" not in record["artifacts"]
    args = ["gate", "--baseline", str(tiny_llama), "--candidate", checkpoint, "--suite", str(suite)]
    assert main([*args, "-o", str(tmp_path / "g"), "-q"]) in (0, 3)
    gate = json.loads((tmp_path / "g" / "report" / "gate.json").read_text())
    assert gate["metrics"][0]["n"] == 10 and gate["meta"]["baseline_cached"] is True
    assert evaluated[-1] == (0, 14)


def test_a_mixed_precision_checkpoint_is_read_per_layer(source, tmp_path):
    """MIXED_PRECISION (what auto_quantize exports; quant_cfg.json names each linear's
    algorithm): FP8 layers, INT4 AWQ for layer 1's MLP, layer 0's o_proj unquantized, read
    exactly (a real auto_quantize search costs 20 s here; this config gives the same file
    shape in 8 s)."""
    import copy

    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM

    from optimizer.exporters import export_trtllm_checkpoint

    src, plain = source
    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    int4 = {"num_bits": 4, "block_sizes": {-1: 128, "type": "static"}, "enable": True}
    cfg["quant_cfg"] += [
        {"quantizer_name": "*layers.1.mlp*weight_quantizer", "cfg": int4},
        {"quantizer_name": "*layers.1.mlp*input_quantizer", "enable": False},
        {"quantizer_name": "*layers.0.self_attn.o_proj*", "enable": False},
    ]
    cfg["algorithm"] = "awq_lite"
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    mtq.quantize(model, cfg, lambda m: m(CALIB))
    out = tmp_path / "mixed"
    export_trtllm_checkpoint(model, out, dtype="bfloat16")
    layers = json.loads((out / "quant_cfg.json").read_text())["quantized_layers"]
    assert layers["transformer.layers.1.mlp.fc"]["quant_algo"] == "W4A16_AWQ"
    assert layers["transformer.layers.0.mlp.fc"]["quant_algo"] == "FP8"
    rebuilt, logits = _rebuilt_logits(out)
    assert rebuilt.quant_algo == "MIXED_PRECISION" and rebuilt.quantized_layers == 13
    _as_stored(model, out)
    with torch.no_grad():
        expected = model(IDS).logits.float()
    assert _error_ratio(logits, expected, plain) < 0.005


@pytest.mark.parametrize(
    ("stages", "fragment"),
    [
        (
            "  - ptq: {format: fp8_pc_pt}\n  - export: {trtllm_checkpoint: {tp: 1, pp: 1}}\n",
            "gate.evaluate: the gate evaluates the exported checkpoint, and quant_algo "
            "FP8_PER_CHANNEL_PER_TOKEN cannot be rebuilt from a TensorRT-LLM checkpoint",
        ),
        (
            "  - ptq: {format: fp8}\n  - export: {trtllm_checkpoint: {tp: 2, pp: 1}}\n",
            "gate.evaluate: the gate evaluates the exported checkpoint, and a TensorRT-LLM "
            "checkpoint sharded tp 2 x pp 1 cannot be rebuilt",
        ),
        (  # both exported: the unified HF checkpoint is rebuilt, so a sharded one is fine
            "  - ptq: {format: fp8}\n"
            "  - export: {trtllm_checkpoint: {tp: 2, pp: 1}, hf_checkpoint: true}\n",
            None,
        ),
    ],
)
def test_the_gate_refuses_at_validation_an_export_it_cannot_rebuild(
    tiny_llama, tmp_path, capsys, stages, fragment
):
    from tiny import CALIBRATION

    from optimizer.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: g\nmodel: {{source: {tiny_llama}}}\n"
        f"calibration: {{dataset: {CALIBRATION}, num_samples: 4, seq_len: 64}}\n"
        f"stages:\n{stages}  - gate: {{suite: quick}}\n"
    )
    assert main(["validate", str(recipe)]) == (0 if fragment is None else 2)
    if fragment is not None:
        assert fragment in " ".join(capsys.readouterr().err.split())
