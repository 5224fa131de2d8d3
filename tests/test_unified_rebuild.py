"""The model rebuilt from a ModelOpt unified HF export (optimizer/unified/rebuild.py) computes
what the quantized model computes, for every format, and an export bug shows in it.

Each case quantizes a tiny random Llama with ModelOpt, exports it with ModelOpt's
``export_hf_checkpoint`` and rebuilds it from the files. Two yardsticks:

- exactness of the reading: ModelOpt's own quantizers run over the export's stored weights
  compute the same logits as the rebuilt model (to float rounding);
- closeness to the pipeline's in-memory model: the rebuilt model's mean logit error from it,
  relative to the quantization's own effect (in-memory quantized vs unquantized). The export
  is not bit-identical to the in-memory model — ModelOpt's exporter divides the bf16 weight by
  the scale in bf16 before the FP8 cast (3 % of FP8 weights land one step away: measured
  0.6-0.8 of the quantization effect on this random model) and re-smooths fused q/k/v and
  gate/up under AWQ — so the ratio is not 0; a wrong reading (swapped nibbles, a doubled
  scale, a wrong rope base) puts it far above 1.
"""

from __future__ import annotations

import json
import shutil

import pytest
from tiny import make_tiny_llama

from optimizer.errors import OptimizerError

torch = pytest.importorskip("torch")


def _quantize_and_export(src, out, fmt: str, kv_cache: str = "none", dtype=None, device="cpu"):
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    from optimizer.techniques.quantize import QuantizeConfig

    dtype = dtype or torch.float32
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).to(device)
    calib = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(1)).to(device)
    mtq.quantize(
        model, QuantizeConfig(format=fmt, kv_cache=kv_cache).modelopt_config(), lambda m: m(calib)
    )
    with torch.no_grad():
        quantized = model(IDS.to(device)).logits.float().cpu()
    export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=out)
    return quantized


IDS = torch.randint(3, 500, (4, 48), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("src") / "llama")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        logits = plain(IDS).logits.float()
    return path, logits


def _error_ratio(rebuilt_logits, quantized, plain) -> float:
    return float((rebuilt_logits - quantized).abs().mean() / (quantized - plain).abs().mean())


def _rebuilt_logits(path, dtype="float32", device="cpu"):
    from optimizer.unified.rebuild import rebuild

    r = rebuild(path, dtype, device)
    with torch.no_grad():
        return r, r.model(IDS.to(device)).logits.float().cpu()


