"""qat / distill: training through ModelOpt's trainers lowers the loss it optimises, the result
exports cleanly, and a run killed mid-training resumes from its last checkpoint to the same
model an uninterrupted run makes."""

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import CALIBRATION

from optimizer import calibration, models
from optimizer.errors import OptimizerError
from optimizer.techniques.quantize import QuantizeConfig, quantize
from optimizer.techniques.train import DistillationLoss, TrainingConfig, train
from optimizer.training_data import TrainingData, build_splits, load_documents
from optimizer.trtllm import check_checkpoint

#: The shipped python-docs text as training data (the tiny tokenizer was trained on it, so
#: its loss is meaningful); seq_len 64 keeps a CPU step well under a second.
DATA = TrainingData(dataset=str(CALIBRATION), max_eval_samples=16)


def config(**kw) -> TrainingConfig:
    base = dict(data=DATA, steps=6, learning_rate=1e-3, batch_size=4, seq_len=64, log_every=1)
    return TrainingConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def splits(tiny_llama):
    tok = models.load_tokenizer(tiny_llama)
    return build_splits(DATA, load_documents(DATA, Path(".")), tok, 64, seed=0)


def quantized(tiny_llama, fmt="fp8", group_size=None):
    model = models.load_model(tiny_llama, "float32")
    tok = models.load_tokenizer(tiny_llama)
    tokens = calibration.tokenize(
        calibration_spec(), calibration.load_texts(calibration_spec(), Path(".")), tok
    )
    quantize(
        model,
        QuantizeConfig(format=fmt, group_size=group_size),
        calibration.forward_loop(tokens, 4),
    )
    return model


def calibration_spec():
    from optimizer.recipe import CalibrationSpec

    return CalibrationSpec(dataset=str(CALIBRATION), num_samples=8, seq_len=64)


def test_qat_lowers_the_training_loss(tiny_llama, splits, tmp_path):
    model = quantized(tiny_llama)
    m = train(model, config(), splits, output_dir=tmp_path / "ckpt")
    assert m["trainer"] == "QATTrainer" and m["steps"] == 6 and m["steps_this_run"] == 6
    assert m["tokens"] == 6 * 4 * 64
    # Cross-entropy of a random model on real text: training must move it down clearly.
    assert m["after"]["train_loss"] < m["before"]["train_loss"] - 0.1
    assert m["after"]["heldout_loss"] < m["before"]["heldout_loss"] - 0.1
    assert m["loss_curve"][-1][1] < m["loss_curve"][0][1]
    assert [s for s, _ in m["loss_curve"]] == [1, 2, 3, 4, 5, 6]
    assert next(model.parameters()).dtype == torch.float32  # back in its compute dtype


def test_qad_lowers_the_distillation_loss(tiny_llama, splits, tmp_path):
    model = quantized(tiny_llama, "int4_awq", 64)
    teacher = models.load_model(tiny_llama, "float32")
    m = train(
        model, config(learning_rate=1e-4), splits, output_dir=tmp_path / "ckpt", teacher=teacher
    )
    assert m["trainer"] == "QADTrainer"
    # The KD loss (student vs its unquantized self) is what QAD minimises.
    assert m["after"]["train_loss"] < 0.95 * m["before"]["train_loss"]
    assert "heldout_ce_loss" in m["after"]  # cross-entropy is reported beside it


@pytest.fixture
def perturbed(tiny_llama):
    """An unquantized student that differs from the teacher (as after pruning would)."""
    student = models.load_model(tiny_llama, "float32")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return student, models.load_model(tiny_llama, "float32")


def test_distill_lowers_the_kd_loss_and_composes_the_loss_terms(perturbed, splits, tmp_path):
    student, teacher = perturbed
    fresh = [copy.deepcopy(student) for _ in range(3)]  # identical students for the loss terms
    kd = train(student, config(), splits, output_dir=tmp_path / "a", teacher=teacher)
    assert kd["trainer"] == "KDTrainer"
    assert kd["after"]["train_loss"] < 0.9 * kd["before"]["train_loss"]

    def before(student, name, loss=None):
        m = train(
            student,
            config(steps=1),
            splits,
            output_dir=tmp_path / name,
            teacher=teacher,
            distillation=loss,
        )
        return m["before"]

    # ce_weight 1, kd_weight 0: the loss is exactly the cross-entropy reported beside it.
    ce_only = before(fresh[0], "b", DistillationLoss(kd_weight=0.0, ce_weight=1.0))
    assert ce_only["heldout_loss"] == pytest.approx(ce_only["heldout_ce_loss"], rel=1e-4)
    # A hidden-state loss adds a positive term to the KD loss of the same weights.
    layers = DistillationLoss(
        layer_losses=[{"student": "model.layers.1", "teacher": "model.layers.1", "weight": 10.0}]
    )
    with_layers, kd_only = before(fresh[1], "c", layers), before(fresh[2], "d")
    assert with_layers["heldout_ce_loss"] == kd_only["heldout_ce_loss"]  # same weights
    assert with_layers["heldout_loss"] > kd_only["heldout_loss"] + 1e-3


