"""speculative: draft heads trained, measured and exported from the recipe, on a tiny Llama.
The EAGLE-3 draft lands in draft/ with the layout TensorRT-LLM / vLLM / SGLang load and the
deploy stage serves it with the trained draft length; the model handed on stays plain; a
draft-target draft that is the model itself accepts everything, an unrelated one fails the
acceptance gate (exit 3, artifacts kept); Medusa heads become a TensorRT-LLM Medusa checkpoint
that the build stage builds with the Medusa flags; a run killed after the stage resumes
without retraining, to identical artifacts."""

import json
import signal

import pytest
import yaml
from safetensors import safe_open
from tiny import REPO, make_tiny_llama, run_killed_at, run_tiny_recipe

from optimizer.rundir import sha256_tree

DOUBLE = REPO / "tests" / "doubles" / "trtllm-build"
TRAIN = "steps: 3, batch_size: 2, seq_len: 32, learning_rate: 0.01, data: {eval_fraction: 0.1}"
ACCEPT = "acceptance: {num_prompts: 2, max_new_tokens: 8}"
EXPORT = "export: {trtllm_checkpoint: null, hf_checkpoint: true}"


def record(run_dir):
    return json.loads((run_dir / "run.json").read_text())


def test_eagle3_draft_is_trained_measured_exported_and_deployed(tiny_llama, tmp_path):
    stages = [
        f"speculative: {{draft_len: 4, {TRAIN}, "
        "acceptance: {num_prompts: 2, max_new_tokens: 8, draft_lens: [2]}, "
        "generate: {max_new_tokens: 8, num_prompts: 6, batch_size: 3}}",
        "ptq: {format: fp8}",
        EXPORT,
        "deploy: {targets: [trtllm, {runtime: vllm, version: '0.16'}]}",
    ]
    assert run_tiny_recipe(tmp_path, tiny_llama, stages) == 0
    run_dir = tmp_path / "run"
    rec = record(run_dir)
    spec = rec["stages"][0]["metrics"]
    assert rec["artifacts"]["draft"] == str(run_dir / "draft")
    # trained on 6 generated conversations (the held-out split is the data's)
    assert spec["training"]["data"]["train_documents"] == 6
    assert spec["training"]["steps"] == 3 and "draft_head" in spec["training"]
    acc = spec["acceptance"]
    assert acc["draft_len"] == 4 and acc["prompts"] == 2 and acc["matches_greedy"] is True
    # tokens per step = 1 + accepted drafts, and E[accepted] = sum_i P(draft i accepted)
    assert len(acc["acceptance_rate_by_position"]) == 4
    assert acc["mean_acceptance_length"] == pytest.approx(
        1 + sum(acc["acceptance_rate_by_position"]), abs=1e-3
    )
    rates = acc["acceptance_rate_by_position"]
    assert rates == sorted(rates, reverse=True)  # a later draft needs the earlier ones
    # the further length, on the same prompts with the same head
    by_len = spec["acceptance_by_draft_len"]
    assert sorted(by_len) == ["2", "4"] and by_len["4"] == acc
    two = by_len["2"]
    assert two["prompts"] == 2 and two["matches_greedy"] is True
    assert two["mean_acceptance_length"] == pytest.approx(
        1 + sum(two["acceptance_rate_by_position"]), abs=1e-3
    )
    assert len(two["acceptance_rate_by_position"]) == 2
    # the EAGLE-3 draft checkpoint, in the recipe's dtype
    config = json.loads((run_dir / "draft" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["torch_dtype"] == "bfloat16" and config["hidden_size"] == 128
    with safe_open(run_dir / "draft" / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("fc.weight").shape == (128, 2 * 128)  # two aux layers
    assert {"fc.weight", "norm.weight", "lm_head.weight"} <= names
    assert "layers.0.self_attn.q_proj.weight" in names
    # the model handed on (quantized, exported) has no draft tensors
    with safe_open(next((run_dir / "hf_checkpoint").glob("*.safetensors")), "pt") as f:
        assert not [n for n in f.keys() if "eagle" in n]  # noqa: SIM118
    # deploy serves the draft with the trained draft length
    options = yaml.safe_load(
        (run_dir / "deploy" / "trtllm" / "extra_llm_api_options.yaml").read_text()
    )
    assert options["speculative_config"] == {
        "decoding_type": "Eagle3",
        "max_draft_len": 4,
        "speculative_model_dir": str(run_dir / "draft"),
    }
    serve = (run_dir / "deploy" / "vllm" / "serve.sh").read_text()
    assert '"method":"eagle3"' in serve and '"num_speculative_tokens":4' in serve


def test_draft_target_accepts_everything_from_the_model_itself(tiny_llama, tmp_path):
    stage = (
        f"speculative: {{method: draft_target, draft_model: {tiny_llama}, draft_len: 3, {ACCEPT}}}"
    )
    assert (
        run_tiny_recipe(tmp_path, tiny_llama, [stage, EXPORT, "deploy: {targets: [trtllm]}"]) == 0
    )
    run_dir = tmp_path / "run"
    acc = record(run_dir)["stages"][0]["metrics"]["acceptance"]
    assert acc["mean_acceptance_length"] == 4.0
    assert acc["acceptance_rate_by_position"] == [1.0, 1.0, 1.0]
    assert json.loads((run_dir / "draft" / "config.json").read_text())["hidden_size"] == 128
    options = yaml.safe_load(
        (run_dir / "deploy" / "trtllm" / "extra_llm_api_options.yaml").read_text()
    )
    assert options["speculative_config"]["decoding_type"] == "DraftTarget"


def test_an_unrelated_draft_fails_the_acceptance_gate_with_exit_3(tiny_llama, tmp_path):
    other = make_tiny_llama(tmp_path / "other", seed=7)
    stage = (
        f"speculative: {{method: draft_target, draft_model: {other}, draft_len: 3, {ACCEPT}, "
        "min_acceptance_length: 2.0}"
    )
    assert run_tiny_recipe(tmp_path, tiny_llama, [stage]) == 3
    rec = record(tmp_path / "run")
    assert rec["status"] == "gate_failed"
    assert rec["stages"][0]["metrics"]["acceptance"]["mean_acceptance_length"] < 2.0
    assert (tmp_path / "run" / "draft" / "config.json").is_file()  # kept for inspection


def test_medusa_heads_build_into_a_medusa_engine(tiny_llama, tmp_path):
    build = (
        f"build: {{launcher: local, trtllm_build: {DOUBLE}, python: {DOUBLE}, max_batch_size: 8, "
        "max_input_len: 256, max_seq_len: 512, max_num_tokens: 1024, timeout_s: 60}"
    )
    medusa = f"speculative: {{method: medusa, draft_len: 3, {TRAIN}, {ACCEPT}}}"
    assert run_tiny_recipe(tmp_path, tiny_llama, [medusa, build]) == 0
    run_dir = tmp_path / "run"
    config = json.loads((run_dir / "trtllm_checkpoint" / "config.json").read_text())
    assert config["architecture"] == "MedusaForCausalLM"
    assert (config["num_medusa_heads"], config["max_draft_len"]) == (3, 3)
    assert config["base_architecture"] == "LlamaForCausalLM"
    build_rec = record(run_dir)["stages"][1]["metrics"]
    cmd = build_rec["command"]
    assert cmd[cmd.index("--speculative_decoding_mode") + 1] == "medusa"
    assert cmd[cmd.index("--max_draft_len") + 1] == "3"
    engine = json.loads((run_dir / "engine" / "config.json").read_text())
    assert engine["build_config"]["speculative_decoding_mode"] == "medusa"


def test_killed_after_the_stage_resumes_without_retraining(tiny_llama, tmp_path):
    (tmp_path / "ref").mkdir()
    stages = [f"speculative: {{draft_len: 3, {TRAIN}, {ACCEPT}}}", "ptq: {format: fp8}", EXPORT]
    # the uninterrupted reference run (it also writes ref/recipe.yaml)
    assert run_tiny_recipe(tmp_path / "ref", tiny_llama, stages) == 0
    ref = tmp_path / "ref" / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((tmp_path / "ref" / "recipe.yaml").read_text())
    run_dir = tmp_path / "run"
    proc = run_killed_at(recipe, run_dir, "optimizer.stages.ptq:PTQ")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (run_dir / "draft" / "config.json").is_file()
    from optimizer.cli import main

    assert main(["run", str(recipe), "-o", str(run_dir), "-q", "--resume"]) == 0
    rec = record(run_dir)
    assert [s["status"] for s in rec["stages"]] == ["skipped", "success", "success"]
    # training is seeded and the export deterministic: the same draft, the same checkpoint
    assert sha256_tree(run_dir / "draft") == sha256_tree(ref / "draft")
    assert sha256_tree(run_dir / "hf_checkpoint") == sha256_tree(ref / "hf_checkpoint")


def test_outputs_that_left_greedy_fail_in_float32_and_warn_in_bf16():
    from optimizer.errors import OptimizerError
    from optimizer.stages.speculative import greedy_mismatches
    from optimizer.techniques.speculation import AcceptanceReport

    def report(k, matching):
        return AcceptanceReport(
            draft_len=k,
            prompts=32,
            steps=10,
            generated_tokens=40,
            mean_acceptance_length=2.0,
            acceptance_rate_by_position=[0.5] * k,
            matches_greedy=matching == 32,
            prompts_matching_greedy=matching,
        )

    exact = {5: report(5, 32), 3: report(3, 32)}
    assert greedy_mismatches(exact, "float32") == greedy_mismatches(exact, "bfloat16") == []
    flipped = {5: report(5, 19), 3: report(3, 32)}
    with pytest.raises(OptimizerError, match=r"in float32 \(draft_len 5\)"):
        greedy_mismatches(flipped, "float32")
    (warning,) = greedy_mismatches(flipped, "bfloat16")
    assert warning.startswith(
        "draft_len 5: 19 of 32 generations equal plain greedy decoding in bfloat16"
    )
