"""prune stage: sizes chosen from params_fraction are reported and predicted by the plan,
the pruned model reloads and exports validator-clean, a run killed after prune resumes
without redoing it to identical artifacts, later stages check against the pruned
dimensions, and bad recipes are refused before anything is written."""

import json
import signal
from pathlib import Path

import pytest
import torch
from test_bad_input_corpus import HEAD, HF_EXPORT
from tiny import run_killed_at, run_tiny_recipe

from optimizer import models, trtllm
from optimizer.cli import main
from optimizer.errors import OptimizerError
from optimizer.recipe import load_recipe
from optimizer.unified.check import check_hf_checkpoint

PRUNE = (
    "prune: {params_fraction: 0.6, size_multiple: 16, "
    "search: [ffn_hidden_size, hidden_size, num_attention_heads]}"
)
EXPORT = "export: {trtllm_checkpoint: {tp: 1, pp: 1}, hf_checkpoint: true}"


@pytest.fixture
def bad_recipe(write_recipe, tmp_path):
    """The corpus's recipe: its HEAD (the tiny Llama, calibration) and ``stages``."""
    return lambda stages: write_recipe(HEAD + stages, name="bad.yaml")


def run_cli(recipe, run_dir, *extra) -> int:
    return main(["run", str(recipe), "-o", str(run_dir), "-q", *extra])


