"""Draft heads (EAGLE-3, Medusa) on a tiny Llama: convert, train, draft, export."""

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open
from tiny import CALIBRATION

from optimizer import models
from optimizer.errors import OptimizerError
from optimizer.techniques.speculative import (
    DraftHeadConfig,
    EagleDrafter,
    MedusaDrafter,
    base_forward,
    convert_draft_head,
    export_draft_head,
)
from optimizer.techniques.train import TrainingConfig, train
from optimizer.training_data import TrainingData, build_splits, load_documents

DATA = TrainingData(dataset=str(CALIBRATION), max_eval_samples=8)
EAGLE = DraftHeadConfig(method="eagle3")
MEDUSA = DraftHeadConfig(method="medusa", medusa_heads=3)


def config(**kw) -> TrainingConfig:
    base = dict(data=DATA, steps=8, learning_rate=2e-2, batch_size=4, seq_len=64, log_every=1)
    return TrainingConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def splits(tiny_llama):
    tok = models.load_tokenizer(tiny_llama)
    return build_splits(DATA, load_documents(DATA, Path(".")), tok, 64, seed=0)


def sharp_base(tiny_llama):
    """The tiny Llama with a 20x lm_head: a random model's next-token distribution is nearly
    uniform, and its entropy (about log 512 = 6.24) is the floor of EAGLE's distillation
    loss, so there would be nothing to learn."""
    model = models.load_model(tiny_llama, "float32")
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


@pytest.fixture(scope="module")
def trained(tiny_llama, splits, tmp_path_factory):
    """Both heads trained 8 steps (shared by the drafting and export tests)."""
    out = {}
    for cfg in (EAGLE, MEDUSA):
        torch.manual_seed(0)
        model = convert_draft_head(sharp_base(tiny_llama), cfg)
        ckpt = tmp_path_factory.mktemp(cfg.method)
        out[cfg.method] = (model, train(model, config(), splits, output_dir=ckpt))
    return out


def prompt(splits, n):
    return splits.heldout.tokens[:1, :n]


def test_draft_heads_train_with_the_base_frozen(tiny_llama, trained):
    base = sharp_base(tiny_llama).state_dict()
    for method, (model, m) in trained.items():
        assert m["trainer"] == "ModelOptHFTrainer" and m["steps"] == 8
        # measured: eagle3 14.16 -> 10.89, medusa 3.107 -> 3.042 (its loss is 0.2 x decayed
        # per-head cross-entropies)
        drop = {"eagle3": 2.0, "medusa": 0.04}[method]
        assert m["after"]["heldout_loss"] < m["before"]["heldout_loss"] - drop, (method, m)
        assert m["loss_curve"][-1][1] < m["loss_curve"][0][1]
        assert m["draft_head"]["method"] == method
        # not one base weight moved
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in base.items()), method
    eagle = trained["eagle3"][1]
    assert 0 < eagle["draft_head"]["heldout_draft_accuracy"] <= 1


def test_the_plain_base_forward_is_the_unconverted_model(tiny_llama, trained, splits):
    from transformers import DynamicCache

    plain = sharp_base(tiny_llama)
    ids = prompt(splits, 12)
    with torch.no_grad():
        want = plain(input_ids=ids).logits
    for model, _ in trained.values():
        out = base_forward(model)(ids, DynamicCache(config=model.config), False)
        assert torch.equal(out.logits, want)
        assert out.past_key_values.get_seq_length() == 12


def test_eagle_drafter_matches_modelopts_pseudo_generate(trained, splits):
    from transformers import DynamicCache

    model, _ = trained["eagle3"]
    forward, drafter = base_forward(model), EagleDrafter(model)
    ids = prompt(splits, 14)

    def proposal(n, k=4):
        _, want = model.pseudo_speculative_generate(ids[:, :n], steps=k)
        return want[0]

    # prefill 6, then a verification forward of 6 tokens of which 4 are committed
    drafter.reset()
    cache = DynamicCache(config=model.config)
    out = forward(ids[:, :6], cache, False)
    drafter.observe(None, 6)
    base_next = out.logits[:, -1:].argmax(-1)
    assert torch.equal(drafter.propose(torch.cat([ids[:, :6], base_next], 1), 4), proposal(6))
    out = forward(ids[:, 6:12], cache, False)
    drafter.observe(None, 4)
    cache.crop(10)
    base_next = out.logits[:, 3:4].argmax(-1)
    got = drafter.propose(torch.cat([ids[:, :10], base_next], 1), 4)
    assert got.shape == (4,) and torch.equal(got, proposal(10))
    assert model._aux_hidden_states == []  # drained: nothing accumulates


