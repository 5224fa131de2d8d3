"""Sweeps: grid expansion, bad grids (exit 2, nothing written), the baseline evaluated once
for all variants, resume keeping finished variants, the Pareto front on known points, and
the trade-off report with the front marked."""

import json
import re

import pytest
from tiny import CALIBRATION

from optimizer.cli import main
from optimizer.errors import OptimizerError
from optimizer.sweep import Axis, expand, parse_axis, split_values
from optimizer.tradeoff import Column, dominates, pareto_front, write_tradeoff_report

RECIPE = """\
name: tiny-sweep
model: {{source: {model}}}
calibration: {{dataset: {calib}, num_samples: 2, seq_len: 32, batch_size: 8}}
stages:
  - ptq: {{format: fp8}}
  - export: {{trtllm_checkpoint: null, hf_checkpoint: true}}
  - gate: {{suite: {suite}}}
"""

SUITE = """\
name: tiny
limit: 10
tasks:
  - {{task: local_arc_easy, metric: acc}}
thresholds:
  default: {threshold}
"""


@pytest.fixture
def sweep_recipe(tmp_path, tiny_llama, monkeypatch):
    """A recipe (ptq -> export -> gate on 10 ARC-Easy documents) with a private baseline
    cache; ``threshold`` sets the suite's default threshold."""
    monkeypatch.setenv("OPTIMIZER_CACHE_DIR", str(tmp_path / "cache"))

    def write(threshold: str = "{max_drop: 0.5}", stages: str | None = None):
        suite = tmp_path / "suite.yaml"
        suite.write_text(SUITE.format(threshold=threshold))
        text = RECIPE.format(model=tiny_llama, calib=CALIBRATION, suite=suite)
        if stages is not None:
            text = text.split("stages:\n")[0] + "stages:\n" + stages
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(text)
        return recipe

    return write


# --------------------------------------------------------------------------- the grid


def test_grid_expands_to_the_cartesian_product_in_axis_order():
    axes = [
        parse_axis("stages.ptq.format=fp8,int4_awq,nvfp4"),
        parse_axis(" stages.ptq.kv_cache = none, fp8"),
    ]
    assert axes[1] == Axis(key="stages.ptq.kv_cache", values=["none", "fp8"])
    variants = expand(axes)
    assert [v.slug for v in variants] == [
        "fp8-none",
        "fp8-fp8",
        "int4_awq-none",
        "int4_awq-fp8",
        "nvfp4-none",
        "nvfp4-fp8",
    ]
    assert variants[3].overrides == ["stages.ptq.format=int4_awq", "stages.ptq.kv_cache=fp8"]


