"""Hostile and malformed recipes (issue 15): each is refused by ``optimize validate`` with
exit 2 and ONE clear message naming the file (and the key where there is one), without a
traceback, within seconds; ``optimize run`` writes nothing.

The corpus covers what a YAML file can do to a loader (alias bombs, cycles, deep nesting,
huge, empty, binary or non-UTF-8 files), malformed shapes, numbers without sensible bounds
(absurd ints, NaN and infinity wherever a float is read), gate thresholds outside [0, 1] or
for metrics the suite does not measure, and bad ``--set`` flags.
"""

from __future__ import annotations

import time

import pytest
from test_bad_input_corpus import assert_one_clear_error
from tiny import CALIBRATION

from optimizer.cli import main

HEAD = """\
name: bad
model: {source: MODEL}
calibration: {dataset: CALIB, num_samples: 8, seq_len: 64}
stages:
"""
PTQ = "  - ptq: {format: fp8}\n"
#: A valid recipe; the --set cases start from it.
VALID = HEAD + PTQ


def billion_laughs(levels: int = 9, key: str = "description") -> str:
    lines = ['lol0: &lol0 "lol"']
    for i in range(1, levels + 1):
        refs = ", ".join([f"*lol{i - 1}"] * 10)
        lines.append(f"lol{i}: &lol{i} [{refs}]")
    return "\n".join(lines) + "\n"


BOMB_IN_STAGE = (
    VALID.replace("  - ptq: {format: fp8}\n", "")
    + "  - ptq:\n      format: fp8\n      exclude: &l0 [a, a, a, a, a, a, a, a, a, a]\n"
    + "".join(
        f"  - ptq: {{format: fp8, exclude: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]}}\n"
        for i in range(1, 9)
    )
)
DEEP = 20_000

