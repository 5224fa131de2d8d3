"""Recipe schema, YAML line numbers, --set overrides, stage ordering, file checks."""

import pytest
from tiny import TINY_PTQ_RESOLVED

from optimizer.errors import OptimizerError, RecipeError
from optimizer.recipe import load_recipe
from optimizer.stages.export import Export
from optimizer.stages.ptq import PTQ


def problems_of(path, overrides=None) -> list[str]:
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, overrides)
    return [str(p) for p in exc.value.problems]


def test_valid_recipe_resolves_defaults(write_recipe, tiny_llama):
    recipe = load_recipe(write_recipe())
    assert recipe.name == "tiny-fp8"
    assert [type(s) for s in recipe.stages] == [PTQ, Export]
    assert recipe.stages[0].kv_cache == "none"  # default filled in
    resolved = recipe.resolved()
    assert resolved["stages"][0] == TINY_PTQ_RESOLVED
    assert resolved["calibration"]["seed"] == 0
    assert len(recipe.sha256()) == 64


def test_misspelt_key_names_file_line_path_and_suggestion(write_recipe):
    text = write_recipe().read_text().replace("      format: fp8", "      formt: fp8")
    bad = write_recipe(text, name="bad.yaml", raw=True)
    line = next(i for i, t in enumerate(bad.read_text().splitlines(), 1) if "formt" in t)
    assert problems_of(bad) == [
        f"{bad}:{line}: stages[0].ptq.formt: unknown key 'formt'; did you mean 'format'?"
    ]


def test_every_problem_is_reported_at_once(write_recipe):
    bad = write_recipe(
        """\
name: bad
model:
  source: {model}
  dtpye: bfloat16
calibraton:
  dataset: {calib}
stages:
  - ptqq: {{format: fp8}}
  - export:
      trtllm_checkpoint: {{tp: 0}}
""",
        name="bad.yaml",
    )
    found = problems_of(bad)
    assert f"{bad}:4: model.dtpye: unknown key 'dtpye'; did you mean 'dtype'?" in found
    assert f"{bad}:5: calibraton: unknown key 'calibraton'; did you mean 'calibration'?" in found
    assert any(
        p.startswith(f"{bad}:8: stages[0].ptqq: unknown stage type 'ptqq'; did you mean 'ptq'?")
        for p in found
    )
    assert any(
        p.startswith(f"{bad}:10: stages[1].export.trtllm_checkpoint.tp:")
        and "greater than or equal to 1" in p
        for p in found
    )
    assert len(found) == 4


def test_bad_enum_value_lists_choices(write_recipe):
    found = problems_of(write_recipe(), ["stages.ptq.format=fp9"])
    assert found == [
        "--set stages.ptq.format=fp9: stages[0].ptq.format: must be one of: 'fp8', 'fp8_pc_pt', "
        "'int8_sq', 'int8_wo', 'int4_awq', 'w4a8_awq', 'nvfp4', 'nvfp4_awq', 'w4a16_nvfp4', not 'fp9'; "
        "did you mean 'fp8'?"
    ]


def test_duplicate_key_is_an_error(write_recipe):
    bad = write_recipe(
        write_recipe()
        .read_text()
        .replace("  dtype: bfloat16", "  dtype: bfloat16\n  dtype: float16"),
        name="dup.yaml",
        raw=True,
    )
    found = problems_of(bad)
    assert found == [
        f"{bad}:5: model.dtype: duplicate key (YAML would silently keep only the last one)"
    ]


