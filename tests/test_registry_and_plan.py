"""One registry type (lazy entries, duplicates, did-you-mean); validation threads a ModelPlan;
a new stage is one module, found by name, with no edit elsewhere; rank-aware run directory."""

import json
import sys

import pytest
from tiny import CALIBRATION

from optimizer.errors import OptimizerError, RecipeError
from optimizer.plan import ModelPlan
from optimizer.recipe import load_recipe
from optimizer.registry import Registry, UnknownName
from optimizer.run_record import RunRecord
from optimizer.rundir import RunDirectory
from optimizer.stages import STAGES, stage_class, stage_modules


def test_registry_is_lazy_refuses_duplicates_and_suggests():
    reg = Registry("widget", {"json": "json:dumps", "now": "datetime:datetime.now"})
    assert reg.names() == ["json", "now"] and "json" in reg
    assert reg.get("json")({"a": 1}) == '{"a": 1}'
    with pytest.raises(ValueError, match="widget 'json' is registered twice"):
        reg.add("json", "json:loads")
    with pytest.raises(UnknownName) as e:
        reg.get("jsno")
    assert isinstance(e.value, OptimizerError)
    assert str(e.value) == "unknown widget 'jsno'; did you mean 'json'? (known: json, now)"


def test_listing_stage_types_imports_no_stage_module():
    import subprocess

    code = (
        "import sys; from optimizer.stages import STAGES; names = STAGES.names(); "
        "print(names, [m for m in sys.modules if m.startswith('optimizer.stages.')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    names, loaded = out.stdout.strip().split("] [")
    assert "'ptq'" in names and "'gate'" in names and "'build'" in names
    assert loaded.rstrip("]") == "'optimizer.stages.base'"


def recipe_text(stages):
    return (
        f"name: p\nmodel: {{source: 'builtin:smollm2-135m-instruct'}}\n"
        f"calibration: {{dataset: {CALIBRATION}}}\nstages:\n"
        + "".join(f"  - {s}\n" for s in stages)
    )


def test_each_stage_is_validated_against_the_plan_of_the_stages_before_it(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(["ptq: {format: fp8, kv_cache: fp8}", "export: {}"]))
    recipe = load_recipe(path, device="cpu")
    before_ptq, before_export, after = recipe.plans
    assert before_ptq.quantization is None and before_ptq.dims.hidden_size == 576
    assert before_export.quantization.trtllm_algo == "FP8"
    assert before_export.quantization.trtllm_kv_algo == "FP8"
    assert after.exports.trtllm_checkpoint.world_size == 1 and before_export.exports is None
    twice = ["ptq: {format: fp8}", "auto_quantize: {formats: [fp8], effective_bits: 8}"]
    path.write_text(recipe_text(twice))
    with pytest.raises(RecipeError) as e:
        load_recipe(path, device="cpu")
    (problem,) = e.value.problems
    assert problem.path == "stages[1].auto_quantize"
    assert "already quantized by an earlier stage (format fp8)" in problem.message


PLUGIN = '''
from optimizer.stages.base import Stage, StageResult


class Sparsify24(Stage):
    """A stand-in technique stage written only for this test: it marks the model 2:4 sparse
    in the plan (validation) and does nothing to the weights (run)."""

    name = "sparsify24"
    transforms_model = True

    def plan(self, prev, env):
        plan, problems = super().plan(prev, env)
        return plan.but(sparsity="2:4"), problems

    def run(self, ctx):
        ctx.model()
        return StageResult(metrics={"pattern": "2:4"})
'''


def test_a_new_stage_is_one_module_and_later_stages_see_its_plan(
    tmp_path, monkeypatch, tiny_llama, capsys
):
    package = tmp_path / "plugin_stages"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "sparsify24.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry(
        "stage type",
        {**{n: f"optimizer.stages.{n}" for n in STAGES.names()}},
        discover=lambda: stage_modules("plugin_stages", package),
        loader=stage_class,
    )
    monkeypatch.setattr("optimizer.recipe.STAGES", registry)
    build = (
        "build: {max_batch_size: 1, max_input_len: 8, max_seq_len: 16, max_num_tokens: 16, "
        "weight_sparsity: true}"
    )
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(["ptq: {format: fp8}", "export: {}", build]))
    with pytest.raises(RecipeError, match="no earlier stage makes the model 2:4 sparse"):
        load_recipe(path, device="gpu")
    path.write_text(recipe_text(["sparsify24: {}", "ptq: {format: fp8}", "export: {}", build]))
    recipe = load_recipe(path, device="gpu")
    assert [p.sparsity for p in recipe.plans] == [None, "2:4", "2:4", "2:4", "2:4"]
    assert type(recipe.stages[0]).__module__ == "plugin_stages.sparsify24"

    # The runner, --dry-run and run.json take it as it is: no edit elsewhere.
    from optimizer.cli import main

    path.write_text(
        f"name: plug\nmodel: {{source: {tiny_llama}}}\nstages:\n  - sparsify24: {{}}\n"
        "  - export: {trtllm_checkpoint: null, hf_checkpoint: true}\n"
    )
    assert main(["run", str(path), "-o", str(tmp_path / "run"), "--dry-run"]) == 0
    assert "# [1/2] sparsify24()" in capsys.readouterr().out
    assert main(["run", str(path), "-o", str(tmp_path / "run"), "-q"]) == 0
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    first = record["stages"][0]
    assert (first["name"], first["status"], first["metrics"]) == (
        "sparsify24",
        "success",
        {"pattern": "2:4"},
    )
    assert (tmp_path / "run" / "stages" / "00-sparsify24" / "model" / "config.json").is_file()
    assert record["artifacts"]["hf_checkpoint"] == str(tmp_path / "run" / "hf_checkpoint")


