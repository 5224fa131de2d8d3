"""Shipped resources (optimizer/resources): paths, names, and the path-first/name-fallback rule
for recipes, gate suites and calibration sets."""

import subprocess
import sys

import pytest
from tiny import CALIBRATION, REPO

from optimizer import resources
from optimizer.errors import OptimizerError
from optimizer.recipe import load_recipe


def test_the_resources_are_real_files_inside_the_package():
    assert resources.ROOT == REPO / "optimizer" / "resources"
    assert resources.names("recipe")[-1] == "quickstart" and "llama3-fp8" in resources.names(
        "recipe"
    )
    assert resources.names("suite") == ["general", "quick", "served"]
    assert resources.names("calibration set") == ["python-docs"]
    assert resources.calibration_set("python-docs") == CALIBRATION
    assert (resources.TASKS / "local_arc_easy.yaml").is_file()
    assert (resources.TASKS / "loader.py").is_file() and (resources.TASKS / "utils.py").is_file()
    # task_fingerprint and loader.py both rely on data/ being the tasks' sibling
    assert resources.TASKS.parent / "data" == resources.EVAL_DATA
    assert (resources.EVAL_DATA / "arc_easy.jsonl").is_file()
    for readme in (resources.EVALS / "README.md", resources.CALIBRATION / "README.md"):
        assert "icen" in readme.read_text()  # provenance and licences ship with the data


def test_evaluation_uses_the_shipped_tasks():
    from optimizer.evaluation import LOCAL_TASKS

    assert LOCAL_TASKS == resources.TASKS


def test_importing_resources_imports_no_heavy_library():
    code = (
        "import sys, optimizer.resources as r; r.names('recipe'); "
        "print(sorted(m for m in ('torch', 'pydantic', 'yaml', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "ref,name",
    [
        ("quick", True),
        ("python-docs", True),
        ("builtin-nvfp4", True),
        ("quick.yaml", False),
        ("python-docs.jsonl", False),
        ("./quick", False),
        ("~/quick", False),
        ("suites/quick", False),
        ("", False),
    ],
)
def test_what_counts_as_a_name(ref, name):
    assert resources.is_name(ref) is name


def test_an_unknown_name_lists_the_shipped_ones_with_a_did_you_mean():
    with pytest.raises(OptimizerError) as exc:
        resources.suite("quik")
    assert str(exc.value) == (
        "'quik' is neither a file nor a shipped suite; did you mean 'quick'? "
        "(shipped suites: general, quick, served)"
    )
    assert resources.find("suite", "quick.yaml") is None  # a path is never looked up by name


def test_a_recipe_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nowhere near the checkout
    recipe = load_recipe("quickstart", device="cpu")
    assert recipe.name == "quickstart" and recipe.base_dir == resources.RECIPES
    gate = recipe.stages[-1]
    assert gate.suite == "quick" and gate.suite_path(recipe.base_dir) == resources.suite("quick")
    assert recipe.calibration.dataset == "python-docs"


def test_an_unknown_recipe_name_and_an_old_path_say_what_to_type(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OptimizerError, match="did you mean 'quickstart'"):
        load_recipe("quickstrat")
    with pytest.raises(OptimizerError) as exc:
        load_recipe("recipes/quickstart.yaml")
    assert str(exc.value) == (
        "recipe file not found: recipes/quickstart.yaml; the shipped recipe 'quickstart' is "
        "addressed by its name: optimize run quickstart"
    )


