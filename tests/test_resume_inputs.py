"""--resume redoes exactly the stages whose declared inputs changed (and the stages that build
on them), and nothing else: a gate suite's threshold, the calibration data file."""

import json
import shutil

import pytest
from tiny import CALIBRATION

from optimizer.cli import main


def read_run(run_dir):
    return json.loads((run_dir / "run.json").read_text())


def statuses(run_dir):
    return {s["name"]: s["status"] for s in read_run(run_dir)["stages"]}


@pytest.fixture
def gated_run(tmp_path, tiny_llama, monkeypatch):
    """A finished ptq -> export -> gate run on the tiny Llama, with its own suite and data."""
    monkeypatch.setenv("OPTIMIZER_CACHE_DIR", str(tmp_path / "cache"))
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: tiny\nlimit: 10\ntasks:\n  - {task: local_arc_easy, metric: acc}\n"
        "thresholds:\n  default: {max_drop: 0.5}\n"
    )
    data = tmp_path / "calib.jsonl"
    shutil.copy(CALIBRATION, data)
    recipe, run_dir = run_gated(tmp_path, tiny_llama, data.name)
    return recipe, run_dir, suite, data


def run_gated(tmp_path, model, calibration):
    """Write and run ptq -> export -> gate (suite.yaml beside the recipe) into tmp_path/run."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: tiny\nmodel: {{source: {model}}}\n"
        f"calibration: {{dataset: {calibration}, num_samples: 4, seq_len: 32, batch_size: 4}}\n"
        "stages:\n  - ptq: {format: fp8}\n  - export: {}\n  - gate: {suite: suite.yaml}\n"
    )
    run_dir = tmp_path / "run"
    assert main(["run", str(recipe), "-o", str(run_dir), "-q"]) == 0
    return recipe, run_dir


def resume(recipe, run_dir):
    return main(["run", str(recipe), "-o", str(run_dir), "-q", "--resume"])


def test_unchanged_inputs_redo_nothing(gated_run):
    recipe, run_dir, _, _ = gated_run
    before = read_run(run_dir)["stages"]
    assert resume(recipe, run_dir) == 0
    after = read_run(run_dir)["stages"]
    assert [s["status"] for s in after] == ["skipped"] * 3
    assert [s["fingerprint"] for s in after] == [s["fingerprint"] for s in before]
    assert set(after[2]["inputs"]) == {"suite", "tasks", "task_data", "lm-eval"}
    assert set(after[0]["inputs"]) == {"calibration_data"}


def test_editing_a_suite_threshold_redoes_only_the_gate(gated_run):
    recipe, run_dir, suite, _ = gated_run
    before = read_run(run_dir)["stages"]
    suite.write_text(suite.read_text().replace("max_drop: 0.5", "max_drop: 0.4"))
    assert resume(recipe, run_dir) == 0
    after = read_run(run_dir)["stages"]
    assert statuses(run_dir) == {"ptq": "skipped", "export": "skipped", "gate": "success"}
    assert after[2]["inputs"]["suite"] != before[2]["inputs"]["suite"]
    assert after[2]["inputs"]["tasks"] == before[2]["inputs"]["tasks"]
    gate = json.loads((run_dir / "report" / "gate.json").read_text())
    assert gate["metrics"][0]["threshold"] == {"max_drop": 0.4}  # the new verdict, not the old


def test_editing_the_calibration_data_redoes_the_quantization_and_what_follows(gated_run):
    recipe, run_dir, _, data = gated_run
    before = read_run(run_dir)["stages"]
    lines = data.read_text().splitlines()
    data.write_text("\n".join(reversed(lines)) + "\n")  # same records, other order: new windows
    assert resume(recipe, run_dir) == 0
    after = read_run(run_dir)["stages"]
    assert [s["status"] for s in after] == ["success"] * 3
    assert after[0]["inputs"]["calibration_data"] != before[0]["inputs"]["calibration_data"]
    # export and gate read the re-quantized model: their fingerprints follow ptq's
    assert all(a["fingerprint"] != b["fingerprint"] for a, b in zip(after, before, strict=True))
    assert after[2]["inputs"] == before[2]["inputs"]


MY_TASK = """\
task: my_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


def test_editing_a_task_file_of_the_suite_redoes_only_the_gate(tmp_path, tiny_llama, monkeypatch):
    """A suite may bring its own lm-eval tasks (``tasks_dir``); they are gate inputs."""
    monkeypatch.setenv("OPTIMIZER_CACHE_DIR", str(tmp_path / "cache"))
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    docs = [
        {"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1)], "label": 0}
        for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (9, 9)]
    ]
    data = tasks / "sums.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "my_mc.yaml").write_text(MY_TASK.format(data=data))
    (tmp_path / "suite.yaml").write_text(
        "name: mine\ntasks_dir: my_tasks\ntasks:\n  - {task: my_mc, metric: acc}\n"
        "thresholds:\n  default: {max_drop: 1.0}\n"
    )
    recipe, run_dir = run_gated(tmp_path, tiny_llama, CALIBRATION)
    before = read_run(run_dir)["stages"]
    assert before[2]["metrics"]["my_mc/acc"]["baseline"] is not None  # the task really ran
    gate = json.loads((run_dir / "report" / "gate.json").read_text())
    assert gate["metrics"][0]["n"] == len(docs)
    task_file = tasks / "my_mc.yaml"
    task_file.write_text(task_file.read_text().replace("Question: ", "Q: "))
    assert resume(recipe, run_dir) == 0
    after = read_run(run_dir)["stages"]
    assert statuses(run_dir) == {"ptq": "skipped", "export": "skipped", "gate": "success"}
    assert after[2]["inputs"]["suite_tasks"] != before[2]["inputs"]["suite_tasks"]
    assert after[2]["metrics"]["baseline_cached"] is False  # other prompts: not the old scores


def test_bytecode_caches_are_not_content(tmp_path):
    """lm-eval imports task helpers (loader.py), writing __pycache__ unless
    PYTHONDONTWRITEBYTECODE is set: that must not make --resume redo the gate."""
    from optimizer.inputs import dir_input

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "loader.py").write_text("X = 1\n")
    before = dir_input("tasks", tasks).digest()
    (tasks / "__pycache__").mkdir()
    (tasks / "__pycache__" / "loader.cpython-311.pyc").write_bytes(b"\x00bytecode")
    assert dir_input("tasks", tasks).digest() == before
    (tasks / "loader.py").write_text("X = 2\n")
    assert dir_input("tasks", tasks).digest() != before


def test_a_stage_redone_for_a_damaged_output_redoes_what_builds_on_a_changed_result(gated_run):
    recipe, run_dir, _, _ = gated_run
    before = read_run(run_dir)["stages"]
    shutil.rmtree(run_dir / "stages" / "00-ptq" / "model")
    assert resume(recipe, run_dir) == 0
    after = read_run(run_dir)["stages"]
    assert after[0]["status"] == "success"  # its recorded output was gone
    same_model = after[0]["outputs"]["model"]["sha256"] == before[0]["outputs"]["model"]["sha256"]
    # export reads the model: reused only if the redone ptq committed the very same bytes
    assert (after[1]["status"] == "skipped") == same_model
    assert (after[1]["fingerprint"] == before[1]["fingerprint"]) == same_model