@pytest.mark.parametrize(
    ("fmt", "kv", "algo", "bound"),
    [
        ("fp8", "none", "FP8", 0.9),
        ("fp8", "fp8", "FP8", 0.9),
        ("int4_awq", "none", "W4A16_AWQ", 0.9),
        ("w4a8_awq", "none", "W4A8_AWQ", 0.9),
        ("int8_sq", "none", "W8A8_SQ_PER_CHANNEL", 0.3),
    ],
)
def test_rebuilt_export_computes_the_quantized_model(source, tmp_path, fmt, kv, algo, bound):
    src, plain = source
    out = tmp_path / "export"
    quantized = _quantize_and_export(src, out, fmt, kv)
    assert (
        json.loads((out / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == algo
    )
    rebuilt, logits = _rebuilt_logits(out)
    assert rebuilt.quant_algo == algo and rebuilt.quantized_layers == 14  # 7 linears x 2 layers
    assert rebuilt.kv_cache_quant_algo == (None if kv == "none" else "FP8")
    ratio = _error_ratio(logits, quantized, plain)
    assert ratio < bound, f"{fmt}: rebuilt-vs-quantized error is {ratio:.2f} of the quantization's"
    if kv == "fp8":  # the KV-cache quantizers carry the stored scales
        attn = rebuilt.model.model.layers[0].self_attn
        assert attn.k_bmm_quantizer.is_enabled and attn.k_bmm_quantizer.amax is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="ModelOpt runs NVFP4 on CUDA only")
def test_nvfp4_export_computes_the_quantized_model(source, tmp_path):
    """NVFP4 against ModelOpt's in-memory model (whose NVFP4 activation quantizer needs CUDA)."""
    src, plain = source
    out = tmp_path / "nvfp4"
    quantized = _quantize_and_export(src, out, "nvfp4", dtype=torch.bfloat16, device="cuda")
    rebuilt, logits = _rebuilt_logits(out, "bfloat16", "cuda")
    assert rebuilt.quant_algo == "NVFP4" and rebuilt.quantized_layers == 14
    assert _error_ratio(logits, quantized, plain) < 0.9


def test_nvfp4_weights_are_read_within_the_format_rounding(source, tmp_path):
    """On a CPU (ModelOpt calibrates NVFP4 here but cannot run it): every dequantized weight
    lies within one E2M1 step (at most 2 units of the block scale) of the original, with the
    stored FP8 block scales and global scale; reading the nibbles in the wrong order does not."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from optimizer.techniques.quantize import QuantizeConfig
    from optimizer.unified.rebuild import dequantize_weight

    src, _ = source
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    original = {
        n: m.weight.detach().float().clone() for n, m in model.named_modules() if n.endswith("proj")
    }
    calib = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(1))
    mtq.quantize(model, QuantizeConfig(format="nvfp4").modelopt_config(), lambda m: m(calib))
    out = tmp_path / "nvfp4"
    export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=out)
    stored = load_file(str(next(out.glob("*.safetensors"))))
    rebuilt, logits = _rebuilt_logits(out, "bfloat16")
    assert rebuilt.quant_algo == "NVFP4" and rebuilt.quantized_layers == 14
    assert torch.isfinite(logits).all()
    for name, w in original.items():
        t = {k: stored[f"{name}.{k}"] for k in ("weight", "weight_scale", "weight_scale_2")}
        step = (t["weight_scale"].float() * t["weight_scale_2"]).repeat_interleave(16, dim=1)
        deq = dequantize_weight("nvfp4", t, name)
        assert ((deq - w).abs() <= step * 1.01 + 1e-6).all(), name
        t["weight"] = (t["weight"] << 4) | (t["weight"] >> 4)  # the other nibble order
        assert not ((dequantize_weight("nvfp4", t, name) - w).abs() <= step * 1.01 + 1e-6).all()


@pytest.mark.parametrize(("fmt", "kv"), [("fp8", "fp8"), ("int8_sq", "none")])
def test_activation_and_kv_quantization_match_modelopt_on_the_stored_weights(
    source, tmp_path, fmt, kv
):
    """ModelOpt's quantizers (input, KV cache, SmoothQuant scales), calibrated, then run over
    the export's stored weights, compute what the rebuilt model computes."""
    import modelopt.torch.quantization as mtq
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from optimizer.techniques.quantize import QuantizeConfig
    from optimizer.unified.rebuild import dequantize_weight

    src, _ = source
    out = tmp_path / "export"
    _quantize_and_export(src, out, fmt, kv)
    _, rebuilt = _rebuilt_logits(out)
    stored = load_file(str(next(out.glob("*.safetensors"))))
    reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    calib = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(1))
    mtq.quantize(
        reference,
        QuantizeConfig(format=fmt, kv_cache=kv).modelopt_config(),
        lambda m: m(calib),
    )
    for name, module in reference.named_modules():
        if f"{name}.weight_scale" in stored:
            kind = "fp8" if fmt == "fp8" else "int8"
            tensors = {k: stored[f"{name}.{k}"] for k in ("weight", "weight_scale")}
            module.weight.data = dequantize_weight(kind, tensors, name)
            module.weight_quantizer.disable()
    with torch.no_grad():
        expected = reference(IDS).logits.float()
    assert (rebuilt - expected).abs().max() < 1e-4 * expected.abs().max()


@pytest.fixture(scope="module")
def int4_export(source, tmp_path_factory):
    src, plain = source
    out = tmp_path_factory.mktemp("int4") / "export"
    quantized = _quantize_and_export(src, out, "int4_awq")
    return out, quantized, plain


def _planted(export, tmp_path, edit):
    from safetensors.torch import load_file, save_file

    bad = shutil.copytree(export, tmp_path / "bad")
    file = next(bad.glob("*.safetensors"))
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})
    return bad


