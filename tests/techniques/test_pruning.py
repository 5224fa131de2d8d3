"""prune (technique): exact target shapes on every axis with GQA consistency, a config that
round-trips through save_pretrained / from_pretrained to the same logits, and importance
that finds a planted near-zero MLP neuron, query head, KV group, hidden channel and layer."""

import copy
import json
from pathlib import Path

import pytest
import torch
from tiny import CALIBRATION, make_tiny_llama

from optimizer import calibration, models
from optimizer.errors import OptimizerError
from optimizer.recipe import CalibrationSpec
from optimizer.techniques.prune import PruneConfig, dims_of, param_count, prune, resolve_targets

#: hidden 128, MLP 256, 4 layers, 8 query heads in 2 KV groups of 4, head_dim 16.
DIMS = dict(hidden=128, intermediate=256, layers=4, heads=8, kv_heads=2)
HD = 16


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("m") / "gqa", **DIMS)


@pytest.fixture(scope="module")
def base(source):
    return models.load_model(source, "float32")


@pytest.fixture(scope="module")
def tokens(source):
    spec = CalibrationSpec(dataset=str(CALIBRATION), num_samples=8, seq_len=64)
    return calibration.tokenize(
        spec, calibration.load_texts(spec, Path(".")), models.load_tokenizer(source)
    )


def run(model, tokens, **targets):
    return prune(model, PruneConfig(**targets), calibration.batches(tokens, 4))


def assert_shapes(model, hidden, ffn, layers, heads, kv):
    assert heads % kv == 0  # GQA: every KV head serves heads // kv query heads
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (hidden, ffn, layers)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (heads, kv, HD)
    inner = model.model
    assert len(inner.layers) == layers
    assert inner.embed_tokens.weight.shape == (512, hidden)
    assert model.lm_head.weight.shape == (512, hidden)
    assert inner.norm.weight.shape == (hidden,)
    for i, layer in enumerate(inner.layers):
        a, m = layer.self_attn, layer.mlp
        assert a.q_proj.weight.shape == (heads * HD, hidden)
        assert a.k_proj.weight.shape == a.v_proj.weight.shape == (kv * HD, hidden)
        assert a.o_proj.weight.shape == (hidden, heads * HD)
        assert a.num_key_value_groups == heads // kv and a.layer_idx == i
        assert m.gate_proj.weight.shape == m.up_proj.weight.shape == (ffn, hidden)
        assert m.down_proj.weight.shape == (hidden, ffn)
        assert layer.input_layernorm.weight.shape == (hidden,)
        assert layer.post_attention_layernorm.weight.shape == (hidden,)
    assert sum(p.numel() for p in model.parameters()) == param_count(dims_of(c.to_dict()))


CASES = {
    "ffn": ({"ffn_hidden_size": 192}, (128, 192, 4, 8, 2)),
    "query-heads-per-group": ({"num_attention_heads": 4}, (128, 256, 4, 4, 2)),
    "kv-groups": ({"num_key_value_heads": 1}, (128, 256, 4, 4, 1)),
    "kv-groups-and-query-heads": (
        {"num_key_value_heads": 1, "num_attention_heads": 2},
        (128, 256, 4, 2, 1),
    ),
    "hidden": ({"hidden_size": 80}, (80, 256, 4, 8, 2)),  # 80 != 8 heads x 16: head_dim stays
    "depth": ({"num_layers": 3}, (128, 256, 3, 8, 2)),
    "all": (
        {
            "ffn_hidden_size": 160,
            "hidden_size": 96,
            "num_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
        },
        (96, 160, 2, 2, 1),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prunes_to_exactly_the_target_shapes(case, base, tokens):
    targets, want = CASES[case]
    model = copy.deepcopy(base)
    summary = run(model, tokens, **targets)
    assert_shapes(model, *want)
    after = summary["after"]
    got = (after["hidden_size"], after["intermediate_size"], after["num_hidden_layers"])
    assert got == want[:3]
    assert summary["params_after"] == sum(p.numel() for p in model.parameters())
    assert summary["params_after"] < summary["params_before"] == 689_280
    logits = model(input_ids=tokens[:2]).logits
    assert logits.shape == (2, 64, 512) and torch.isfinite(logits).all()


def test_pruned_model_reloads_to_the_same_logits(base, tokens, tmp_path):
    model = copy.deepcopy(base)
    run(model, tokens, **CASES["all"][0])
    with torch.no_grad():
        before = model(input_ids=tokens[:2]).logits
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")} == {
        "hidden_size": 96,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
    }
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (
        2,
        1,
        16,
    )
    reloaded = models.load_model(tmp_path, "float32")  # from_pretrained, strict shapes
    assert_shapes(reloaded, 96, 160, 2, 2, 1)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=tokens[:2]).logits, before)


