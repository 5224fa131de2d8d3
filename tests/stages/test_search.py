"""search: the fewest layer groups kept in higher precision for the gate to pass.

The tiny model has one planted hypersensitive group: in layer 2, channel 7 of the MLP's
input is zeroed by its norm, and gate/up hold a 1000.0 outlier in that column. The outlier
changes nothing in 16 bits (it multiplies zeros) but sets every row's INT8 scale, so INT8
weights round the rest of gate/up to zero and the MLP's (amplified) output vanishes: greedy
continuations all diverge from the baseline's. Every other layer quantizes harmlessly.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
from tiny import CALIBRATION, make_tiny_llama, record_evaluations

from optimizer.cli import main
from optimizer.techniques.search import SearchConfig, group_name, layer_groups, moved_counts

PLANTED = "model.layers.2.mlp.{gate_proj,up_proj}"

#: Greedy agreement tells a destroyed model (0 of 20 continuations) from a healthy INT8 one
#: (15-20 of 20 on this random model, whose near-tied logits flip a few tokens).
SUITE = """\
name: tiny-greedy
limit: 20
tasks:
  - {task: local_greedy_prompts, metric: greedy_agreement, max_gen_toks: 4}
thresholds:
  default: {max_drop: 0.6}
"""

RECIPE = """\
name: tiny-search
model: {{source: {model}}}
calibration: {{dataset: {calib}, num_samples: 8, seq_len: 32, batch_size: 4}}
stages:
  - search: {{format: int8_wo, suite: {suite}, max_trials: {trials}}}
  - export: {{trtllm_checkpoint: null, hf_checkpoint: true}}
  - gate: {{suite: {suite}}}