def test_other_ranks_read_the_run_directory_and_never_write_it(tmp_path):
    rank0, rank1 = RunDirectory(tmp_path / "run", rank=0), RunDirectory(tmp_path / "run", rank=1)
    rank0.lock()
    try:
        rank1.lock()  # no second lock holder: ranks of one job share the directory
        record = RunRecord(name="x")
        rank1.write(record)
        assert not rank1.run_json.exists()
        rank0.write(record)
        assert rank1.read().name == "x"
        tmp = rank1.temp_output(0, "model")
        assert tmp.name == ".tmp-00-model-rank1"
        (tmp / "w").write_text("rank 1")
        rank1.commit(tmp, rank1.path / "model")
        assert not tmp.exists() and not (rank1.path / "model").exists()
    finally:
        rank0.unlock()


def test_run_json_of_version_1_still_reads_and_unknown_versions_are_refused(tmp_path):
    d = RunDirectory(tmp_path)
    v1 = {"schema_version": 1, "name": "old", "status": "success", "stages": []}
    d.run_json.write_text(json.dumps({**v1, "stages": [{"index": 0, "name": "ptq"}]}))
    assert d.read().stages[0].status == "pending"
    d.run_json.write_text(json.dumps({**v1, "schema_version": 99}))
    with pytest.raises(OptimizerError, match="schema_version 99"):
        d.read()


def test_plan_of_an_unknown_model_defers_dimension_checks():
    assert ModelPlan.of_source(None).config is None
    dims = ModelPlan.of_source({"hidden_size": 64, "num_attention_heads": 4}).dims
    assert dims.as_config() == {"hidden_size": 64, "num_attention_heads": 4}


def test_an_output_path_that_is_a_file_is_bad_input(tmp_path, write_recipe, capsys):
    from optimizer.cli import main

    target = tmp_path / "taken"
    target.write_text("not a run directory")
    assert main(["run", str(write_recipe()), "-o", str(target), "-q"]) == 2
    assert "is a file, not a run directory" in capsys.readouterr().err
    assert target.read_text() == "not a run directory"


@pytest.mark.parametrize(
    ("config", "scales"),
    [
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, True),  # transformers 4
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}}, True),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, False),
        (
            {  # Gemma 3: one per attention type
                "rope_parameters": {
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                    "full_attention": {"rope_type": "linear", "factor": 8.0},
                }
            },
            True,
        ),
        ({"rope_parameters": {"sliding_attention": {"rope_type": "default"}}}, False),
        ({}, False),
    ],
)
def test_rope_scaling_is_read_from_either_transformers_generation(config, scales):
    from optimizer.plan import ModelDims

    assert ModelDims.from_config({"model_type": "llama", **config}).rope_scaling is scales