def test_tied_embeddings_stay_tied(tokens, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    cfg.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(cfg).eval()
    run(model, tokens, hidden_size=48)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.shape == (512, 48)
    model.save_pretrained(tmp_path)
    reloaded = models.load_model(tmp_path, "float32")
    with torch.no_grad():
        assert torch.equal(
            reloaded(input_ids=tokens[:1]).logits, model(input_ids=tokens[:1]).logits
        )


# ----------------------------------------------------------------- planted importance


def planted(base):
    return copy.deepcopy(base)


def test_a_near_zero_mlp_neuron_is_the_one_removed(base, tokens):
    model = planted(base)
    for i, layer in enumerate(model.model.layers):
        layer.mlp.gate_proj.weight.data[37 + i] *= 1e-3  # silu(~0) * up ~ 0
    summary = run(model, tokens, ffn_hidden_size=255)
    for i in range(4):
        assert summary["kept"]["ffn"][i] == [j for j in range(256) if j != 37 + i]


def test_a_near_zero_query_head_is_the_one_removed(base, tokens):
    model = planted(base)
    o = model.model.layers[1].self_attn.o_proj.weight.data
    for head in (1, 2, 5, 6):  # two per group write ~nothing to the residual stream
        o[:, head * HD : (head + 1) * HD] *= 1e-3
    # 2 per group go (8 -> 6 would leave hidden 128 no multiple of the heads: transformers'
    # Llama config refuses that)
    summary = run(model, tokens, num_attention_heads=4)
    assert summary["removed_query_heads"]["1"] == [1, 2, 5, 6]
    assert summary["kept"]["query_heads"][1] == [0, 3, 4, 7]


def test_a_near_zero_kv_group_is_the_one_removed(base, tokens):
    model = planted(base)
    for i, layer in enumerate(model.model.layers):
        group = i % 2  # alternate: a constant answer would fail
        layer.self_attn.v_proj.weight.data[group * HD : (group + 1) * HD] *= 1e-3
    summary = run(model, tokens, num_key_value_heads=1)
    assert summary["removed_kv_heads"] == {"0": [0], "1": [1], "2": [0], "3": [1]}
    # The kept group's 4 query heads go with it.
    assert summary["kept"]["query_heads"][1] == [0, 1, 2, 3]
    assert summary["kept"]["query_heads"][0] == [4, 5, 6, 7]


def test_near_zero_hidden_channels_are_the_ones_removed(base, tokens):
    model = planted(base)
    # 8 of 128 (hidden must stay a multiple of the 8 heads: transformers' Llama config)
    gone = [3, 19, 40, 77, 90, 101, 115, 126]
    for layer in model.model.layers:  # what the attention and MLP read of them ~ 0
        layer.input_layernorm.weight.data[gone] *= 1e-3
        layer.post_attention_layernorm.weight.data[gone] *= 1e-3
    summary = run(model, tokens, hidden_size=120)
    assert summary["kept"]["hidden"] == [c for c in range(128) if c not in gone]
    keep = torch.tensor(summary["kept"]["hidden"])
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight[:, keep])