def test_gradient_accumulation_matches_a_larger_batch(perturbed, splits, tmp_path):
    """KD loss with 2 x 2 accumulated windows is the loss and the update of 4 in one batch."""
    student, teacher = perturbed
    twin = copy.deepcopy(student)
    one = train(student, config(steps=2), splits, output_dir=tmp_path / "a", teacher=teacher)
    acc = train(
        twin,
        config(steps=2, batch_size=2, gradient_accumulation=2),
        splits,
        output_dir=tmp_path / "b",
        teacher=teacher,
    )
    assert acc["tokens"] == one["tokens"]
    for (s1, l1), (s2, l2) in zip(one["loss_curve"], acc["loss_curve"], strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-3)
    for (n, p), q in zip(student.named_parameters(), twin.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5), n


def test_a_checkpoint_written_in_part_is_dropped(tmp_path):
    from optimizer.techniques.train import last_complete_checkpoint

    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text("{}")
    # checkpoint-6 was being written when the job died: no trainer_state.json (written last)
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert not (tmp_path / "checkpoint-6").exists()
    assert last_complete_checkpoint(tmp_path / "none") is None


def test_bad_layer_and_frozen_names_are_clear_errors(perturbed, splits, tmp_path):
    student, teacher = perturbed
    bad = DistillationLoss(layer_losses=[{"student": "model.layer.1", "teacher": "model.layers.1"}])
    with pytest.raises(OptimizerError, match="student has no module 'model.layer.1'.*did you mean"):
        train(
            student, config(), splits, output_dir=tmp_path / "a", teacher=teacher, distillation=bad
        )
    with pytest.raises(OptimizerError, match="frozen pattern 'lm_heads\\*' matches no parameter"):
        train(
            student,
            config(frozen=["lm_heads*"]),
            splits,
            output_dir=tmp_path / "b",
            teacher=teacher,
        )
    with pytest.raises(OptimizerError, match="not quantized .* no teacher"):
        train(student, config(), splits, output_dir=tmp_path / "c")


def test_frozen_parameters_do_not_move(perturbed, splits, tmp_path):
    student, teacher = perturbed
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    train(
        student,
        config(steps=2, frozen=["*embed_tokens*", "model.layers.0.*"]),
        splits,
        output_dir=tmp_path / "a",
        teacher=teacher,
    )
    after = dict(student.named_parameters())
    for name, p in before.items():
        moved = not torch.equal(p, after[name])
        frozen = "embed_tokens" in name or name.startswith("model.layers.0.")
        assert moved != frozen, name


# ----------------------------------------------------------------- through the runner


def qat_recipe(directory: Path, model: Path, *, steps=8, teacher="none", extra="") -> Path:
    recipe = directory / "recipe.yaml"
    recipe.write_text(
        textwrap.dedent(f"""\
        name: tiny-qat
        model: {{source: {model}}}
        calibration: {{dataset: {CALIBRATION}, num_samples: 8, seq_len: 64, batch_size: 4}}
        stages:
          - ptq: {{format: fp8}}
          - qat:
              teacher: {teacher}
              data: {{dataset: {CALIBRATION}, max_eval_samples: 8}}
              steps: {steps}
              learning_rate: 1.0e-3
              batch_size: 4
              seq_len: 64
              log_every: 1
              save_every: 2
              {extra}
          - export: {{trtllm_checkpoint: {{tp: 1, pp: 1}}, hf_checkpoint: true}}
        """)
    )
    return recipe


def run_cli(recipe: Path, run_dir: Path, *flags: str) -> int:
    from optimizer.cli import main

    return main(["run", str(recipe), "-o", str(run_dir), "-q", *flags])


@pytest.fixture(scope="module")
def finished(tiny_llama, tmp_path_factory):
    """An uninterrupted ptq -> qat -> export run (the reference for the resume test)."""
    d = tmp_path_factory.mktemp("qat")
    recipe = qat_recipe(d, tiny_llama)
    assert run_cli(recipe, d / "run") == 0
    return recipe, d / "run"


