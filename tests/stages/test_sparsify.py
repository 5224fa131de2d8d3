"""sparsify: 2:4 weight sparsity through ModelOpt. Every targeted linear is 2:4 sparse after
the stage (magnitude and SparseGPT), after ptq (fp8, int4_awq), after training (qat and
distillation), and in the exported TensorRT-LLM and unified HF tensors; excluded layers stay
dense; a run killed after the stage resumes without redoing it to identical artifacts; bad
recipes are refused with one clear message."""

import json
import signal
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_bad_input_corpus import HEAD, assert_one_clear_error
from tiny import CALIBRATION, REPO, run_killed_at

from optimizer import calibration, models
from optimizer.cli import main
from optimizer.errors import OptimizerError
from optimizer.recipe import CalibrationSpec
from optimizer.techniques.sparsify import SparsifyConfig, sparsify
from optimizer.trtllm import check_checkpoint
from optimizer.unified.rebuild import unpack_int4_rows

DOUBLE = REPO / "tests" / "doubles" / "trtllm-build"
LINEARS = [f"self_attn.{p}_proj" for p in "qkvo"] + [
    f"mlp.{p}_proj" for p in ("gate", "up", "down")
]
#: The Llama linears in a TensorRT-LLM checkpoint (q, k, v stacked into qkv).
TRTLLM = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")


def zeros_per_group(weight) -> torch.Tensor:
    """Zeros in every group of 4 consecutive weights along the input dimension."""
    w = weight.detach().float()
    return (w.reshape(w.shape[0], -1, 4) == 0).sum(-1)


def assert_24(weight, name: str) -> None:
    groups = zeros_per_group(weight)
    assert bool((groups >= 2).all()), f"{name}: {int((groups < 2).sum())} groups with < 2 zeros"
    assert float((weight == 0).float().mean()) < 0.55, f"{name}: more zeros than 2:4 makes"


def assert_dense(weight, name: str) -> None:
    """Left dense: most groups keep 3 or 4 nonzeros (INT4 rounds some small weights to 0)."""
    assert float((zeros_per_group(weight) >= 2).float().mean()) < 0.2, f"{name} is sparse"


def decoder_linears(layers: int = 2) -> list[str]:
    return [f"model.layers.{i}.{p}" for i in range(layers) for p in LINEARS]


def tokens(tiny_llama, num_samples=4):
    spec = CalibrationSpec(dataset=str(CALIBRATION), num_samples=num_samples, seq_len=64)
    texts = calibration.load_texts(spec, Path("."))
    return calibration.tokenize(spec, texts, models.load_tokenizer(tiny_llama))


# ----------------------------------------------------------------- the technique


def test_magnitude_zeroes_the_two_smallest_of_every_four():
    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(32, 16, bias=False)  # ModelOpt's magnitude needs 8 | out, 16 | in
    # Distinct magnitudes in random order and signs in every group of 4.
    magnitudes = torch.stack([torch.randperm(4, generator=gen) + 1.0 for _ in range(16 * 8)])
    signs = torch.randint(0, 2, magnitudes.shape, generator=gen) * 2 - 1
    planted = (magnitudes * signs / 10).reshape(16, 32)
    with torch.no_grad():
        layer.weight.copy_(planted)
    model = torch.nn.Sequential(layer)
    report = sparsify(model, SparsifyConfig(method="magnitude"))
    assert type(model[0]) is torch.nn.Linear  # ModelOpt's sparse module is exported away
    expected = (magnitudes > 2).reshape(16, 32)  # the two largest of each group survive
    assert torch.equal(model[0].weight != 0, expected)
    assert torch.equal(model[0].weight[expected], planted[expected])  # kept weights untouched
    assert report["zero_fraction"] == 0.5 and report["sparsified_layers"] == 1