#: (id, file content (str, a template with MODEL/CALIB, or bytes), --set flags, fragment)
CASES: list[tuple[str, str | bytes, list[str], str]] = [
    # --- what YAML can do to a loader
    ("alias-bomb-9-levels", billion_laughs(9), [], "billion laughs"),
    ("alias-bomb-in-a-stage", BOMB_IN_STAGE, [], "billion laughs"),
    (
        "alias-bomb-in-a-set-value",
        VALID,
        ["stages.0.ptq.exclude=" + billion_laughs(9).replace("\n", ", ").join("{}")],
        "billion laughs",
    ),
    ("alias-cycle", VALID + "description: &a [*a]\n", [], "a cycle"),
    ("alias-cycle-in-a-set-value", VALID, ["stages.0.ptq.exclude=&a [*a]"], "a cycle"),
    ("deep-brackets-whole-file", "[" * DEEP + "]" * DEEP, [], "levels deep"),
    (
        "deep-brackets-as-a-value",
        VALID + "description: " + "[" * DEEP + "]" * DEEP + "\n",
        [],
        "levels deep",
    ),
    (
        "deep-flow-mappings",
        VALID + "description: " + "{a: " * DEEP + "1" + "}" * DEEP + "\n",
        [],
        "levels deep",
    ),
    (
        "deep-block-mappings",
        "\n".join(" " * i + "a:" for i in range(0, 400, 2)) + " 1\n",
        [],
        "levels deep",
    ),
    (
        "deep-block-sequences",
        VALID + "description:\n" + "\n".join("  " * i + "- " for i in range(1, 300)) + "1\n",
        [],
        "levels deep",
    ),
    (
        "deep-brackets-100",
        VALID + "description: " + "[" * 100 + "]" * 100 + "\n",
        [],
        "levels deep",
    ),
    (
        "deep-brackets-in-a-set-value",
        VALID,
        ["stages.0.ptq.exclude=" + "[" * DEEP + "]" * DEEP],
        "nested",
    ),
    ("file-over-1-MiB", VALID + "# " + "x" * (1 << 20) + "\n", [], "larger than 1024 KiB"),
    ("empty-file", "", [], "the recipe is empty"),
    ("comments-only", "# nothing here\n\n", [], "the recipe is empty"),
    ("explicit-null", "~\n", [], "the recipe is empty"),
    (
        "non-utf8-latin1",
        VALID.encode() + b"description: caf\xe9\n",
        [],
        "not UTF-8 text (byte 0xe9",
    ),
    ("binary-png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00", [], "not UTF-8 text"),
    ("utf16-file", VALID.encode("utf-16"), [], "not UTF-8 text"),
    ("nul-bytes", VALID + "description: a\x00b\n", [], "not valid YAML"),
    ("two-documents", VALID + "---\nname: other\n", [], "not valid YAML"),
    ("tab-indentation", "name: bad\nmodel:\n\tsource: x\n", [], "not valid YAML"),
    ("unclosed-flow", VALID + "description: [a, b\n", [], "not valid YAML"),
    (
        "python-tag",
        VALID + "description: !!python/object/apply:os.system [echo hi]\n",
        [],
        "not valid YAML",
    ),
    ("unhashable-key", VALID + "? [a, b]\n: 1\n", [], "not valid YAML"),
    ("duplicate-key", VALID + "name: again\n", [], "name: duplicate key"),
    # --- shapes
    ("top-level-list", "- name: bad\n- stages: []\n", [], "a recipe is a YAML mapping"),
    ("top-level-string", "just some words\n", [], "a recipe is a YAML mapping"),
    ("top-level-int", "42\n", [], "a recipe is a YAML mapping"),
    ("stages-a-mapping", HEAD + "  ptq: {format: fp8}\n", [], "stages: must be a list"),
    ("stages-a-string", HEAD.replace("stages:\n", "stages: ptq\n"), [], "stages: must be a list"),
    (
        "stages-empty",
        HEAD.replace("stages:\n", "stages: []\n"),
        [],
        "stages: the recipe has no stages",
    ),
    (
        "stage-with-two-keys",
        HEAD + "  - ptq: {format: fp8}\n    export: {hf_checkpoint: true}\n",
        [],
        "stages[0]: each stage is a mapping with exactly one key",
    ),
    (
        "stage-a-string",
        HEAD + "  - ptq\n",
        [],
        "stages[0]: each stage is a mapping with exactly one key",
    ),
    ("stage-null", HEAD + "  - ~\n", [], "stages[0]: each stage is a mapping with exactly one key"),
    (
        "stage-settings-a-list",
        HEAD + "  - ptq: [fp8]\n",
        [],
        "stages[0].ptq: a stage's settings must be a mapping",
    ),
    (
        "model-a-list",
        VALID.replace("model: {source: MODEL}", "model: [MODEL]"),
        [],
        "model: must be a mapping",
    ),
    # --- model.max_memory (issue 17): memory sizes with their unit
    (
        "max-memory-gigabits",
        VALID.replace("model: {source: MODEL}", "model: {source: MODEL, max_memory: {gpu: 20gb}}"),
        [],
        "model.max_memory.gpu: '20gb' is not a memory size: a number and one of the units "
        "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB, e.g. '20GiB' (case matters: did you mean 'GB'?)",
    ),
    (
        "max-memory-without-a-unit",
        VALID.replace("model: {source: MODEL}", "model: {source: MODEL, max_memory: {gpu: 20}}"),
        [],
        "model.max_memory.gpu: 20 has no unit: write one such as '20GiB'",
    ),
    (
        "max-memory-zero",
        VALID.replace("model: {source: MODEL}", "model: {source: MODEL, max_memory: {cpu: 0GiB}}"),
        [],
        "model.max_memory.cpu: '0GiB': must be more than 0 bytes",
    ),
    (
        "max-memory-negative",
        VALID.replace("model: {source: MODEL}", "model: {source: MODEL, max_memory: {gpu: -1GiB}}"),
        [],
        "model.max_memory.gpu: '-1GiB' is not a memory size",
    ),
    (
        "max-memory-beyond-any-machine",
        VALID.replace(
            "model: {source: MODEL}", "model: {source: MODEL, max_memory: {gpu: 3000TiB}}"
        ),
        [],
        "model.max_memory.gpu: '3000TiB': more memory than any machine has (at most 1 PiB)",
    ),
    (
        "max-memory-disk",
        VALID.replace(
            "model: {source: MODEL}", "model: {source: MODEL, max_memory: {gpu: 8GiB, disk: 1TB}}"
        ),
        [],
        "model.max_memory.disk: unknown key 'disk'",
    ),
    (
        "max-memory-a-string",
        VALID.replace("model: {source: MODEL}", "model: {source: MODEL, max_memory: 8GiB}"),
        [],
        "model.max_memory: must be a mapping",
    ),
    (
        "max-memory-set-without-unit",
        VALID,
        ["model.max_memory.gpu=8"],
        "model.max_memory.gpu: 8 has no unit",
    ),
    (
        "calibration-a-string",
        VALID.replace(
            "calibration: {dataset: CALIB, num_samples: 8, seq_len: 64}", "calibration: CALIB"
        ),
        [],
        "calibration: must be a mapping",
    ),
    ("null-key", VALID + "~: 1\n", [], "keys are names (strings), not None"),
    ("int-key", VALID + "1: x\n", [], "keys are names (strings), not 1"),
    (
        "huge-literal-value",
        HEAD + "  - ptq: {format: " + "x" * 50_000 + "}\n",
        [],
        "stages[0].ptq.format: must be one of",
    ),
    # --- numbers
    (
        "calib-seq-len-1e30-float",
        VALID.replace("seq_len: 64", "seq_len: 1.0e+30"),
        [],
        "calibration.seq_len: this number is far out of range",
    ),
    (
        "calib-seq-len-huge-int",
        VALID.replace("seq_len: 64", "seq_len: " + "9" * 40),
        [],
        "calibration.seq_len: Input should be less than or equal to 1048576",
    ),
    (
        "calib-seq-len-nan",
        VALID.replace("seq_len: 64", "seq_len: .nan"),
        [],
        "calibration.seq_len:",
    ),
    (
        "calib-num-samples-1e6",
        VALID.replace("num_samples: 8", "num_samples: 1000000"),
        [],
        "calibration.num_samples: Input should be less than or equal to 65536",
    ),
    (
        "calib-batch-size-1e5",
        VALID.replace("num_samples: 8", "num_samples: 8, batch_size: 100000"),
        [],
        "calibration.batch_size: must be at most 4,096, not 100,000",
    ),
    (
        "calib-batch-size-a-word-other-than-auto",
        VALID.replace("num_samples: 8", "num_samples: 8, batch_size: automatic"),
        [],
        "calibration.batch_size: must be a whole number or 'auto', not 'automatic'",
    ),
    (
        "calib-too-many-tokens",
        VALID.replace("num_samples: 8, seq_len: 64", "num_samples: 65536, seq_len: 65536"),
        [],
        "calibration: num_samples x seq_len is",
    ),
    (
        "calib-seed-2-to-the-70",
        VALID.replace("num_samples: 8", f"num_samples: 8, seed: {2**70}"),
        [],
        "calibration.seed:",
    ),
    (
        "qat-steps-1e12",
        VALID + "  - qat: {steps: 1000000000000}\n",
        [],
        "stages[1].qat.steps: Input should be less than or equal to 10000000",
    ),
    (
        "qat-lr-nan",
        VALID + "  - qat: {learning_rate: .nan}\n",
        [],
        "stages[1].qat.learning_rate: Input should be a finite number",
    ),
    (
        "qat-lr-inf",
        VALID + "  - qat: {learning_rate: .inf}\n",
        [],
        "stages[1].qat.learning_rate: Input should be a finite number",
    ),
    (
        "qat-lr-nan-string",
        VALID + "  - qat: {learning_rate: 'nan'}\n",
        [],
        "stages[1].qat.learning_rate: Input should be a finite number",
    ),
    (
        "qat-lr-10",
        VALID + "  - qat: {learning_rate: 10}\n",
        [],
        "stages[1].qat.learning_rate: Input should be less than or equal to 1",
    ),
    (
        "qat-epochs-inf",
        VALID + "  - qat: {epochs: .inf}\n",
        [],
        "stages[1].qat.epochs: Input should be a finite number",
    ),
    (
        "qat-batch-size-1e6",
        VALID + "  - qat: {batch_size: 1000000}\n",
        [],
        "stages[1].qat.batch_size: Input should be less than or equal to 4096",
    ),
    (
        "qat-seq-len-1e7",
        VALID + "  - qat: {seq_len: 10000000}\n",
        [],
        "stages[1].qat.seq_len: Input should be less than or equal to 1048576",
    ),
    (
        "qat-seed-negative",
        VALID + "  - qat: {seed: -1}\n",
        [],
        "stages[1].qat.seed: Input should be greater than or equal to 0",
    ),
    (
        "qat-warmup-nan",
        VALID + "  - qat: {warmup_ratio: .nan}\n",
        [],
        "stages[1].qat.warmup_ratio: Input should be a finite number",
    ),
    (
        "qat-weight-decay-nan",
        VALID + "  - qat: {weight_decay: .nan}\n",
        [],
        "stages[1].qat.weight_decay: Input should be a finite number",
    ),
    (
        "qat-max-grad-norm-inf",
        VALID + "  - qat: {max_grad_norm: .inf}\n",
        [],
        "stages[1].qat.max_grad_norm: Input should be a finite number",
    ),
    (
        "qat-temperature-nan",
        VALID + "  - qat: {temperature: .nan}\n",
        [],
        "stages[1].qat.temperature: Input should be a finite number",
    ),
    (
        "qat-kd-weight-inf",
        VALID + "  - qat: {kd_weight: .inf}\n",
        [],
        "stages[1].qat.kd_weight: Input should be a finite number",
    ),
    # --- gate thresholds
    (
        "gate-max-drop-nan",
        VALID + "  - gate: {suite: quick, max_drop: {default: .nan}}\n",
        [],
        "stages[1].gate.max_drop.default: must be",
    ),
    (
        "gate-max-drop-inf",
        VALID + "  - gate: {suite: quick, max_drop: {default: .inf}}\n",
        [],
        "stages[1].gate.max_drop.default: must be",
    ),
    (
        "gate-max-drop-negative",
        VALID + "  - gate: {suite: quick, max_drop: {default: -0.1}}\n",
        [],
        "stages[1].gate.max_drop.default: must be an absolute drop in [0, 1]",
    ),
    (
        "gate-max-drop-above-1",
        VALID + "  - gate: {suite: quick, max_drop: {default: 1.5}}\n",
        [],
        "stages[1].gate.max_drop.default: must be an absolute drop in [0, 1]",
    ),
    (
        "gate-max-drop-unknown-metric",
        VALID + "  - gate: {suite: quick, max_drop: {local_arc_easy/ac: 0.1}}\n",
        [],
        "stages[1].gate.max_drop.local_arc_easy/ac: 'local_arc_easy/ac' is not a metric of suite 'quick'; did you mean 'local_arc_easy/acc'? (known: default, local_arc_easy/acc)",
    ),
    (
        "gate-max-drop-a-string",
        VALID + "  - gate: {suite: quick, max_drop: {default: lots}}\n",
        [],
        "stages[1].gate.max_drop.default:",
    ),
    (
        "suite-threshold-above-1",
        VALID + "  - gate: {suite: SUITE_DIR/above1.yaml}\n",
        [],
        "thresholds.default.max_drop: Input should be less than or equal to 1",
    ),
    (
        "suite-threshold-nan",
        VALID + "  - gate: {suite: SUITE_DIR/nan.yaml}\n",
        [],
        "thresholds.default.min_value: Input should be a finite number",
    ),
    (
        "suite-threshold-unknown-metric",
        VALID + "  - gate: {suite: SUITE_DIR/unknown.yaml}\n",
        [],
        "'local_arc_easy/acc_norm' is not a metric of suite 'mine'; did you mean 'local_arc_easy/acc'?",
    ),
    # --- --set
    ("set-without-equals", VALID, ["calibration.seq_len"], "expected KEY=VALUE"),
    ("set-empty-key", VALID, ["=1"], "the key must be a dotted path"),
    ("set-empty-segment", VALID, ["calibration..seq_len=1"], "the key must be a dotted path"),
    ("set-no-such-stage", VALID, ["stages.7.ptq.format=fp8"], "no list element '7' under stages"),
    ("set-into-a-string", VALID, ["model.source.x=1"], "model.source is not a mapping"),
    ("set-stages-to-an-int", VALID, ["stages=5"], "stages: must be a list"),
    (
        "set-seq-len-1e30",
        VALID,
        ["calibration.seq_len=1.0e+30"],
        "--set calibration.seq_len=1.0e+30: calibration.seq_len:",
    ),
    (
        "set-lr-nan",
        VALID + "  - qat: {steps: 2}\n",
        ["stages.qat.learning_rate=.nan"],
        "stages[1].qat.learning_rate: Input should be a finite number",
    ),
    ("set-bad-format", VALID, ["stages.ptq.format=fp9"], "did you mean"),
    ("set-misspelt-key", VALID, ["nmae=x"], "unknown key 'nmae'; did you mean 'name'?"),
    ("set-on-a-list-recipe", "- a\n- b\n", ["name=x"], "a recipe is a YAML mapping"),
]