def test_medusa_drafter_is_the_argmax_of_the_heads(trained, splits):
    from transformers import DynamicCache

    model, _ = trained["medusa"]
    drafter, ids = MedusaDrafter(model), prompt(splits, 9)
    out = base_forward(model)(ids, DynamicCache(config=model.config), True)
    drafter.observe(out.hidden_states, 7)  # of 9 positions, 7 committed
    with torch.no_grad():
        h = model.model(input_ids=ids[:, :7]).last_hidden_state[:, -1]
        want = torch.stack([model.medusa_heads[i](h)[0].argmax() for i in range(3)])
    assert torch.equal(drafter.propose(ids[:, :8], 3), want)
    with pytest.raises(OptimizerError, match="draft length 4 exceeds the 3 medusa heads"):
        drafter.propose(ids[:, :8], 4)


def test_eagle3_export_is_the_draft_checkpoint_servers_load(trained, tmp_path):
    model, _ = trained["eagle3"]
    live = {k: v.clone() for k, v in model.eagle_module.state_dict().items()}
    result = export_draft_head(model, EAGLE, tmp_path, dtype="bfloat16")
    assert result["files"] == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    # the base's shapes, not ModelOpt's Llama-3-8B defaults
    want = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
    want |= {"head_dim": 32, "intermediate_size": 256, "num_hidden_layers": 1}
    assert {k: cfg[k] for k in want} == want
    assert cfg["torch_dtype"] == "bfloat16" and cfg["rope_theta"] == 10000.0
    assert cfg["rope_scaling"]["rope_type"] == "default"  # no YaRN swapped in at export
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1]
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert shapes["fc.weight"] == (128, 2 * 128)
    assert shapes["layers.0.self_attn.q_proj.weight"] == (128, 2 * 128)  # [embeds, hidden]
    assert shapes["layers.0.self_attn.k_proj.weight"] == (64, 2 * 128)
    assert shapes["lm_head.weight"] == (512, 128) and shapes["norm.weight"] == (128,)
    assert "layers.0.hidden_norm.weight" in shapes and "d2t" not in shapes  # full vocab
    assert {k for k in shapes if k != "lm_head.weight"} == set(live)
    for k, v in live.items():
        assert stored[k].dtype == torch.bfloat16
        assert torch.equal(stored[k], v.to(torch.bfloat16)), k
    with pytest.raises(OptimizerError, match="eagle3 draft head, not medusa"):
        export_draft_head(model, MEDUSA, tmp_path / "x")


def test_medusa_export_is_a_trtllm_medusa_checkpoint(tiny_llama, trained, tmp_path):
    model, _ = trained["medusa"]
    # (ModelOpt's TensorRT-LLM exporter writes float16 when asked for float32)
    heads = {k: v.to(torch.bfloat16) for k, v in model.medusa_heads.state_dict().items()}
    result = export_draft_head(model, MEDUSA, tmp_path, dtype="bfloat16")
    assert result["summary"]["num_medusa_heads"] == 3
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architecture"] == "MedusaForCausalLM"
    assert cfg["base_architecture"] == "LlamaForCausalLM"
    assert (cfg["num_medusa_heads"], cfg["num_medusa_layers"]) == (3, 1)
    assert cfg["max_draft_len"] == 63 and cfg["rotary_base"] == 10000.0
    with safe_open(tmp_path / "rank0.safetensors", "pt") as f:
        for i in range(3):
            w = f.get_tensor(f"medusa_heads.{i}.medusa_layers.0.linear.weight")
            assert torch.equal(w, heads[f"{i}.0.linear.weight"])
            assert torch.equal(
                f.get_tensor(f"medusa_heads.{i}.medusa_layers.0.linear.bias"),
                heads[f"{i}.0.linear.bias"],
            )
            assert torch.equal(
                f.get_tensor(f"medusa_heads.{i}.lm_head.weight"), heads[f"{i}.1.weight"]
            )


def test_bad_configs_are_clear_errors(tiny_llama):
    with pytest.raises(ValidationError, match="medusa_heads do not apply to method eagle3"):
        DraftHeadConfig(method="eagle3", medusa_heads=5)
    with pytest.raises(
        ValidationError, match="num_layers, ttt_steps do not apply to method medusa"
    ):
        DraftHeadConfig(method="medusa", num_layers=2, ttt_steps=2)
    with pytest.raises(ValidationError, match="repeat a layer"):
        DraftHeadConfig(method="eagle3", aux_layer_ids=[0, 0])
    with pytest.raises(ValidationError, match="method"):
        DraftHeadConfig(method="mtp")
    model = models.load_model(tiny_llama, "float32")
    with pytest.raises(OptimizerError, match=r"aux_layer_ids \[5\]: the base model has 2"):
        convert_draft_head(model, DraftHeadConfig(method="eagle3", aux_layer_ids=[0, 5]))
    convert_draft_head(model, MEDUSA)
    with pytest.raises(OptimizerError, match="already has a medusa draft head"):
        convert_draft_head(model, EAGLE)
    with pytest.raises(OptimizerError, match="medusa draft head trains .* no teacher"):
        train(model, config(), None, output_dir=Path("unused"), teacher=model)