"""


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM

    path = make_tiny_llama(tmp_path_factory.mktemp("planted") / "model", layers=4)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    with torch.no_grad():
        layer = model.model.layers[2]
        layer.post_attention_layernorm.weight[7] = 0.0
        layer.mlp.gate_proj.weight[:, 7] = 1000.0
        layer.mlp.up_proj.weight[:, 7] = 1000.0
        layer.mlp.down_proj.weight.mul_(10)
    model.save_pretrained(path)
    return path


def write_recipe(tmp_path, model, trials):
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=model, calib=CALIBRATION, suite=suite, trials=trials))
    return recipe


#: Dies (SIGKILL, as an OOM kill) when the search asks the judge about its second trial.
_KILL_AT_SECOND_TRIAL = """
import os, signal, sys
import optimizer.evaluation as evaluation
from optimizer.cli import main
original, calls = evaluation.evaluate_and_judge, []
def judge(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
evaluation.evaluate_and_judge = judge
sys.exit(main(["run", sys.argv[1], "-o", sys.argv[2], "-q"]))
"""


def test_planted_group_is_found_first_and_a_killed_search_resumes(planted, tmp_path, monkeypatch):
    recipe, run = write_recipe(tmp_path, planted, trials=4), tmp_path / "run"
    killed = subprocess.run(
        [sys.executable, "-c", _KILL_AT_SECOND_TRIAL, str(recipe), str(run)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    state = json.loads(next(run.glob(".checkpoints-00-search/search-state.json")).read_text())
    assert [t["index"] for t in state["trials"]] == [0]  # trial 0 judged and saved

    evaluated = record_evaluations(monkeypatch)
    assert main(["run", str(recipe), "-o", str(run), "-q", "--resume"]) == 0
    # Resumed: trial 1 and the final gate's export only; trial 0 and the baseline not again.
    assert len(evaluated) == 2

    record = json.loads((run / "run.json").read_text())
    search, gate = record["stages"][0]["metrics"], record["stages"][2]["metrics"]
    assert search["passed"] is True and search["trials"] == 2 and search["chosen"] == 1
    assert search["moved"] == [PLANTED]
    assert gate["passed"] is True and gate["baseline_cached"] is True
    report = json.loads((run / "stages" / "00-search" / "search" / "search.json").read_text())
    trial0, trial1 = report["trials"]
    assert (
        trial0["passed"] is False
        and trial0["metrics"]["local_greedy_prompts/greedy_agreement"] <= 0.1
    )
    assert trial1["metrics"]["local_greedy_prompts/greedy_agreement"] >= 0.6
    # The planted group stands out by orders of magnitude, not by luck.
    (first, kl1), (_, kl2) = [(r["group"], r["kl"]) for r in report["ranking"][:2]]
    assert first == PLANTED and kl1 > 100 * kl2
    # 16-bit gate/up cost bits: 26 of 28 linears INT8 -> between 8 and 16 bits per weight.
    assert trial0["effective_bits"] == 8.0 and 8.5 < trial1["effective_bits"] < 9.5
    # What ships keeps them unquantized, and the rest INT8.
    config = json.loads((run / "hf_checkpoint" / "config.json").read_text())
    ignored = config["quantization_config"]["ignore"]
    assert {"model.layers.2.mlp.gate_proj", "model.layers.2.mlp.up_proj"} <= set(ignored)
    assert "model.layers.2.mlp.down_proj" not in ignored
    assert "(kept)" in (run / "stages" / "00-search" / "search" / "search.md").read_text()
    assert not list(run.glob(".checkpoints-*"))  # removed once the stage committed


def test_a_budget_of_one_trial_exits_3_with_the_best_candidate(planted, tmp_path, capsys):
    recipe, run = write_recipe(tmp_path, planted, trials=1), tmp_path / "run"
    assert main(["run", str(recipe), "-o", str(run), "-q"]) == 3
    err = capsys.readouterr().err
    assert "search: no trial passed the gate in 1 trial(s); kept the best candidate, trial 0" in err
    assert f"see {run}/stages/00-search/search/search.md" in err
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "gate_failed"
    metrics = record["stages"][0]["metrics"]
    assert metrics["passed"] is False and metrics["trials"] == 1 and metrics["moved"] == []
    out = run / "stages" / "00-search" / "search"
    assert "No trial passed" in (out / "search.md").read_text()
    assert "data:image/png;base64," in (out / "search.html").read_text()  # the front's plot
    assert (run / "hf_checkpoint").is_dir()  # later stages still ran on the best candidate
    assert record["stages"][2]["metrics"]["passed"] is False


def test_layer_groups_follow_shared_inputs(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    path = make_tiny_llama(tmp_path / "m", layers=2)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    groups = [group_name(g) for g in layer_groups(model, torch.ones(1, 8, dtype=torch.long), [])]
    assert groups == [
        f"model.layers.{i}.{g}"
        for i in range(2)
        for g in (
            "self_attn.{q_proj,k_proj,v_proj}",
            "self_attn.o_proj",
            "mlp.{gate_proj,up_proj}",
            "mlp.down_proj",
        )
    ]
    excluded = layer_groups(model, torch.ones(1, 8, dtype=torch.long), ["*layers.0*"])
    assert all(".layers.1." in m for g in excluded for m in g) and len(excluded) == 4


def test_moved_counts_grow_within_the_budget():
    cfg = SearchConfig(format="int4_awq", max_trials=6)
    assert moved_counts(cfg, 100) == [0, 1, 2, 4, 8, 16]
    assert moved_counts(cfg, 5) == [0, 1, 2, 4, 5]  # stops once every group moved
    slow = SearchConfig(format="int4_awq", max_trials=4, first_step=3, growth=1.0)
    assert moved_counts(slow, 100) == [0, 3, 4, 5]
    assert moved_counts(SearchConfig(format="fp8", max_trials=1), 10) == [0]


@pytest.mark.parametrize(
    ("fmt", "algorithm", "fallback", "first"),
    [
        ("int4_awq", None, "fp8", ["model.layers.1.mlp.down_proj"]),
        ("int4_awq", None, "none", ["model.layers.1.mlp.down_proj"]),
        ("int8_sq", None, "none", ["model.layers.1.mlp.down_proj"]),
        # from trial 0 (nothing moved yet), with clipped amaxes that a max pass would undo
        ("int4_awq", "awq_clip", "fp8", []),
    ],
)
def test_moving_groups_onto_the_previous_trial_equals_quantizing_afresh(
    tmp_path, fmt, algorithm, fallback, first
):
    """advance_trial re-calibrates only the newly moved modules of the previous trial; the
    result must be the full re-quantization's, tensor for tensor (weights, amax, pre-quant
    scales): ModelOpt calibrates every layer on the unquantized forward, so the other layers'
    scales do not depend on which layers moved. A wrong reset (AWQ's folded scale left in a
    moved weight, its pre-quant scale kept, stale amax) or a calibration that touched the other
    layers would differ."""
    import torch
    from transformers import AutoModelForCausalLM

    from optimizer.techniques.search import advance_trial, quantize_trial

    path = make_tiny_llama(tmp_path / "model", layers=2, hidden=64, intermediate=128)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, base.config.vocab_size, (2, 16), generator=g) for _ in range(3)]

    def forward_loop(m):
        for b in batches:
            m(b)

    config = SearchConfig(
        format=fmt,
        algorithm=algorithm,
        group_size=32 if "awq" in fmt else None,
        fallback=fallback,
    )
    then = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj",
    ]
    advanced = advance_trial(
        quantize_trial(base, config, first, forward_loop), base, config, then, forward_loop
    )
    fresh = quantize_trial(base, config, first + then, forward_loop)
    a, b = advanced.state_dict(), fresh.state_dict()
    assert sorted(a) == sorted(b)
    differ = [
        k
        for k in a
        if a[k].shape != b[k].shape or not torch.allclose(a[k], b[k], rtol=1e-6, atol=0)
    ]
    assert differ == []
    if fallback == "none":
        assert not advanced.get_submodule(then[0]).weight_quantizer.is_enabled
    else:
        assert advanced.get_submodule(then[0]).weight_quantizer.num_bits == (4, 3)  # FP8 E4M3
    # the base model was left as it was
    assert torch.equal(base.get_submodule(then[0]).weight, fresh.get_submodule(then[0]).weight)