#: Cases also run through ``optimize run -o DIR``: DIR must not be created.
RUN_CASES = {
    "alias-bomb-9-levels",
    "deep-brackets-whole-file",
    "binary-png",
    "empty-file",
    "stage-with-two-keys",
    "qat-lr-nan",
    "gate-max-drop-unknown-metric",
    "set-no-such-stage",
    "max-memory-gigabits",
}
#: Cases that must finish in seconds (they used to hang or blow the stack).
TIMED = {c[0] for c in CASES if c[0].startswith(("alias-", "deep-", "file-over"))}

SUITE = """\
name: mine
tasks:
  - {task: local_arc_easy, metric: acc}
thresholds:
"""


@pytest.fixture
def hostile(tmp_path, tiny_llama):
    def write(content: str | bytes):
        suites = tmp_path / "suites"
        suites.mkdir(exist_ok=True)
        (suites / "above1.yaml").write_text(SUITE + "  default: {max_drop: 2}\n")
        (suites / "nan.yaml").write_text(SUITE + "  default: {min_value: .nan}\n")
        (suites / "unknown.yaml").write_text(SUITE + "  local_arc_easy/acc_norm: {max_drop: 0.1}\n")
        path = tmp_path / "hostile.yaml"
        subst = {"MODEL": str(tiny_llama), "CALIB": str(CALIBRATION), "SUITE_DIR": str(suites)}
        if isinstance(content, str):
            for k, v in subst.items():
                content = content.replace(k, v)
            path.write_bytes(content.encode())
        else:
            path.write_bytes(content)
        return path

    return write


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.mark.parametrize(
    ("case", "content", "overrides", "fragment"), CASES, ids=[c[0] for c in CASES]
)
def test_validate_refuses_with_one_clear_message(
    case, content, overrides, fragment, hostile, capsys
):
    path = hostile(content)
    start = time.monotonic()
    assert main(["validate", str(path), *_sets(overrides)]) == 2
    elapsed = time.monotonic() - start
    _, err = capsys.readouterr()
    assert_one_clear_error(err, fragment)
    line = next(line for line in err.splitlines() if line.startswith("error:"))
    # the message names the file (and line, and key), or the --set flag the value came from
    assert str(path) in line or (overrides and "--set" in line), line
    assert len(line) < 1000, line  # readable: a hostile value is not echoed whole
    if case in TIMED:
        assert elapsed < 5, f"{case} took {elapsed:.1f} s"