def test_invalid_yaml_points_at_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: x\nmodel: [unclosed\nstages: []\n")
    (problem,) = problems_of(bad)
    assert problem.startswith(f"{bad}:3: not valid YAML")


def test_set_overrides_values_by_stage_name_and_index(write_recipe):
    recipe = load_recipe(
        write_recipe(),
        [
            "calibration.num_samples=4",
            "stages.ptq.kv_cache=fp8",
            "stages.1.export.hf_checkpoint=false",
            "model.dtype=float16",
        ],
    )
    assert recipe.calibration.num_samples == 4
    assert recipe.stages[0].kv_cache == "fp8"
    assert recipe.stages[1].hf_checkpoint is False
    assert recipe.model.dtype == "float16"


def test_set_rejects_malformed_assignments(write_recipe):
    with pytest.raises(OptimizerError, match="expected KEY=VALUE"):
        load_recipe(write_recipe(), ["calibration.num_samples"])
    with pytest.raises(OptimizerError, match="no list element 'gate'"):
        load_recipe(write_recipe(), ["stages.gate.suite=x"])
    found = problems_of(write_recipe(), ["calibration.num_sample=4"])
    assert found == [
        "--set calibration.num_sample=4: calibration.num_sample: unknown key 'num_sample'; did you mean 'num_samples'?"
    ]


def test_ordering_rules_are_checked_before_loading(write_recipe):
    bad = write_recipe(
        """\
name: order
model: {{source: {model}}}
calibration: {{dataset: {calib}}}
stages:
  - export: {{}}
  - ptq: {{format: fp8}}
  - ptq: {{format: fp8}}
""",
        name="order.yaml",
    )
    found = problems_of(bad)
    assert any(":6: stages[1].ptq: 'ptq' comes after 'export'" in p for p in found)
    assert any(
        ":7: stages[2].ptq: the model is already quantized by an earlier stage" in p for p in found
    )


def test_ptq_without_calibration_is_refused(write_recipe):
    bad = write_recipe(
        "name: x\nmodel: {{source: {model}}}\nstages:\n  - ptq: {{format: fp8}}\n",
        name="nocal.yaml",
    )
    (problem,) = problems_of(bad)
    assert ":4: stages[0].ptq: 'ptq' needs calibration data" in problem


def test_export_of_nothing_is_refused(write_recipe):
    bad = write_recipe(
        "name: x\nmodel: {{source: {model}}}\nstages:\n  - export: {{trtllm_checkpoint: null}}\n",
        name="x.yaml",
    )
    (problem,) = problems_of(bad)
    assert "exports nothing" in problem


def test_missing_files_are_found_at_validation(write_recipe, tmp_path):
    bad = write_recipe(
        """\
name: files
model: {{source: {missing}/model}}
calibration: {{dataset: nowhere/calib.jsonl}}
stages:
  - ptq: {{format: fp8}}
""",
        name="files.yaml",
        missing=tmp_path / "absent",
    )
    found = problems_of(bad)
    assert any(
        ":2: model.source: " in p and "neither an existing local directory" in p for p in found
    )
    assert any(
        ":3: calibration.dataset: calibration file not found: nowhere/calib.jsonl" in p
        for p in found
    )


def test_relative_paths_resolve_against_the_recipe(tmp_path, tiny_llama):
    from tiny import CALIBRATION

    sub = tmp_path / "recipes"
    sub.mkdir()
    (tmp_path / "calib.jsonl").write_text(CALIBRATION.read_text())
    recipe_path = sub / "r.yaml"
    recipe_path.write_text(
        f"name: rel\nmodel: {{source: {tiny_llama}}}\ncalibration: {{dataset: ../calib.jsonl}}\nstages:\n  - ptq: {{format: fp8}}\n"
    )
    recipe = load_recipe(recipe_path)
    assert recipe.base_dir == sub


@pytest.mark.parametrize(
    "source,ok",
    [
        ("builtin:smollm2-135m-instruct", True),
        ("builtin:gpt5", False),
        ("meta-llama/Meta-Llama-3-8B-Instruct", True),
        ("not a model", False),
    ],
)
def test_model_source_forms(write_recipe, source, ok):
    path = write_recipe(
        "name: s\nmodel: {{source: '{source}'}}\nstages:\n  - export: {{}}\n",
        name="s.yaml",
        source=source,
    )
    if ok:
        assert load_recipe(path).model.source == source
    else:
        assert problems_of(path)[0].split(": ", 2)[1] == "model.source"


def test_shipped_recipes_validate():
    """Every recipe validates here (no downloads); GPU recipes validate for a GPU machine and
    are refused for this CPU-only one with a clear message."""
    from optimizer import resources

    for path in sorted(resources.RECIPES.glob("*.yaml")):
        try:
            assert load_recipe(path, device="cpu").stages, path
        except RecipeError as e:
            assert all("needs a CUDA GPU" in p.message for p in e.problems), e
            assert load_recipe(path, device="gpu").stages


LLAMA3_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 32,
    "vocab_size": 128256,
}


def test_llama3_config_is_checked_once_it_is_in_the_hub_cache(tmp_path, monkeypatch):
    """With the hub cache holding config.json, TP and group sizes are checked against it."""
    import json

    recipe = "llama3-int4-awq"  # the shipped recipe, by name
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert load_recipe(
        recipe, ["stages.export.trtllm_checkpoint.tp=3"], device="cpu"
    )  # config unknown
    repo = tmp_path / "models--meta-llama--Meta-Llama-3-8B-Instruct"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text(json.dumps(LLAMA3_CONFIG))
    with pytest.raises(RecipeError) as exc:
        load_recipe(recipe, ["stages.export.trtllm_checkpoint.tp=3"], device="cpu")
    assert "tp=3 does not divide the model's 32 attention heads" in str(exc.value)
    with pytest.raises(RecipeError, match="tp=16 does not divide the model's 8 KV heads"):
        load_recipe(recipe, ["stages.export.trtllm_checkpoint.tp=16"], device="cpu")
    assert load_recipe(recipe, ["stages.export.trtllm_checkpoint.tp=2"], device="cpu")