def test_a_near_identity_layer_is_the_one_dropped(base, tokens):
    model = planted(base)
    layer = model.model.layers[2]
    layer.self_attn.o_proj.weight.data *= 1e-3  # both residual branches ~0: output ~ input
    layer.mlp.down_proj.weight.data *= 1e-3
    summary = run(model, tokens, num_layers=3)
    assert summary["removed_layers"] == [2]
    scores = summary["layer_importance"]
    assert scores[2] < min(s for i, s in enumerate(scores) if i != 2) / 10
    # The survivors are the original layers 0, 1, 3, renumbered for the KV cache.
    survivor = model.model.layers[2]
    assert survivor.self_attn.layer_idx == 2
    assert torch.equal(survivor.mlp.down_proj.weight, base.model.layers[3].mlp.down_proj.weight)


# ----------------------------------------------------------------- sizes from a fraction


@pytest.mark.parametrize(
    ("search", "max_width"),
    [
        (["ffn_hidden_size", "hidden_size"], 0.4),
        # 8 heads -> 4 (6 would leave hidden 128 no multiple of the heads)
        (["ffn_hidden_size", "num_attention_heads", "num_layers"], 0.5),
    ],
)
def test_params_fraction_picks_sizes_near_the_target(search, max_width, base, tokens):
    model = copy.deepcopy(base)
    config = PruneConfig(
        params_fraction=0.75, size_multiple=16, search=search, max_width_pruning=max_width
    )
    predicted, problems, info = resolve_targets(config, base.config.to_dict())
    assert problems == []
    summary = prune(model, config, calibration.batches(tokens, 4))
    fraction = summary["params_after"] / summary["params_before"]
    assert 0.72 <= fraction <= 0.75  # the largest model at or under the target
    assert summary["params_fraction"] == round(fraction, 4) == info["params_fraction"]
    assert summary["searched"] == search and summary["target_params_fraction"] == 0.75
    after = summary["after"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert after[key] == predicted[key] == getattr(model.config, key)  # plan == run
    assert after["hidden_size"] % 16 == 0 and after["intermediate_size"] % 16 == 0
    assert after["intermediate_size"] >= (1 - max_width) * 256
    assert after["num_hidden_layers"] >= 4 * 0.8
    assert after["hidden_size"] % after["num_attention_heads"] == 0
    if "hidden_size" not in search:
        assert after["hidden_size"] == 128


def test_impossible_targets_are_refused_with_the_reason(base, tokens):
    config = base.config.to_dict()
    cases = {
        "larger": (
            {"ffn_hidden_size": 512},
            "ffn_hidden_size 512 is larger than the model's intermediate_size (256)",
        ),
        "not-a-multiple": (
            {"num_attention_heads": 5},
            "num_attention_heads 5 is not a multiple of the 2 KV heads",
        ),
        "heads-between-groups": (
            {"num_key_value_heads": 1, "num_attention_heads": 8},
            "would be 8 per KV group, more than the model's 4",
        ),
        "hidden-vs-heads": (
            {"hidden_size": 100},
            "hidden_size 100 is not a multiple of the 8 attention heads",
        ),
        "out-of-reach": ({"params_fraction": 0.2}, "params_fraction 0.2 is out of reach"),
        "nothing": ({"hidden_size": 128}, "prunes nothing"),
    }
    for targets, message in cases.values():
        _, problems, _ = resolve_targets(PruneConfig(**targets), config)
        assert len(problems) == 1 and message in problems[0][1], problems
        with pytest.raises(OptimizerError, match="^" + problems[0][0]):
            run(copy.deepcopy(base), tokens, **targets)


def test_a_model_with_modelopt_state_is_refused(base, tokens):
    from optimizer.techniques.quantize import QuantizeConfig, quantize

    model = copy.deepcopy(base)
    quantize(model, QuantizeConfig(format="fp8"), calibration.forward_loop(tokens[:2], 2))
    with pytest.raises(OptimizerError, match="carries ModelOpt state"):
        run(model, tokens, ffn_hidden_size=128)
    assert model.model.layers[0].mlp.down_proj.weight.shape == (128, 256)  # untouched