@pytest.mark.parametrize(
    ("case", "content", "overrides", "fragment"),
    [c for c in CASES if c[0] in RUN_CASES],
    ids=[c[0] for c in CASES if c[0] in RUN_CASES],
)
def test_run_refuses_before_writing_anything(
    case, content, overrides, fragment, hostile, tmp_path, capsys
):
    path = hostile(content)
    run_dir = tmp_path / "run"
    start = time.monotonic()
    assert main(["run", str(path), "-o", str(run_dir), "-q", *_sets(overrides)]) == 2
    assert time.monotonic() - start < 5
    _, err = capsys.readouterr()
    assert_one_clear_error(err, fragment)
    assert not run_dir.exists()


def test_the_corpus_base_is_valid(hostile, capsys):
    """Each case fails for its own reason: the recipe it starts from validates, aliases
    within the bounds included."""
    assert main(["validate", str(hostile(VALID))]) == 0
    shared = VALID + (
        "  - qat: &train {steps: 2, learning_rate: 1.0e-4}\n"
        "  - gate: {suite: quick, max_drop: {default: 0.5, local_arc_easy/acc: 1.0}}\n"
        "description: &d a recipe with an anchor\n"
    )
    assert main(["validate", str(hostile(shared))]) == 0
    assert main(["validate", str(hostile(billion_laughs(3)))]) == 2  # 1,000 values: the
    assert "billion laughs" not in capsys.readouterr().err  # bound is not what refuses it


@pytest.mark.parametrize(
    ("max_drop", "fragment"),
    [
        ({"default": float("nan")}, "max_drop default: must be an absolute drop in [0, 1]"),
        ({"default": float("inf")}, "max_drop default: must be an absolute drop in [0, 1]"),
        ({"default": -0.01}, "max_drop default: must be an absolute drop in [0, 1]"),
        ({"local_arc_easy/ac": 0.1}, "did you mean 'local_arc_easy/acc'? (known: default"),
    ],
)
def test_gate_overrides_are_refused_for_optimize_gate_too(max_drop, fragment):
    """``optimize gate --max-drop`` goes through apply_overrides, not the recipe schema."""
    from optimizer import resources
    from optimizer.errors import OptimizerError
    from optimizer.evaluation.suite import apply_overrides, load_suite

    suite = load_suite(resources.suite("quick"))
    with pytest.raises(OptimizerError, match="max_drop") as e:
        apply_overrides(suite, max_drop=max_drop)
    assert fragment in str(e.value)
    assert apply_overrides(suite, max_drop={"default": 1.0}).threshold_for("x").max_drop == 1.0