def read_run(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


@pytest.fixture(scope="module")
def finished(tiny_llama, tmp_path_factory):
    """An uninterrupted prune -> export run (also the reference for the resume test)."""
    d = tmp_path_factory.mktemp("prune")
    assert run_tiny_recipe(d, tiny_llama, [PRUNE, EXPORT], num_samples=8, seq_len=32) == 0
    return d / "recipe.yaml", d / "run"


def test_stage_reports_sizes_reloads_and_exports_validator_clean(finished, tiny_llama):
    recipe, run_dir = finished
    rec = read_run(run_dir)
    m = rec["stages"][0]["metrics"]
    after = m["after"]
    assert m["target_params_fraction"] == 0.6 and 0.57 <= m["params_fraction"] <= 0.6
    assert m["params_fraction"] == round(m["params_after"] / m["params_before"], 4)
    assert m["searched"] == ["ffn_hidden_size", "hidden_size", "num_attention_heads"]
    assert after["hidden_size"] < 128 and after["head_dim"] == 32
    assert after["num_attention_heads"] % after["num_key_value_heads"] == 0
    # Validation predicted exactly the sizes the run chose: later stages checked these.
    planned = load_recipe(recipe).plans[1].dims
    assert {k: getattr(planned, k) for k in after} == after

    saved = Path(rec["stages"][0]["outputs"]["model"]["path"])
    config = json.loads((saved / "config.json").read_text())
    assert {k: config[k] for k in after} == after
    model = models.load_model(saved, "float32")  # from_pretrained with strict shapes
    assert sum(p.numel() for p in model.parameters()) == m["params_after"]
    with torch.no_grad():
        logits = model(input_ids=torch.arange(16)[None]).logits
    assert torch.isfinite(logits).all()
    kept = json.loads(
        (Path(rec["stages"][0]["outputs"]["pruning"]["path"]) / "pruning.json").read_text()
    )
    assert len(kept["kept"]["hidden"]) == after["hidden_size"]

    ckpt = run_dir / "trtllm_checkpoint"
    assert trtllm.check_checkpoint(ckpt) == []
    tc = json.loads((ckpt / "config.json").read_text())
    assert (tc["hidden_size"], tc["intermediate_size"], tc["head_size"]) == (
        after["hidden_size"],
        after["intermediate_size"],
        32,
    )
    assert (tc["num_attention_heads"], tc["num_key_value_heads"]) == (
        after["num_attention_heads"],
        after["num_key_value_heads"],
    )
    assert check_hf_checkpoint(run_dir / "hf_checkpoint") == []
    hf = json.loads((run_dir / "hf_checkpoint" / "config.json").read_text())
    assert {k: hf[k] for k in after} == after


def test_killed_after_prune_resumes_without_redoing_it(finished, tmp_path):
    recipe, reference = finished
    run_dir = tmp_path / "killed"
    proc = run_killed_at(recipe, run_dir, "optimizer.stages.export:Export")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    killed = read_run(run_dir)
    assert [s["status"] for s in killed["stages"]] == ["success", "running"]

    assert run_cli(recipe, run_dir, "--resume") == 0
    rec = read_run(run_dir)
    assert [s["status"] for s in rec["stages"]] == ["skipped", "success"]
    assert rec["stages"][0]["outputs"] == killed["stages"][0]["outputs"]
    log = (run_dir / "logs" / "run.log").read_text()
    assert "prune: skipped (finished earlier with the same inputs)" in log
    ref = read_run(reference)
    # Pruning is deterministic: the hand-over and what ships are bit-identical.
    assert (
        rec["stages"][0]["outputs"]["model"]["sha256"]
        == ref["stages"][0]["outputs"]["model"]["sha256"]
    )
    for key in ("trtllm_checkpoint", "hf_checkpoint"):
        assert (
            rec["stages"][1]["outputs"][key]["sha256"] == ref["stages"][1]["outputs"][key]["sha256"]
        )


def test_distill_after_prune_trains_on_logits_and_refuses_unequal_layer_losses(
    tiny_llama, tmp_path
):
    """The teacher (the model as loaded) has the original shapes, the student the pruned ones:
    logit KD needs only the vocabulary to agree; a hidden-state loss between layers of
    different widths is refused before training starts."""
    from tiny import CALIBRATION

    from optimizer.techniques.prune import PruneConfig, prune
    from optimizer.techniques.train import DistillationLoss, LayerLoss, TrainingConfig, train
    from optimizer.training_data import TrainingData, build_splits, load_documents

    student = models.load_model(tiny_llama, "float32")
    prune(student, PruneConfig(hidden_size=96, num_layers=1), [torch.arange(64).view(2, 32)])
    teacher = models.load_model(tiny_llama, "float32")
    data = TrainingData(dataset=str(CALIBRATION), max_eval_samples=4)
    tok = models.load_tokenizer(tiny_llama)
    splits = build_splits(data, load_documents(data, Path(".")), tok, 32, 0)
    config = TrainingConfig(data=data, steps=3, batch_size=4, seq_len=32, learning_rate=1e-3)

    pair = LayerLoss(student="model.layers.0", teacher="model.layers.1")
    loss = DistillationLoss(layer_losses=[pair])
    with pytest.raises(
        OptimizerError,
        match="model.layers.0 outputs 96 channels and the teacher's model.layers.1 128",
    ):
        train(student, config, splits, output_dir=tmp_path, teacher=teacher, distillation=loss)
    assert not list(tmp_path.iterdir())  # refused before the Trainer wrote anything

    m = train(student, config, splits, output_dir=tmp_path, teacher=teacher)
    assert m["trainer"] == "KDTrainer" and m["steps"] == 3
    assert m["after"]["train_loss"] < m["before"]["train_loss"]
    assert student.model.embed_tokens.weight.shape == (512, 96)


def test_shipped_prune_recipe_validates(builtin_cache, capsys):
    assert main(["validate", "builtin-prune-distill-fp8"]) == 0
    assert "prune -> distill -> ptq -> export -> gate" in capsys.readouterr().out
    # The builtin's static config (tied embeddings included) lets validation predict the
    # sizes params_fraction 0.75 picks before any model loads: 75.0 % of the parameters, with
    # hidden 432 = 9 heads x 48 (transformers refuses a hidden size no multiple of the heads).
    after = load_recipe("builtin-prune-distill-fp8").plans[1].dims
    assert (after.hidden_size, after.intermediate_size) == (432, 1536)
    assert (after.num_hidden_layers, after.vocab_size) == (30, 49152)


def test_the_plan_carries_explicit_sizes(write_recipe):
    stages = "  - prune: {{hidden_size: 96, num_key_value_heads: 1, num_layers: 1}}\n" + HF_EXPORT
    after = load_recipe(write_recipe(HEAD + stages)).plans[1].dims
    assert (after.hidden_size, after.num_hidden_layers, after.intermediate_size) == (96, 1, 256)
    assert (after.num_attention_heads, after.num_key_value_heads, after.head_dim) == (2, 1, 32)


def test_the_corpus_base_is_a_valid_prune_recipe(bad_recipe, capsys):
    """Each case above fails for its own reason alone."""
    ok = "  - prune: {{hidden_size: 64, num_layers: 1}}\n" + HF_EXPORT
    assert main(["validate", str(bad_recipe(ok))]) == 0
    capsys.readouterr()