def test_qat_stage_trains_saves_and_exports_validator_clean(finished):
    _, run_dir = finished
    rec = json.loads((run_dir / "run.json").read_text())
    qat = rec["stages"][1]
    m = qat["metrics"]
    assert m["trainer"] == "QATTrainer" and m["steps"] == 8
    assert m["after"]["train_loss"] < m["before"]["train_loss"]
    assert set(qat["inputs"]) == {"training_data"}
    assert (Path(qat["outputs"]["training"]["path"]) / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(run_dir.glob(".checkpoints-*"))  # dropped once the stage committed
    assert check_checkpoint(run_dir / "trtllm_checkpoint") == []
    hf = json.loads((run_dir / "hf_checkpoint" / "config.json").read_text())
    assert hf["quantization_config"]["quant_method"] == "modelopt"
    # The hand-over is the trained model, not the PTQ one.
    ptq = load_file(Path(rec["stages"][0]["outputs"]["model"]["path"]) / "model.safetensors")
    trained = load_file(Path(qat["outputs"]["model"]["path"]) / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(ptq[key], trained[key])


KILL_AFTER_CHECKPOINT = textwrap.dedent("""
    import os, signal, sys
    import transformers
    from optimizer.cli import main

    save = transformers.Trainer._save_checkpoint

    def save_then_die(self, *args, **kwargs):
        save(self, *args, **kwargs)
        if self.state.global_step == int(sys.argv[3]):
            # SIGKILL: no clean-up, as an OOM-killed job dies; SIGTERM: a scheduler's stop
            os.kill(os.getpid(), getattr(signal, sys.argv[4]))

    transformers.Trainer._save_checkpoint = save_then_die
    sys.exit(main(["run", sys.argv[1], "-o", sys.argv[2], "-q"]))
""")


def kill_after_checkpoint(recipe: Path, run_dir: Path, step: int, sig: str = "SIGKILL"):
    """Run the recipe in a subprocess that gets ``sig`` right after its step-``step`` save."""
    proc = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_CHECKPOINT, str(recipe), str(run_dir), str(step), sig],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if sig == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL, proc.stderr
    return proc


def test_killed_training_resumes_from_its_last_checkpoint_to_the_same_model(finished, tmp_path):
    recipe, reference = finished
    run_dir = tmp_path / "killed"
    kill_after_checkpoint(recipe, run_dir, 4)
    (ckpts,) = run_dir.glob(".checkpoints-01-qat")
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    assert run_cli(recipe, run_dir, "--resume") == 0
    rec = json.loads((run_dir / "run.json").read_text())
    assert [s["status"] for s in rec["stages"]] == ["skipped", "success", "success"]
    m = rec["stages"][1]["metrics"]
    assert (m["resumed_from_step"], m["steps_this_run"], m["steps"]) == (4, 4, 8)
    log = (run_dir / "logs" / "run.log").read_text()
    assert "resuming training from checkpoint-4" in log
    assert "step 5/8: loss" in log and log.count("step 1/8: loss") == 1  # 1-4: before the kill
    ref = json.loads((reference / "run.json").read_text())["stages"][1]
    assert m["loss_curve"] == ref["metrics"]["loss_curve"]
    assert m["eval_curve"] == ref["metrics"]["eval_curve"]
    assert m["after"] == ref["metrics"]["after"]
    assert m["before"] == ref["metrics"]["before"]
    ours = load_file(Path(rec["stages"][1]["outputs"]["model"]["path"]) / "model.safetensors")
    theirs = load_file(Path(ref["outputs"]["model"]["path"]) / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


def test_sigterm_ends_the_run_as_interrupted_and_resume_continues(tiny_llama, tmp_path):
    recipe = qat_recipe(tmp_path, tiny_llama, steps=4)
    run_dir = tmp_path / "run"
    proc = kill_after_checkpoint(recipe, run_dir, 2, "SIGTERM")
    assert proc.returncode == 143, proc.stderr  # 128 + SIGTERM, as schedulers expect
    assert "terminated (SIGTERM" in proc.stderr and "--resume" in proc.stderr
    rec = json.loads((run_dir / "run.json").read_text())
    assert rec["status"] == "interrupted" and "SIGTERM" in rec["error"]["message"]
    assert [s["status"] for s in rec["stages"]] == ["success", "interrupted", "pending"]
    assert run_cli(recipe, run_dir, "--resume") == 0
    m = json.loads((run_dir / "run.json").read_text())["stages"][1]["metrics"]
    assert (m["resumed_from_step"], m["steps_this_run"]) == (2, 2)


def test_a_changed_recipe_discards_stale_checkpoints(tiny_llama, tmp_path):
    recipe = qat_recipe(tmp_path, tiny_llama, steps=4)
    run_dir = tmp_path / "run"
    kill_after_checkpoint(recipe, run_dir, 2)
    recipe = qat_recipe(tmp_path, tiny_llama, steps=4, extra="seed: 1")
    assert run_cli(recipe, run_dir, "--resume") == 0
    m = json.loads((run_dir / "run.json").read_text())["stages"][1]["metrics"]
    assert m["resumed_from_step"] == 0 and m["steps_this_run"] == 4
    assert "discarding checkpoints of a different" in (run_dir / "logs" / "run.log").read_text()


def launch(recipe: Path, run_dir: Path, port: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(port), "-m", "optimizer", "run", str(recipe), "-o", str(run_dir)]
    proc = subprocess.run([*cmd, "-q"], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(sys.platform != "linux", reason="gloo launch tested on Linux")
def test_two_process_launch_trains_with_ddp_and_only_rank0_writes(tiny_llama, tmp_path):
    run_dir = tmp_path / "run"
    launch(qat_recipe(tmp_path, tiny_llama, steps=4), run_dir, 29533)
    rec = json.loads((run_dir / "run.json").read_text())
    assert rec["status"] == "success"
    m = rec["stages"][1]["metrics"]
    assert m["world_size"] == 2 and m["steps"] == 4
    assert m["tokens"] == 4 * 4 * 2 * 64  # both processes' batches count
    assert m["after"]["train_loss"] < m["before"]["train_loss"]
    assert check_checkpoint(run_dir / "trtllm_checkpoint") == []
    rank1_log = (run_dir / "logs" / "run.rank1.log").read_text()
    assert "no multi-process stage from here on" in rank1_log
    assert not [p for p in run_dir.rglob("*") if "rank1" in p.name and p.is_dir()]

    # --resume under the launcher: every rank follows rank 0's view of the finished run.
    launch_resume = qat_recipe(tmp_path, tiny_llama, steps=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", "29534", "-m", "optimizer", "run", str(launch_resume)]
    proc = subprocess.run(
        [*cmd, "-o", str(run_dir), "-q", "--resume"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((run_dir / "run.json").read_text())
    assert [s["status"] for s in rec["stages"]] == ["skipped", "skipped", "skipped"]


def test_fsdp_without_gpus_is_refused(tiny_llama, splits, tmp_path):
    model = quantized(tiny_llama)
    with pytest.raises(OptimizerError, match="fsdp: true needs CUDA GPUs"):
        train(model, config(fsdp=True), splits, output_dir=tmp_path / "ckpt")


def distill_recipe(directory: Path, model: Path, teacher: Path) -> Path:
    recipe = directory / "recipe.yaml"
    recipe.write_text(
        textwrap.dedent(f"""\
        name: tiny-distill
        model: {{source: {model}}}
        stages:
          - distill:
              teacher: {teacher}
              data: {{dataset: {CALIBRATION}, max_eval_samples: 8}}
              steps: 6
              learning_rate: 1.0e-3
              batch_size: 4
              seq_len: 64
              save_every: 2
              temperature: 2.0
              ce_weight: 0.5
          - export: {{hf_checkpoint: true}}
        """)
    )
    return recipe


@pytest.fixture(scope="module")
def distilled(tiny_llama, tmp_path_factory):
    from tiny import make_tiny_llama

    d = tmp_path_factory.mktemp("distill")
    teacher = make_tiny_llama(d / "teacher", seed=1)
    recipe = distill_recipe(d, tiny_llama, teacher)
    assert run_cli(recipe, d / "run") == 0
    return recipe, d / "run"


def test_distill_stage_learns_from_another_checkpoint(distilled):
    _, run_dir = distilled
    stage = json.loads((run_dir / "run.json").read_text())["stages"][0]
    assert set(stage["inputs"]) == {"training_data", "teacher"}
    m = stage["metrics"]
    assert m["trainer"] == "KDTrainer"
    assert m["after"]["train_loss"] < m["before"]["train_loss"]
    assert (run_dir / "hf_checkpoint" / "config.json").is_file()


def test_killed_distillation_resumes_to_the_same_model(distilled, tmp_path):
    recipe, reference = distilled
    run_dir = tmp_path / "killed"
    kill_after_checkpoint(recipe, run_dir, 4)
    assert run_cli(recipe, run_dir, "--resume") == 0
    rec = json.loads((run_dir / "run.json").read_text())["stages"][0]
    m = rec["metrics"]
    assert (m["resumed_from_step"], m["steps_this_run"], m["steps"]) == (4, 2, 6)
    ref = json.loads((reference / "run.json").read_text())["stages"][0]
    assert m["loss_curve"] == ref["metrics"]["loss_curve"]
    ours = load_file(Path(rec["outputs"]["model"]["path"]) / "model.safetensors")
    theirs = load_file(Path(ref["outputs"]["model"]["path"]) / "model.safetensors")
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k


def test_a_planted_checkpoint_link_is_not_written_through(tiny_llama, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    recipe = qat_recipe(tmp_path, tiny_llama, steps=2)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".checkpoints-01-qat").symlink_to(outside)
    assert run_cli(recipe, run_dir) == 0
    assert list(outside.iterdir()) == []
    assert not (run_dir / ".checkpoints-01-qat").exists()