def test_a_wrong_reading_is_far_from_the_quantized_model(int4_export, tmp_path):
    """The yardstick tells right from wrong: the same export read with the INT4 nibbles in the
    other order (a reader with the wrong packing), or with one tensor scaled by 2, lands far
    outside the bound a correct reading meets."""
    export, quantized, plain = int4_export
    _, good = _rebuilt_logits(export)
    assert _error_ratio(good, quantized, plain) < 0.9

    def swap(t):
        for key in [k for k in t if k.endswith("proj.weight")]:
            t[key] = (t[key] << 4) | (t[key] >> 4)

    _, swapped = _rebuilt_logits(_planted(export, tmp_path / "s", swap))
    assert _error_ratio(swapped, quantized, plain) > 2

    def double(t):
        t["model.norm.weight"] *= 2

    _, doubled = _rebuilt_logits(_planted(export, tmp_path / "d", double))
    assert _error_ratio(doubled, quantized, plain) > 2


def test_the_rebuilt_model_follows_the_checkpoint_config(int4_export, tmp_path):
    """The architecture comes from the export's own config.json: its rope base is the rebuilt
    model's rotary frequencies (a wrong one there is wrong here, as in the served model)."""
    from optimizer.unified.rebuild import rebuild

    export, _, _ = int4_export
    bad = shutil.copytree(export, tmp_path / "rope")
    config = json.loads((bad / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 500.0
    (bad / "config.json").write_text(json.dumps(config))
    head_dim = 128 // 4
    for path, theta in ((export, 10000.0), (bad, 500.0)):
        inv_freq = rebuild(path, "float32", "cpu").model.model.rotary_emb.inv_freq
        expected = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        assert torch.allclose(inv_freq, expected), path


def test_what_cannot_be_rebuilt_is_refused(int4_export, tmp_path):
    from optimizer.unified.rebuild import rebuild

    export, _, _ = int4_export

    def drop(t):
        del t["model.layers.1.mlp.up_proj.weight_scale"]

    # Without its scale the packed weight would load as if unquantized.
    with pytest.raises(OptimizerError, match="up_proj is neither quantized .* nor in exclude"):
        rebuild(_planted(export, tmp_path / "a", drop), "float32", "cpu")

    def stray(t):
        t["model.layers.0.extra.weight"] = torch.zeros(2)

    with pytest.raises(OptimizerError, match="no place for .*model.layers.0.extra.weight"):
        rebuild(_planted(export, tmp_path / "b", stray), "float32", "cpu")

    def missing(t):
        del t["model.layers.1.post_attention_layernorm.weight"]

    with pytest.raises(OptimizerError, match="lacks 1 tensors .*post_attention_layernorm"):
        rebuild(_planted(export, tmp_path / "c", missing), "float32", "cpu")

    def kv_without_algo(t):
        t["model.layers.0.self_attn.k_proj.k_scale"] = torch.tensor(0.01)

    with pytest.raises(OptimizerError, match="KV-cache scales .* without a kv_cache_quant_algo"):
        rebuild(_planted(export, tmp_path / "d", kv_without_algo), "float32", "cpu")


def test_the_checkpoint_is_read_onto_the_gpu_only_with_room_to_dequantize_there():
    from optimizer.unified.rebuild import GPU_READ_HEADROOM, read_device

    gib = 2**30
    assert read_device("cpu", gib, None) == "cpu"
    assert read_device("cuda", gib, GPU_READ_HEADROOM * gib) == "cuda"
    assert read_device("cuda:1", gib, GPU_READ_HEADROOM * gib - 1) == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares GPU and host dequantization")
@pytest.mark.parametrize("fmt", ["fp8", "int4_awq", "int8_sq"])
def test_dequantizing_on_the_gpu_gives_the_host_s_weights_bit_for_bit(
    source, tmp_path, monkeypatch, fmt
):
    from optimizer.unified import rebuild as module

    src, _ = source
    out = tmp_path / "export"
    _quantize_and_export(src, out, fmt)
    chosen = []
    real = module.read_device
    monkeypatch.setattr(module, "read_device", lambda *a: chosen.append(real(*a)) or chosen[-1])
    on_gpu = module.rebuild(out, "bfloat16", "cuda").model.state_dict()
    assert chosen == ["cuda"]  # the GPU path was taken (a tiny export: room for it)
    monkeypatch.setattr(module, "read_device", lambda *a: "cpu")
    on_host = module.rebuild(out, "bfloat16", "cuda").model.state_dict()
    assert on_gpu.keys() == on_host.keys()
    for key, value in on_gpu.items():
        assert value.device.type == "cuda"
        assert torch.equal(value, on_host[key]), key