@pytest.fixture(scope="module")
def sparsified(tiny_llama):
    """The tiny Llama sparsified both ways, layers 0's MLP left dense: {method: (model, report)}."""
    out = {}
    batches = list(calibration.batches(tokens(tiny_llama), 4))
    for method in ("magnitude", "sparsegpt"):
        model = models.load_model(tiny_llama, "float32")
        config = SparsifyConfig(method=method, exclude=["*layers.0.mlp*"])
        out[method] = model, sparsify(model, config, batches)
    return out


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_every_targeted_linear_is_24_sparse_and_exclusions_stay_dense(method, sparsified):
    model, report = sparsified[method]
    modules = dict(model.named_modules())
    dense = {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"}
    dense |= {"model.layers.0.mlp.down_proj", "lm_head"}
    for name in decoder_linears():
        assert type(modules[name]) is torch.nn.Linear, name
        (assert_dense if name in dense else assert_24)(modules[name].weight, name)
    assert_dense(model.lm_head.weight, "lm_head")
    assert report["sparsified_layers"] == 14 - 3
    assert set(report["dense_layers"]) == dense
    assert report["zero_fraction"] == 0.5


def test_sparsegpt_chooses_other_zeros_than_magnitude(sparsified, tiny_llama):
    """The Hessian of the layer inputs changes the choice (else the data would not matter)."""
    (mag, _), (sgpt, _) = sparsified["magnitude"], sparsified["sparsegpt"]
    q_mag, q_sgpt = mag.model.layers[1].mlp.up_proj.weight, sgpt.model.layers[1].mlp.up_proj.weight
    differ = float(((q_mag == 0) != (q_sgpt == 0)).float().mean())
    assert differ > 0.05
    # ModelOpt 0.47's SparseGPT keeps the surviving weights as they were (mask only).
    original = models.load_model(tiny_llama, "float32")
    w0 = original.model.layers[1].mlp.up_proj.weight
    assert torch.equal(q_sgpt[q_sgpt != 0], w0[q_sgpt != 0])


def test_technique_refusals(tiny_llama):
    model = models.load_model(tiny_llama, "float32")
    with pytest.raises(OptimizerError, match="exclude '\\*layer.0\\*' matches no linear layer"):
        sparsify(model, SparsifyConfig(method="magnitude", exclude=["*layer.0*"]))
    with pytest.raises(OptimizerError, match="sparsegpt needs calibration batches"):
        sparsify(model, SparsifyConfig(method="sparsegpt"))
    with pytest.raises(OptimizerError, match="leaves no linear layer"):
        sparsify(model, SparsifyConfig(method="magnitude", exclude=["*"]))


def test_distillation_moves_the_weights_but_keeps_every_zero(sparsified, tiny_llama, tmp_path):
    """train() (KDTrainer here: the sparse student is not quantized) keeps the 2:4 masks."""
    import copy

    from optimizer.techniques.train import TrainingConfig, train
    from optimizer.training_data import TrainingData, build_splits, load_documents

    student = copy.deepcopy(sparsified["magnitude"][0])
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    data = TrainingData(dataset=str(CALIBRATION), max_eval_samples=4)
    docs = load_documents(data, Path("."))[:80]
    splits = build_splits(data, docs, models.load_tokenizer(tiny_llama), 64, seed=0)
    config = TrainingConfig(data=data, steps=2, learning_rate=1e-3, batch_size=4, seq_len=64)
    teacher = models.load_model(tiny_llama, "float32")
    m = train(student, config, splits, output_dir=tmp_path / "ckpt", teacher=teacher)
    assert m["trainer"] == "KDTrainer" and m["sparse_layers"] == 11
    for name in decoder_linears():
        key = f"{name}.weight"
        w = dict(student.named_parameters())[key]
        assert not torch.equal(w, before[key]), name  # it trained
        if not name.startswith("model.layers.0.mlp"):
            assert torch.equal(w == 0, before[key] == 0), name  # the same zeros, all kept


# ----------------------------------------------------------------- through the runner


def write_recipe(directory: Path, model: Path, stages: str, samples: int = 4) -> Path:
    recipe = directory / "recipe.yaml"
    recipe.write_text(
        f"name: tiny-sparse\nmodel: {{source: {model}}}\n"
        f"calibration: {{dataset: {CALIBRATION}, num_samples: {samples}, seq_len: 64}}\n"
        "stages:\n" + textwrap.indent(textwrap.dedent(stages), "  ")
    )
    return recipe


def run_cli(recipe: Path, run_dir: Path, *flags: str) -> int:
    return main(["run", str(recipe), "-o", str(run_dir), "-q", *flags])


def handover(rec: dict, i: int) -> dict[str, torch.Tensor]:
    return load_file(Path(rec["stages"][i]["outputs"]["model"]["path"]) / "model.safetensors")


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    """sparsify (magnitude) -> ptq fp8 -> qat -> export, uninterrupted."""
    d = tmp_path_factory.mktemp("sparse-trained")
    recipe = write_recipe(
        d,
        tiny_llama,
        f"""\
        - sparsify: {{method: magnitude, exclude: ['*layers.0.mlp*']}}
        - ptq: {{format: fp8}}
        - qat:
            data: {{dataset: {CALIBRATION}, max_eval_samples: 8}}
            steps: 3
            learning_rate: 1.0e-3
            batch_size: 4
            seq_len: 64
        - export: {{trtllm_checkpoint: {{tp: 1, pp: 1}}, hf_checkpoint: true}}
        """,
    )
    assert run_cli(recipe, d / "run") == 0
    return d / "run", json.loads((d / "run" / "run.json").read_text())


def test_the_zeros_survive_ptq_and_qat_while_the_weights_train(trained):
    run_dir, rec = trained
    assert [s["status"] for s in rec["stages"]] == ["success"] * 4
    assert rec["stages"][0]["metrics"]["sparsified_layers"] == 11
    assert rec["stages"][1]["metrics"]["sparse_layers"] == 11  # ptq checked them
    qat = rec["stages"][2]["metrics"]
    assert qat["trainer"] == "QATTrainer" and qat["sparse_layers"] == 11  # qat kept them
    assert qat["after"]["train_loss"] < qat["before"]["train_loss"]
    saves = [handover(rec, i) for i in range(3)]  # sparsify, ptq, qat
    for name in decoder_linears():
        key = f"{name}.weight"
        dense = name.startswith("model.layers.0.mlp")
        for stage, save in zip(("sparsify", "ptq", "qat"), saves, strict=True):
            (assert_dense if dense else assert_24)(save[key], f"{stage}: {name}")
        # Training moved the weights (so the test can fail) but not one zero.
        assert not torch.equal(saves[1][key], saves[2][key]), name
        if not dense:
            assert torch.equal(saves[0][key] == 0, saves[2][key] == 0), name


def test_the_quantized_handover_computes_with_24_weights(trained):
    """What later stages load: the fake-quantized FP8 weights are 2:4 too."""
    _, rec = trained
    model = models.load_model(Path(rec["stages"][2]["outputs"]["model"]["path"]), "float32")
    modules = dict(model.named_modules())
    for name in decoder_linears():
        m = modules[name]
        assert m.weight_quantizer.is_enabled, name
        if not name.startswith("model.layers.0.mlp"):
            assert_24(m.weight_quantizer(m.weight), name)


def test_exported_tensors_are_24_sparse_and_validator_clean(trained, capsys):
    run_dir, _ = trained
    trt = load_file(run_dir / "trtllm_checkpoint" / "rank0.safetensors")
    hf = load_file(run_dir / "hf_checkpoint" / "model.safetensors")
    assert trt["transformer.layers.1.attention.qkv.weight"].dtype == torch.float8_e4m3fn
    for i in range(2):
        for short in TRTLLM:
            check = assert_dense if i == 0 and short.startswith("mlp") else assert_24
            check(trt[f"transformer.layers.{i}.{short}.weight"], f"trt layer {i} {short}")
        for p in LINEARS:
            name = f"model.layers.{i}.{p}"
            assert hf[f"{name}.weight"].dtype == torch.float8_e4m3fn, name
            check = assert_dense if name.startswith("model.layers.0.mlp") else assert_24
            check(hf[f"{name}.weight"], f"hf {name}")
    assert not [k for k in (*trt, *hf) if "mask" in k]  # no ModelOpt sparse state leaks
    quant = json.loads((run_dir / "hf_checkpoint" / "hf_quant_config.json").read_text())
    assert quant["quantization"]["quant_algo"] == "FP8"
    assert check_checkpoint(run_dir / "trtllm_checkpoint") == []
    for artifact in ("trtllm_checkpoint", "hf_checkpoint"):
        assert main(["check", str(run_dir / artifact)]) == 0, artifact
    capsys.readouterr()


SPARSEGPT_INT4 = """\
- sparsify: {{method: sparsegpt, exclude: ['*layers.1.self_attn.o_proj']}}
- ptq: {{format: int4_awq, group_size: 64}}
- export: {{trtllm_checkpoint: {{tp: 1, pp: 1}}, hf_checkpoint: true}}
- build: {{launcher: local, trtllm_build: {double}, python: {double}, max_batch_size: 2,
    max_input_len: 32, max_seq_len: 64, max_num_tokens: 64, timeout_s: 60}}
"""


@pytest.fixture(scope="module")
def int4_run(tiny_llama, tmp_path_factory):
    """sparsify (sparsegpt) -> ptq int4_awq -> export -> build, uninterrupted."""
    d = tmp_path_factory.mktemp("sparse-int4")
    recipe = write_recipe(d, tiny_llama, SPARSEGPT_INT4.format(double=DOUBLE), samples=2)
    assert run_cli(recipe, d / "run") == 0
    return recipe, d / "run", json.loads((d / "run" / "run.json").read_text())


def test_sparsegpt_int4_awq_keeps_the_zeros_to_the_packed_exports_and_sparse_engines(int4_run):
    _, run_dir, rec = int4_run
    assert rec["stages"][0]["metrics"]["method"] == "sparsegpt"
    assert rec["stages"][1]["metrics"]["sparse_layers"] == 13
    dense = "model.layers.1.self_attn.o_proj"
    model = models.load_model(Path(rec["stages"][1]["outputs"]["model"]["path"]), "float32")
    modules = dict(model.named_modules())
    assert modules["model.layers.1.self_attn.q_proj"].input_quantizer.pre_quant_scale is not None
    for name in decoder_linears():  # AWQ scaled the channels; 0 stays 0 under any scale
        m = modules[name]
        (assert_dense if name == dense else assert_24)(m.weight_quantizer(m.weight), name)
    # Both checkpoints store INT4 two rows to a byte; a signed 0 is the zero nibble.
    hf = load_file(run_dir / "hf_checkpoint" / "model.safetensors")
    for name in decoder_linears():
        w = unpack_int4_rows(hf[f"{name}.weight"])
        (assert_dense if name == dense else assert_24)(w, name)
    trt = load_file(run_dir / "trtllm_checkpoint" / "rank0.safetensors")
    for i in range(2):
        for short in TRTLLM:
            w = unpack_int4_rows(trt[f"transformer.layers.{i}.{short}.weight"].view(torch.uint8))
            (assert_dense if (i, short) == (1, "attention.dense") else assert_24)(w, short)
    assert not [k for k in (*trt, *hf) if "mask" in k]
    assert check_checkpoint(run_dir / "trtllm_checkpoint") == []
    build = rec["stages"][3]["metrics"]
    assert build["weight_sparsity"] is True and "--weight_sparsity" in build["command"]


def test_killed_after_sparsify_resumes_without_redoing_it_to_identical_artifacts(
    int4_run, tmp_path
):
    recipe, reference, ref = int4_run
    run_dir = tmp_path / "killed"
    proc = run_killed_at(recipe, run_dir, "optimizer.stages.ptq:PTQ")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    killed = json.loads((run_dir / "run.json").read_text())
    assert [s["status"] for s in killed["stages"]] == ["success", "running", "pending", "pending"]
    sparse_save = killed["stages"][0]["outputs"]["model"]

    assert run_cli(recipe, run_dir, "--resume") == 0
    rec = json.loads((run_dir / "run.json").read_text())
    assert [s["status"] for s in rec["stages"]] == ["skipped", "success", "success", "success"]
    assert rec["stages"][0]["outputs"]["model"] == sparse_save
    log = (run_dir / "logs" / "run.log").read_text()
    assert "sparsify: skipped (finished earlier with the same inputs)" in log
    for key in ("trtllm_checkpoint", "hf_checkpoint"):
        ours, theirs = rec["stages"][2]["outputs"][key], ref["stages"][2]["outputs"][key]
        assert ours["sha256"] == theirs["sha256"], key


# ----------------------------------------------------------------- bad input

SPARSIFY = "  - sparsify: {{method: magnitude}}\n"


@pytest.fixture
def bad_recipe(write_recipe, tmp_path):
    return lambda stages: write_recipe(HEAD + stages, name="bad.yaml")


def test_a_sparse_model_is_not_trained_with_fsdp(bad_recipe, capsys):
    path = bad_recipe(SPARSIFY + "  - distill: {{fsdp: true}}\n")
    assert main(["validate", str(path), "--device", "gpu"]) == 2  # (on a GPU machine)
    assert_one_clear_error(
        capsys.readouterr().err,
        "distill.fsdp: the model is 2:4 sparse: training it with fsdp: true cannot keep",
    )


def test_sparsegpt_needs_calibration_and_magnitude_does_not(tiny_llama, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    for method, rc in (("sparsegpt", 2), ("magnitude", 0)):
        path.write_text(
            f"name: s\nmodel: {{source: {tiny_llama}}}\nstages:\n  - sparsify: {{method: {method}}}\n"
            "  - export: {trtllm_checkpoint: null, hf_checkpoint: true}\n"
        )
        assert main(["validate", str(path)]) == rc, method
    err = capsys.readouterr().err
    assert_one_clear_error(err, "stages[0].sparsify: 'sparsify' needs calibration data")


def test_the_shipped_recipe_validates(builtin_cache, capsys):
    assert main(["validate", "builtin-sparsify-distill-fp8"]) == 0
    assert "sparsify -> distill -> ptq -> export -> gate" in capsys.readouterr().out