def test_a_file_wins_over_a_shipped_name(tmp_path, monkeypatch, write_recipe):
    """A local file of that name is used; names are only the fallback."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").write_text(write_recipe().read_text())
    assert load_recipe("quickstart").name == "tiny-fp8"


def test_a_copied_shipped_recipe_still_works(tmp_path):
    copy = tmp_path / "mine.yaml"
    copy.write_text(resources.recipe("quickstart").read_text())
    recipe = load_recipe(copy, device="cpu")
    assert recipe.stages[-1].suite_path(recipe.base_dir) == resources.suite("quick")


def test_suite_paths_resolve_as_before_and_names_fall_back(tmp_path, monkeypatch):
    from optimizer.stages.gate import Gate

    mine = tmp_path / "quick"  # a file called like a shipped suite: the file wins
    mine.write_text("name: mine\ntasks: [{task: local_arc_easy}]\n")
    assert Gate(suite="quick").suite_path(tmp_path) == mine
    assert Gate(suite=str(mine)).suite_path(REPO) == mine
    monkeypatch.chdir(tmp_path)
    assert Gate(suite="quick").suite_path(REPO) == mine.resolve()  # then the cwd
    monkeypatch.chdir(REPO)
    assert Gate(suite="quick").suite_path(tmp_path / "elsewhere") == resources.suite("quick")
    missing = Gate(suite="nowhere/quick.yaml").suite_path(tmp_path)  # a path stays a path
    assert missing == (REPO / "nowhere" / "quick.yaml")
    with pytest.raises(OptimizerError, match="did you mean 'general'"):
        Gate(suite="generl").suite_path(tmp_path)


def test_an_unknown_suite_name_is_a_validation_problem(write_recipe):
    path = write_recipe(
        "name: s\nmodel: {{source: {model}}}\nstages:\n  - gate: {{suite: quik}}\n", name="s.yaml"
    )
    from optimizer.errors import RecipeError

    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    (problem,) = exc.value.problems
    assert problem.path == "stages[0].gate.suite" and "did you mean 'quick'" in problem.message


def test_calibration_by_name_file_or_hub(tmp_path, monkeypatch):
    from optimizer import calibration
    from optimizer.recipe import CalibrationSpec

    monkeypatch.chdir(tmp_path)
    assert calibration.resolve_local("python-docs", tmp_path) == CALIBRATION
    # the same identity (file content) as the path form, so resumed runs are not redone
    assert calibration.as_input(CalibrationSpec(dataset="python-docs"), tmp_path).digest() == (
        calibration.as_input(CalibrationSpec(dataset=str(CALIBRATION)), tmp_path).digest()
    )
    (tmp_path / "python-docs").write_text("my own text\n")  # a local file wins
    assert calibration.resolve_local("python-docs", tmp_path) == tmp_path / "python-docs"
    assert calibration.resolve_local("wikitext", tmp_path) is None  # a hub dataset, as before
    assert calibration.check_dataset(CalibrationSpec(dataset="wikitext"), tmp_path) is None
    missing = calibration.check_dataset(CalibrationSpec(dataset="calib.jsonl"), tmp_path)
    assert missing.startswith("calibration file not found: calib.jsonl")
    assert missing.endswith("shipped calibration sets by name: python-docs)")


def test_an_unreachable_hub_dataset_suggests_the_shipped_set(monkeypatch):
    from optimizer import calibration, models
    from optimizer.recipe import CalibrationSpec

    monkeypatch.setattr(models, "hub_unreachable_reason", lambda: "HF_HUB_OFFLINE=1")
    with pytest.raises(OptimizerError, match="did you mean 'python-docs'"):
        calibration.load_texts(CalibrationSpec(dataset="python-doc"), REPO)


def test_optimize_gate_takes_a_shipped_suite_by_name(tmp_path, monkeypatch, capsys):
    import optimizer.evaluation as evaluation
    from optimizer.cli import main

    seen = {}

    def stop_before_candidate(target, *args, **kwargs):  # the suite is resolved by then
        raise OptimizerError("candidate stopped by the test")

    real_load = evaluation.load_suite

    def spy_load(path):
        seen["suite"] = path
        return real_load(path)

    monkeypatch.setattr(evaluation, "make_candidate", stop_before_candidate)
    monkeypatch.setattr(evaluation, "load_suite", spy_load)
    monkeypatch.chdir(tmp_path)
    args = ["gate", "--baseline", "builtin:smollm2-135m-instruct", "--candidate", str(tmp_path)]
    assert main([*args, "--suite", "quick", "-o", "g"]) == 2
    assert seen["suite"] == resources.suite("quick")
    own = tmp_path / "own.yaml"
    own.write_text(resources.suite("quick").read_text())
    assert main([*args, "--suite", "own.yaml", "-o", "g"]) == 2
    assert seen["suite"] == own  # a file wins over a name
    capsys.readouterr()
    assert main([*args, "--suite", "quik", "-o", "g"]) == 2
    assert "did you mean 'quick'" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()  # bad input writes nothing