def test_grid_values_are_yaml_and_names_stay_unique():
    # A comma inside brackets or quotes belongs to its value.
    assert split_values("[lm_head, 'a,b'],none, 'x,y'") == ["[lm_head, 'a,b']", "none", "'x,y'"]
    variants = expand([parse_axis("stages.ptq.exclude=[lm_head],[lm_head, model.layers.0*]")])
    assert [v.slug for v in variants] == ["lm_head", "lm_head_model.layers.0"]
    # Two values whose names coincide once made file-safe get a number.
    assert [v.slug for v in expand([parse_axis("description=a b,a_b")])] == ["a_b", "a_b-2"]


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        (["stages.ptq.format"], "expected KEY=VALUE"),
        (["stages.ptq.format="], "no values after '='"),
        (["=fp8"], "expected KEY=VALUE"),
        (["stages..format=fp8"], "expected KEY=VALUE"),
        (["stages.ptq.format=fp8,,int8_sq"], "an empty value"),
        (["stages.ptq.format=fp8,int8_sq,fp8"], "fp8 given more than once"),
        (
            ["stages.ptq.format=fp8", "stages.ptq.format=int8_sq"],
            "stages.ptq.format given more than once",
        ),
    ],
)
def test_malformed_axes_are_refused(grid, message):
    with pytest.raises(OptimizerError, match=re.escape(message)):
        expand([parse_axis(g) for g in grid])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--grid", "stages.ptq.fromat=fp8,int8_sq"],
            "2 of 2 sweep variant(s) invalid; nothing was run:\n  every variant: "
            "--grid stages.ptq.fromat: "
            "stages[0].ptq.fromat: unknown key 'fromat'; did you mean 'format'?",
        ),
        (
            ["--grid", "stages.ptq.format=fp8,int9"],
            "1 of 2 sweep variant(s) invalid; nothing was run:\n  variant int9 "
            "(stages.ptq.format=int9): --grid stages.ptq.format: stages[0].ptq.format: "
            "must be one of:",
        ),
        (
            ["--grid", "stages.qat.learning_rate=1e-5,1e-4"],
            "every variant: --grid stages.qat.learning_rate: no list element 'qat' under stages",
        ),
        (
            ["--grid", "stages.ptq.format=fp8,int8_sq", "--set", "stages.ptq.format=fp8"],
            "stages.ptq.format is both a --grid axis and a --set override",
        ),
        (
            ["--grid", "stages.ptq.format=fp8", "--accuracy", "local_arc_easy/ac"],
            "--accuracy local_arc_easy/ac: the gate's suite measures local_arc_easy/acc (or "
            "use mean); did you mean 'local_arc_easy/acc'?",
        ),
        (
            ["--grid", "stages.ptq.kv_cache=none,'none'"],
            "variant none-2 (stages.ptq.kv_cache='none'): the same recipe as variant none",
        ),
        (["--grid", "stages.ptq.format=fp8", "--resume", "--force"], "contradict each other"),
    ],
)
def test_bad_grids_exit_2_and_write_nothing(sweep_recipe, tmp_path, capsys, args, message):
    out = tmp_path / "sweep"
    assert main(["sweep", str(sweep_recipe()), "-o", str(out), "-q", *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not out.exists()


def test_a_sweep_needs_a_gate_and_an_export_to_measure(sweep_recipe, tmp_path, capsys):
    out = tmp_path / "sweep"
    no_gate = sweep_recipe(stages="  - ptq: {format: fp8}\n")
    assert main(["sweep", str(no_gate), "--grid", "stages.ptq.format=fp8", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the recipe has no gate stage" in err and "--size exported_bytes" in err
    assert not out.exists()


# --------------------------------------------------------------------------- the front


def test_pareto_front_on_known_points():
    # (size, accuracy): smaller is better, higher is better.
    points = [
        (8.0, 0.70),  # 0: on the front (most accurate)
        (4.5, 0.68),  # 1: on the front
        (4.5, 0.60),  # 2: dominated by 1 (same size, less accurate)
        (6.0, 0.65),  # 3: dominated by 1 (larger and less accurate)
        (4.0, 0.55),  # 4: on the front (smallest)
        (4.0, 0.55),  # 5: a tie with 4: equal points do not dominate each other
        (16.0, 0.70),  # 6: dominated by 0 (same accuracy, larger)
        None,  # 7: not measured: never on the front
        (float("nan"), 0.9),  # 8: not a number: never on the front, dominates nothing
    ]
    assert pareto_front(points) == [0, 1, 4, 5]
    assert pareto_front([(3.0, 0.5)]) == [0]
    assert pareto_front([]) == [] and pareto_front([None]) == []
    # Larger is better (e.g. a speed-up): the front flips to the right.
    assert pareto_front([(1.0, 0.5), (2.0, 0.5), (2.0, 0.4)], minimize_x=False) == [1]
    assert dominates((4.0, 0.6), (5.0, 0.6)) and not dominates((4.0, 0.6), (4.0, 0.6))


def test_tradeoff_report_marks_the_front(tmp_path):
    rows = [
        {"name": "a", "size": 8.0, "acc": 0.70, "passed": True},
        {"name": "b", "size": 4.0, "acc": 0.60, "passed": False},
        {"name": "c", "size": 6.0, "acc": 0.50, "passed": True},
        {"name": "d", "size": None, "acc": 0.90, "passed": None},  # listed, not plotted
    ]
    columns = [Column("name", "variant"), Column("size", "bits", "{:.1f}"), Column("acc", "acc")]
    report = write_tradeoff_report(
        tmp_path, "T", rows, "size", "acc", columns=columns, pass_key="passed", stem="t"
    )
    assert report.front == [0, 1]
    md = (tmp_path / "t.md").read_text()
    assert "| a | 8.0 | 0.7 | front |" in md and "| b | 4.0 | 0.6 | front |" in md
    assert "| c | 6.0 | 0.5 |  |" in md and "| d | – | 0.9 |  |" in md
    page = (tmp_path / "t.html").read_text()
    assert page.count("<tr class='front'>") == 2
    assert re.search(r'<img id="plot" alt="[^"]+" src="data:image/png;base64,iVBOR', page)


# --------------------------------------------------------------------------- running


def _record_scoring(monkeypatch) -> list[str]:
    """Spy on evaluate_and_judge's scoring: the path of every checkpoint it scores."""
    import optimizer.evaluation as evaluation

    scored, original = [], evaluation._score

    def spy(target, *args, **kwargs):
        scored.append(str(target.path))
        return original(target, *args, **kwargs)

    monkeypatch.setattr(evaluation, "_score", spy)
    return scored


class Spy:
    """Counts a stage class's ``run`` calls; the call number ``fail_at`` raises ``error``."""

    def __init__(self, monkeypatch, cls, fail_at=None, error=KeyboardInterrupt):
        self.calls, self.fail_at, original = [], fail_at, cls.run

        def run(stage, ctx):
            self.calls.append(stage.name)
            if len(self.calls) == self.fail_at:
                raise error("stopped by the test")
            return original(stage, ctx)

        monkeypatch.setattr(cls, "run", run)


def test_sweep_shares_the_baseline_and_resume_keeps_finished_variants(
    sweep_recipe, tiny_llama, tmp_path, monkeypatch
):
    from optimizer.stages.export import Export
    from optimizer.stages.gate import Gate
    from optimizer.stages.ptq import PTQ

    recipe, out = sweep_recipe(), tmp_path / "sweep"
    scored = _record_scoring(monkeypatch)
    grid = ["--grid", "stages.ptq.format=fp8,int8_sq,int4_awq"]
    # The third variant is interrupted as its gate starts (Ctrl-C: exit 130).
    gates = Spy(monkeypatch, Gate, fail_at=3)
    assert main(["sweep", str(recipe), *grid, "-o", str(out), "-q"]) == 130
    record = json.loads((out / "sweep.json").read_text())
    assert record["status"] == "interrupted"
    assert [v["status"] for v in record["variants"]] == ["success", "success", "interrupted"]
    finished = {
        slug: (out / "variants" / slug / "run.json").read_bytes() for slug in ("fp8", "int8_sq")
    }

    ptqs, exports = Spy(monkeypatch, PTQ), Spy(monkeypatch, Export)
    gates.calls, gates.fail_at = [], None
    assert main(["sweep", str(recipe), *grid, "-o", str(out), "-q", "--resume"]) == 0
    # Finished variants are kept whole; the interrupted one continues at its gate.
    assert ptqs.calls == [] and exports.calls == [] and gates.calls == ["gate"]
    for slug, run_json in finished.items():
        assert (out / "variants" / slug / "run.json").read_bytes() == run_json
    record = json.loads((out / "sweep.json").read_text())
    variants = {v["slug"]: v for v in record["variants"]}
    assert [v["reused"] for v in variants.values()] == [True, True, False]
    assert all(v["status"] == "success" and v["exit_code"] == 0 for v in variants.values())

    # The baseline was scored once over both calls: by the first variant's gate.
    assert scored.count(str(tiny_llama)) == 1
    assert len(scored) == 4  # + one candidate (the rebuilt export) per variant
    cached = [v["metrics"]["baseline_cached"] for v in variants.values()]
    assert cached == [False, True, True]

    # Sizes: 8-bit formats 8 bits per weight, int4 AWQ (group 128) 4 + 16/128; the int4
    # export is the smallest, so it is on the front whatever the scores.
    bits = {s: v["metrics"]["effective_bits"] for s, v in variants.items()}
    assert bits == {"fp8": 8.0, "int8_sq": 8.0, "int4_awq": 4.125}
    size = {s: v["metrics"]["exported_bytes"] for s, v in variants.items()}
    assert size["int4_awq"] < min(size["fp8"], size["int8_sq"])
    assert "int4_awq" in record["front"]
    points = [(size[s], v["metrics"]["accuracy"]) for s, v in variants.items()]
    assert record["front"] == [list(variants)[i] for i in pareto_front(points)]

    md = (out / "sweep.md").read_text()
    marked = [line.split("|")[1].strip() for line in md.splitlines() if line.endswith("| front |")]
    assert marked == record["front"]
    assert "- gates that evaluated the baseline: 1" in md
    page = (out / "sweep.html").read_text()
    assert page.count("<tr class='front'>") == len(record["front"])
    assert 'src="data:image/png;base64,iVBOR' in page

    # A changed suite file (a stage input, not the recipe) redoes every variant's gate only.
    suite = tmp_path / "suite.yaml"
    suite.write_text(suite.read_text().replace("max_drop: 0.5", "max_drop: 0.4"))
    gates.calls = []
    assert main(["sweep", str(recipe), *grid, "-o", str(out), "-q", "--resume"]) == 0
    assert ptqs.calls == [] and exports.calls == [] and gates.calls == ["gate"] * 3
    record = json.loads((out / "sweep.json").read_text())
    assert [v["reused"] for v in record["variants"]] == [False, False, False]
    assert scored.count(str(tiny_llama)) == 1  # (thresholds are not part of the baseline key)
    assert "- gates that evaluated the baseline: 0" in (out / "sweep.md").read_text()


def test_failed_variants_and_no_passing_variant_set_the_exit_code(
    sweep_recipe, tmp_path, monkeypatch, capsys
):
    from optimizer.stages.ptq import PTQ

    # A floor no random model reaches: every gate fails.
    recipe = sweep_recipe(threshold="{min_value: 1.0}")
    out = tmp_path / "sweep"
    assert main(["sweep", str(recipe), "--grid", "stages.ptq.format=fp8", "-o", str(out)]) == 3
    record = json.loads((out / "sweep.json").read_text())
    assert record["status"] == "gate_failed"
    (variant,) = record["variants"]
    assert (variant["status"], variant["exit_code"]) == ("gate_failed", 3)
    assert variant["metrics"]["passed"] is False
    assert variant["metrics"]["failing"] == ["local_arc_easy/acc"]
    assert "No variant passed its gate." in (out / "sweep.md").read_text()
    assert "no variant passed its gate" in capsys.readouterr().err

    # A stage that fails fails its variant (exit 1); the other variants still run.
    Spy(monkeypatch, PTQ, fail_at=1, error=RuntimeError)
    grid = ["--grid", "stages.ptq.format=int8_sq,fp8"]
    assert main(["sweep", str(recipe), *grid, "-o", str(out), "--force", "-q"]) == 1
    record = json.loads((out / "sweep.json").read_text())
    assert record["status"] == "failed"
    first, second = record["variants"]
    assert (first["status"], first["exit_code"]) == ("failed", 1)
    assert "stage 'ptq' failed: RuntimeError: stopped by the test" in first["error"]
    assert (second["status"], second["exit_code"]) == ("gate_failed", 3)
    # The baseline cache from the first sweep served this one.
    assert second["metrics"]["baseline_cached"] is True
    assert (out / "sweep.html").is_file()
    assert "variant(s) int8_sq failed" in capsys.readouterr().err


def test_sweep_directory_trust(sweep_recipe, tmp_path, capsys):
    recipe, grid = sweep_recipe(), ["--grid", "stages.ptq.format=fp8"]
    out, elsewhere = tmp_path / "sweep", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    # A link at variants/ would put the variants' runs wherever it points: refused.
    (out / "variants").symlink_to(elsewhere)
    assert main(["sweep", str(recipe), *grid, "-o", str(out), "-q"]) == 2
    assert "variants is a symbolic link" in capsys.readouterr().err
    assert list(elsewhere.iterdir()) == [] and not (out / "sweep.json").exists()
    (out / "variants").unlink()

    # A sweep directory is no run directory, and a run directory no sweep's.
    (out / "sweep.json").write_text("{}")
    assert main(["run", str(recipe), "-o", str(out), "-q"]) == 2
    assert "holds a sweep (sweep.json), not a run" in capsys.readouterr().err
    assert main(["sweep", str(recipe), *grid, "-o", str(out), "-q"]) == 2
    assert "already holds a sweep. Use --resume" in capsys.readouterr().err
    assert main(["sweep", str(recipe), *grid, "-o", str(out), "-q", "--resume"]) == 2
    assert "sweep.json is not a sweep record" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    assert main(["sweep", str(recipe), *grid, "-o", str(run), "-q"]) == 2
    assert "holds a run (run.json) of optimize run, not a sweep" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [".lock", "sweep.json"]
