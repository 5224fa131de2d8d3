"""A corpus of bad ``sparsify`` / ``prune`` / ``qat`` / ``distill`` / ``deploy`` / ``gate``
recipes: each is refused by ``optimize validate`` (exit 2) with one readable message naming
the problem, and ``optimize run`` writes nothing."""

import pytest

from optimizer.cli import main

HEAD = """\
name: bad
model: {{source: {model}}}
calibration: {{dataset: {calib}, num_samples: 8, seq_len: 64}}
stages:
"""
PTQ = "  - ptq: {{format: fp8}}\n"
HF_EXPORT = "  - export: {{trtllm_checkpoint: null, hf_checkpoint: true}}\n"
SPARSIFY = "  - sparsify: {{method: magnitude}}\n"

#: (id, the stages of the recipe (YAML, a template with {model}/{calib}), message fragment)
CASES = [
    (
        "gate-export-without-an-export",
        PTQ + "  - gate: {{suite: quick, evaluate: export}}\n",
        "gate.evaluate: export evaluates the checkpoint an earlier export stage writes",
    ),
    (
        "gate-export-of-a-format-it-cannot-rebuild",
        "  - ptq: {{format: fp8_pc_pt}}\n" + HF_EXPORT + "  - gate: {{suite: quick}}\n",
        "gate.evaluate: the gate evaluates the exported checkpoint, and quant_algo "
        "FP8_PER_CHANNEL_PER_TOKEN cannot be rebuilt",
    ),
    (
        "deploy-version-with-a-newline",
        PTQ
        + HF_EXPORT
        + '  - deploy: {{targets: [{{runtime: vllm, version: "0.16\\ntouch x"}}]}}\n',
        "deploy.targets[0].version:",
    ),
    (
        "deploy-image-with-a-space",
        PTQ + HF_EXPORT + '  - deploy: {{targets: [{{runtime: vllm, image: "--privileged x"}}]}}\n',
        "must be one word, without spaces or newlines",
    ),
    (
        "qat-unknown-key",
        PTQ + "  - qat: {{stepz: 5}}\n",
        "stages[1].qat.stepz: unknown key 'stepz'; did you mean 'steps'?",
    ),
    (
        "qat-steps-and-epochs",
        PTQ + "  - qat: {{steps: 5, epochs: 1}}\n",
        "set steps or epochs, not both",
    ),
    ("qat-steps-0", PTQ + "  - qat: {{steps: 0}}\n", "qat.steps: Input should be greater than 0"),
    (
        "auto-quantize-unknown-cost-model",
        "  - auto_quantize: {{cost_model: tokens}}\n",
        "auto_quantize.cost_model: must be one of: 'auto', 'weight', 'active_moe', not 'tokens'",
    ),
    (
        "auto-quantize-expert-ratio-0",
        "  - auto_quantize: {{active_moe_expert_ratio: 0}}\n",
        "auto_quantize.active_moe_expert_ratio: Input should be greater than 0",
    ),
    (
        "qat-negative-lr",
        PTQ + "  - qat: {{learning_rate: -1.0e-5}}\n",
        "qat.learning_rate: Input should be greater than 0",
    ),
    (
        "qat-warmup-1.5",
        PTQ + "  - qat: {{warmup_ratio: 1.5}}\n",
        "qat.warmup_ratio: Input should be less than 1",
    ),
    (
        "qat-bad-scheduler",
        PTQ + "  - qat: {{lr_scheduler: cosinee}}\n",
        "qat.lr_scheduler: must be one of: 'cosine', 'linear', 'constant', "
        "'constant_with_warmup', not 'cosinee'; did you mean 'cosine'?",
    ),
    (
        "qat-batch-size-0",
        PTQ + "  - qat: {{batch_size: 0}}\n",
        "qat.batch_size: Input should be greater than 0",
    ),
    (
        "qat-seq-len-1",
        PTQ + "  - qat: {{seq_len: 1}}\n",
        "qat.seq_len: Input should be greater than 1",
    ),
    (
        "qat-eval-fraction-0",
        PTQ + "  - qat: {{data: {{eval_fraction: 0}}}}\n",
        "qat.data.eval_fraction: Input should be greater than 0",
    ),
    (
        "qat-eval-fraction-1",
        PTQ + "  - qat: {{data: {{eval_fraction: 1}}}}\n",
        "qat.data.eval_fraction: Input should be less than 1",
    ),
    (
        "qat-missing-dataset-file",
        PTQ + "  - qat: {{data: {{dataset: nope.jsonl}}}}\n",
        "qat.data.dataset: training file not found: nope.jsonl",
    ),
    (
        "qat-data-unknown-key",
        PTQ + "  - qat: {{data: {{datset: x}}}}\n",
        "qat.data.datset: unknown key 'datset'; did you mean 'dataset'?",
    ),
    (
        "qat-teacher-not-none-or-original",
        PTQ + "  - qat: {{teacher: teacher}}\n",
        "qat.teacher: must be one of: 'none', 'original', not 'teacher'",
    ),
    (
        "qat-without-ptq",
        "  - qat: {{steps: 2}}\n",
        "put a ptq (or auto_quantize) stage before it",
    ),
    (
        "qat-after-export",
        PTQ
        + "  - export: {{trtllm_checkpoint: null, hf_checkpoint: true}}\n"
        + "  - qat: {{steps: 2}}\n",
        "'qat' comes after 'export'",
    ),
    (
        "qat-temperature-without-teacher",
        PTQ + "  - qat: {{temperature: 2.0}}\n",
        "qat.temperature: temperature applies only when distilling from a teacher",
    ),
    (
        "qat-loss-weights-without-teacher",
        PTQ + "  - qat: {{temperature: 2.0, ce_weight: 1.0}}\n",
        "ce_weight, temperature apply only when distilling",
    ),
    (
        "qad-temperature-0",
        PTQ + "  - qat: {{teacher: original, temperature: 0}}\n",
        "qat.temperature: Input should be greater than 0",
    ),
    (
        "distill-temperature-0",
        "  - distill: {{temperature: 0}}\n",
        "distill.temperature: Input should be greater than 0",
    ),
    (
        "distill-no-loss-term",
        "  - distill: {{kd_weight: 0, ce_weight: 0}}\n",
        "kd_weight and ce_weight are both 0 and there are no layer_losses",
    ),
    (
        "distill-layer-loss-without-teacher",
        "  - distill: {{layer_losses: [{{student: model.layers.1}}]}}\n",
        "distill.layer_losses[0].teacher: required key is missing",
    ),
    (
        "distill-layer-loss-l1",
        "  - distill: {{layer_losses: [{{student: model.layers.1, teacher: model.layers.1, "
        "loss: l1}}]}}\n",
        "layer_losses[0].loss: must be one of: 'mse', 'cosine', not 'l1'",
    ),
    (
        "distill-missing-teacher-dir",
        "  - distill: {{teacher: ./missing-dir}}\n",
        "distill.teacher: './missing-dir' is neither an existing local directory",
    ),
    (
        "distill-teacher-dir-not-a-checkpoint",
        "  - distill: {{teacher: ./empty-dir}}\n",
        "empty-dir is not a Hugging Face checkpoint directory (no config.json)",
    ),
    (
        "qat-seq-len-beyond-positions",
        PTQ + "  - qat: {{seq_len: 2048}}\n",
        "qat.seq_len: seq_len 2048 exceeds the model's max_position_embeddings (1024)",
    ),
    (
        "qad-layer-loss-beyond-last-layer",
        PTQ + "  - qat: {{teacher: original, layer_losses: [{{student: model.layers.5, "
        "teacher: model.layers.1}}]}}\n",
        "layer_losses[0].student: model.layers.5: the model has 2 layers (0-1)",
    ),
    (
        "distill-teacher-other-vocabulary",
        "  - distill: {{teacher: ./other-vocab}}\n",
        "distill.teacher: the teacher's vocabulary (999 tokens) differs from the student's",
    ),
    (
        "distill-frozen-not-a-list",
        "  - distill: {{frozen: '*embed*'}}\n",
        "distill.frozen: Input should be a valid list",
    ),
    (
        "deploy-without-hf-checkpoint",
        PTQ
        + "  - export: {{trtllm_checkpoint: {{tp: 1}}}}\n"
        + "  - deploy: {{targets: [vllm]}}\n",
        "deploy serves the unified HF checkpoint: put an `export` stage with hf_checkpoint: "
        "true before it",
    ),
    (
        "deploy-unknown-runtime",
        PTQ + HF_EXPORT + "  - deploy: {{targets: [vlm]}}\n",
        "deploy.targets[0].runtime: must be one of: 'trtllm', 'vllm', 'sglang', not 'vlm'; "
        "did you mean 'vllm'?",
    ),
    (
        "deploy-no-targets",
        PTQ + HF_EXPORT + "  - deploy: {{targets: []}}\n",
        "deploy.targets: List should have at least 1 item",
    ),
    (
        "deploy-target-unknown-key",
        PTQ + HF_EXPORT + "  - deploy: {{targets: [{{runtime: vllm, verison: '0.16'}}]}}\n",
        "deploy.targets[0].verison: unknown key 'verison'; did you mean 'version'?",
    ),
    (
        "deploy-version-as-a-number",
        PTQ + HF_EXPORT + "  - deploy: {{targets: [{{runtime: vllm, version: 0.16}}]}}\n",
        "deploy.targets[0].version: write the version in quotes, e.g. '0.16'",
    ),
    (
        "deploy-version-before-modelopt-support",
        PTQ + HF_EXPORT + "  - deploy: {{targets: [{{runtime: vllm, version: '0.5'}}]}}\n",
        "deploy.targets[0].version: vLLM 0.5 predates ModelOpt checkpoint support in this "
        "table (the first listed is 0.6)",
    ),
    (
        "deploy-int4-awq-on-vllm",
        "  - ptq: {{format: int4_awq}}\n" + HF_EXPORT + "  - deploy: {{targets: [vllm]}}\n",
        "deploy.targets[0]: vLLM 0.16 cannot load a ModelOpt W4A16_AWQ checkpoint",
    ),
    (
        "deploy-int8-sq-on-trtllm",
        "  - ptq: {{format: int8_sq}}\n" + HF_EXPORT + "  - deploy: {{targets: [trtllm]}}\n",
        "TensorRT-LLM 1.3 cannot load a ModelOpt W8A8_SQ_PER_CHANNEL checkpoint",
    ),
    (
        "deploy-runtime-twice",
        PTQ + HF_EXPORT + "  - deploy: {{targets: [vllm, {{runtime: vllm, version: '0.9'}}]}}\n",
        "deploy.targets[1]: vllm is listed twice (also targets[0])",
    ),
    (
        "deploy-kv-cache-fraction-1.5",
        PTQ + HF_EXPORT + "  - deploy: {{targets: [vllm], kv_cache_fraction: 1.5}}\n",
        "deploy.kv_cache_fraction: Input should be less than or equal to 1",
    ),
    (
        "deploy-tp-3",
        PTQ + HF_EXPORT + "  - deploy: {{targets: [trtllm], tp: 3}}\n",
        "deploy.tp: tp=3 does not divide the model's 4 attention heads",
    ),
    (
        "deploy-max-seq-len-beyond-positions",
        PTQ + HF_EXPORT + "  - deploy: {{targets: [sglang], max_seq_len: 4096}}\n",
        "deploy.max_seq_len: 4096 exceeds the model's max_position_embeddings 1024",
    ),
]

#: sparsify (the stage itself: tests/stages/test_sparsify.py).
SPARSIFY_CASES = [
    (
        "sparsify-unknown-key",
        "  - sparsify: {{methd: magnitude}}\n",
        "stages[0].sparsify.methd: unknown key 'methd'; did you mean 'method'?",
    ),
    (
        "sparsify-bad-method",
        "  - sparsify: {{method: wanda}}\n",
        "sparsify.method: must be one of: 'sparsegpt', 'magnitude', not 'wanda'",
    ),
    (
        "sparsify-bad-pattern",
        "  - sparsify: {{pattern: '4:8'}}\n",
        "sparsify.pattern: must be one of: '2:4', not '4:8'",
    ),
    (
        "sparsify-after-ptq",
        PTQ + SPARSIFY,
        "stages[1].sparsify: sparsify comes after a quantizing stage (format fp8)",
    ),
    (
        "sparsify-twice",
        SPARSIFY + SPARSIFY,
        "stages[1].sparsify: the model is already 2:4 sparse",
    ),
    (
        "sparsify-exclusion-matching-nothing",
        "  - sparsify: {{method: magnitude, exclude: ['*layers.7.*']}}\n",
        "sparsify.exclude: '*layers.7.*' matches no linear layer of the model",
    ),
    (
        "sparsify-excluding-everything",
        "  - sparsify: {{method: magnitude, exclude: ['model.*']}}\n",
        "sparsify.exclude: leaves no linear layer to sparsify",
    ),
    (
        "sparsify-exclude-not-a-list",
        "  - sparsify: {{exclude: '*layers.0.*'}}\n",
        "sparsify.exclude: Input should be a valid list",
    ),
    (
        "sparsify-after-export",
        "  - export: {{trtllm_checkpoint: null, hf_checkpoint: true}}\n" + SPARSIFY,
        "'sparsify' comes after 'export'",
    ),
]

#: prune (the stage itself: tests/stages/test_prune.py). The tiny Llama: hidden 128, MLP 256,
#: 2 layers, 4 query heads in 2 KV groups.
PRUNE_CASES = [
    (
        "prune-unknown-key",
        "  - prune: {{hiden_size: 64}}\n",
        "stages[0].prune.hiden_size: unknown key 'hiden_size'; did you mean 'hidden_size'?",
    ),
    ("prune-no-target", "  - prune: {{}}\n", "set a target: params_fraction, or one of"),
    (
        "prune-hidden-larger-than-the-model",
        "  - prune: {{hidden_size: 256}}\n",
        "prune.hidden_size: hidden_size 256 is larger than the model's hidden_size (128); "
        "pruning only removes",
    ),
    (
        "prune-more-layers-than-the-model",
        "  - prune: {{num_layers: 3}}\n",
        "prune.num_layers: num_layers 3 is larger than the model's num_hidden_layers (2)",
    ),
    (
        "prune-heads-not-a-multiple-of-kv-heads",
        "  - prune: {{num_attention_heads: 3}}\n",
        "prune.num_attention_heads: num_attention_heads 3 is not a multiple of the 2 KV heads",
    ),
    (
        "prune-heads-moved-between-groups",
        "  - prune: {{num_key_value_heads: 1, num_attention_heads: 4}}\n",
        "4 query heads over 1 KV heads would be 4 per KV group, more than the model's 2",
    ),
    (
        "prune-params-fraction-1.5",
        "  - prune: {{params_fraction: 1.5}}\n",
        "prune.params_fraction: Input should be less than 1",
    ),
    (
        "prune-params-fraction-out-of-reach",
        "  - prune: {{params_fraction: 0.3}}\n",
        "prune.params_fraction: params_fraction 0.3 is out of reach",
    ),
    (
        "prune-search-unknown-axis",
        "  - prune: {{params_fraction: 0.8, search: [heads]}}\n",
        "prune.search[0]: must be one of: 'ffn_hidden_size', 'hidden_size', "
        "'num_attention_heads', 'num_layers', not 'heads'",
    ),
    (
        "prune-search-without-params-fraction",
        "  - prune: {{hidden_size: 64, search: [hidden_size]}}\n",
        "search applies only with params_fraction",
    ),
    (
        "prune-after-ptq",
        PTQ + "  - prune: {{hidden_size: 64}}\n",
        "'prune' comes after a quantizing stage (format fp8)",
    ),
    (
        "prune-after-export",
        HF_EXPORT + "  - prune: {{hidden_size: 64}}\n",
        "'prune' comes after 'export'",
    ),
    (
        "prune-nothing",
        "  - prune: {{hidden_size: 128, num_layers: 2}}\n",
        "prunes nothing: every target equals the model's size",
    ),
    (
        "prune-then-tp-beyond-the-pruned-heads",
        "  - prune: {{num_attention_heads: 2}}\n  - export: {{trtllm_checkpoint: {{tp: 4}}}}\n",
        "tp=4 does not divide the model's 2 attention heads",
    ),
    (
        "prune-then-int4-blocks-beyond-the-pruned-hidden-size",
        "  - prune: {{hidden_size: 96}}\n  - ptq: {{format: int4_awq, group_size: 64}}\n",
        "do not divide the model's hidden_size (q/k/v, gate/up inputs) = 96",
    ),
    (
        "prune-then-layer-loss-beyond-the-kept-layers",
        "  - prune: {{num_layers: 1}}\n"
        "  - distill: {{layer_losses: [{{student: model.layers.1, teacher: model.layers.1}}]}}\n",
        "distill.layer_losses[0].student: model.layers.1: the model has 1 layers (0-0)",
    ),
]

SPECULATIVE = "  - speculative: {{steps: 2}}\n"
SPECULATIVE_CASES = [
    (
        "speculative-unknown-key",
        "  - speculative: {{methd: eagle3}}\n",
        "stages[0].speculative.methd: unknown key 'methd'; did you mean 'method'?",
    ),
    (
        "speculative-bad-method",
        "  - speculative: {{method: lookahead}}\n",
        "speculative.method: must be one of: 'eagle3', 'medusa', 'draft_target', not 'lookahead'",
    ),
    (
        "speculative-draft-len-0",
        "  - speculative: {{draft_len: 0}}\n",
        "speculative.draft_len: Input should be greater than or equal to 1",
    ),
    (
        "speculative-min-acceptance-below-1",
        "  - speculative: {{min_acceptance_length: 0.5}}\n",
        "speculative.min_acceptance_length: Input should be greater than or equal to 1",
    ),
    (
        "speculative-draft-target-without-draft-model",
        "  - speculative: {{method: draft_target}}\n",
        "speculative.draft_model: method draft_target needs a draft_model",
    ),
    (
        "speculative-draft-target-with-training",
        "  - speculative: {{method: draft_target, draft_model: {model}, steps: 10}}\n",
        "speculative.steps: steps: draft_target trains nothing",
    ),
    (
        "speculative-draft-model-other-vocabulary",
        "  - speculative: {{method: draft_target, draft_model: ./other-vocab}}\n",
        "speculative.draft_model: the draft's vocabulary (999 tokens) differs from the model's",
    ),
    (
        "speculative-draft-model-for-eagle3",
        "  - speculative: {{draft_model: {model}}}\n",
        "speculative.draft_model: draft_model: only for method draft_target",
    ),
    (
        "speculative-medusa-field-for-eagle3",
        "  - speculative: {{medusa_heads: 3}}\n",
        "speculative.medusa_heads: medusa_heads: only for method medusa",
    ),
    (
        "speculative-too-few-medusa-heads",
        "  - speculative: {{method: medusa, medusa_heads: 2, draft_len: 4}}\n",
        "speculative.medusa_heads: 2 Medusa heads draft at most 2 tokens, not draft_len 4",
    ),
    (
        "speculative-medusa-heads-below-a-measured-length",
        "  - speculative: {{method: medusa, draft_len: 3, acceptance: {{draft_lens: [5]}}}}\n",
        "speculative.medusa_heads: 3 Medusa heads draft at most 3 tokens, not "
        "acceptance.draft_lens 5",
    ),
    (
        "speculative-compile-for-medusa",
        "  - speculative: {{method: medusa, compile: true}}\n",
        "speculative.compile: compile: only for method eagle3",
    ),
    (
        "speculative-measured-length-zero",
        "  - speculative: {{acceptance: {{draft_lens: [0]}}}}\n",
        "speculative.acceptance.draft_lens[0]: Input should be greater than or equal to 1",
    ),
    (
        "speculative-aux-layer-out-of-range",
        "  - speculative: {{aux_layer_ids: [0, 9]}}\n",
        "speculative.aux_layer_ids: layer 9: the model has 2 (0-1)",
    ),
    (
        "speculative-head-after-ptq",
        PTQ + SPECULATIVE,
        "stages[1].speculative.method: a eagle3 head must be trained before the model is quantized",
    ),
    (
        "speculative-twice",
        SPECULATIVE + SPECULATIVE,
        "stages[1].speculative: an earlier stage already gives the model a eagle3 draft",
    ),
    (
        "speculative-eagle3-into-an-engine",
        SPECULATIVE
        + PTQ
        + "  - export: {{trtllm_checkpoint: {{tp: 1, pp: 1}}}}\n"
        + "  - build: {{max_batch_size: 8, max_input_len: 256, max_seq_len: 512, "
        "max_num_tokens: 1024}}\n",
        "stages[3].build: the eagle3 draft is not built into TensorRT-LLM <= 1.2 engines",
    ),
    (
        "speculative-medusa-on-vllm",
        "  - speculative: {{method: medusa, draft_len: 3}}\n"
        + HF_EXPORT
        + "  - deploy: {{targets: [vllm]}}\n",
        "vLLM 0.16 is not given Medusa heads here",
    ),
]

#: Recipe values that would become options of `docker run`.
IMAGE_CASES = [
    (
        "build-image-as-docker-option",
        PTQ
        + "  - export: {{trtllm_checkpoint: {{tp: 1, pp: 1}}}}\n"
        + "  - build: {{launcher: docker, image: '--privileged', max_batch_size: 8, "
        "max_input_len: 256, max_seq_len: 512, max_num_tokens: 1024}}\n",
        "stages[2].build.image: image '--privileged' starts with '-' and would be read as a "
        "docker run option",
    ),
    (
        "deploy-image-not-a-reference",
        PTQ + HF_EXPORT + "  - deploy: {{targets: [{{runtime: vllm, image: 'UPPER/Case:x'}}]}}\n",
        "stages[2].deploy.targets[0].image: image 'UPPER/Case:x' is not a container image "
        "reference",
    ),
]

#: The ``search`` stage: its candidate, fallback, budget and suite.
SEARCH_CASES = [
    (
        "search-without-format",
        "  - search: {{modelopt_recipe: general/ptq/fp8_default-kv_fp8, suite: quick}}\n",
        "search needs `format` (a simple name), not a modelopt_recipe",
    ),
    (
        "search-fallback-lower-than-format",
        "  - search: {{format: fp8, fallback: int4_awq, suite: quick}}\n",
        "fallback int4_awq keeps no more bits than fp8",
    ),
    (
        "search-fallback-calibrated-otherwise",
        "  - search: {{format: int4_awq, fallback: int8_sq, suite: quick}}\n",
        "fallback int8_sq calibrates with smoothquant, which would re-calibrate the whole model",
    ),
    (
        "search-fallback-is-the-format",
        "  - search: {{format: fp8, fallback: fp8, suite: quick}}\n",
        "fallback is the candidate format itself",
    ),
    (
        "search-unmixable-fallback",
        "  - search: {{format: int4_awq, fallback: int8_wo, suite: quick}}\n",
        "search.fallback: int8_wo cannot be mixed per layer in one TensorRT-LLM checkpoint",
    ),
    (
        "search-zero-trials",
        "  - search: {{format: fp8, suite: quick, max_trials: 0}}\n",
        "search.max_trials: Input should be greater than or equal to 1",
    ),
    (
        "search-growth-below-one",
        "  - search: {{format: fp8, suite: quick, growth: 0.5}}\n",
        "search.growth: Input should be greater than or equal to 1",
    ),
    (
        "search-unknown-suite",
        "  - search: {{format: fp8, suite: no-such-suite}}\n",
        "search.suite:",
    ),
    (
        "search-after-ptq",
        PTQ + "  - search: {{format: int4_awq, suite: quick}}\n",
        "the model is already quantized by an earlier stage (format fp8)",
    ),
    (
        "search-group-size-not-dividing",
        "  - search: {{format: int4_awq, group_size: 100, suite: quick}}\n",
        "search.group_size:",
    ),
    (
        "search-format-whose-export-cannot-be-rebuilt",
        "  - search: {{format: fp8_pc_pt, suite: quick}}\n",
        "search.format: the search judges each trial's unified HF export, and quant_algo "
        "FP8_PER_CHANNEL_PER_TOKEN cannot be rebuilt",
    ),
    (
        "search-unknown-key",
        "  - search: {{format: fp8, suite: quick, max_trial: 3}}\n",
        "did you mean 'max_trials'?",
    ),
]

CASES += SPARSIFY_CASES + PRUNE_CASES + SPECULATIVE_CASES + IMAGE_CASES + SEARCH_CASES

#: Cases also run through ``optimize run -o DIR``: refused before the run directory exists.
RUN_CASES = {
    "qat-steps-0",
    "qat-missing-dataset-file",
    "qat-without-ptq",
    "distill-missing-teacher-dir",
    "deploy-int4-awq-on-vllm",
    "sparsify-after-ptq",
    "prune-hidden-larger-than-the-model",
    "prune-after-ptq",
    "speculative-head-after-ptq",
    "search-after-ptq",
    "search-unmixable-fallback",
}


@pytest.fixture
def bad_recipe(write_recipe, tmp_path):
    def write(stages: str):
        (tmp_path / "empty-dir").mkdir(exist_ok=True)
        other = tmp_path / "other-vocab"
        other.mkdir(exist_ok=True)
        (other / "config.json").write_text('{"model_type": "llama", "vocab_size": 999}')
        return write_recipe(HEAD + stages, name="bad.yaml")

    return write


def assert_one_clear_error(err: str, fragment: str) -> None:
    assert fragment in err, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert fragment in errors[0]


@pytest.mark.parametrize(("case", "stages", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_validate_refuses_with_one_clear_message(case, stages, fragment, bad_recipe, capsys):
    path = bad_recipe(stages)
    assert main(["validate", str(path)]) == 2
    out, err = capsys.readouterr()
    assert_one_clear_error(err, fragment)
    assert str(path) in err  # the message names the file (and line)


@pytest.mark.parametrize(
    ("case", "stages", "fragment"),
    [c for c in CASES if c[0] in RUN_CASES],
    ids=[c[0] for c in CASES if c[0] in RUN_CASES],
)
def test_run_refuses_before_writing_anything(case, stages, fragment, bad_recipe, tmp_path, capsys):
    path = bad_recipe(stages)
    run_dir = tmp_path / "run"
    assert main(["run", str(path), "-o", str(run_dir), "-q"]) == 2
    _, err = capsys.readouterr()
    assert_one_clear_error(err, fragment)
    assert not run_dir.exists()


def test_the_corpus_recipes_differ_from_a_valid_one_only_in_the_bad_field(bad_recipe, capsys):
    """The base of the corpus is valid: each case fails for its own reason alone."""
    ok = bad_recipe(PTQ + "  - qat: {{steps: 2, teacher: original, temperature: 2.0}}\n")
    assert main(["validate", str(ok)]) == 0
    ok = bad_recipe(
        "  - distill: {{steps: 2, kd_weight: 0, ce_weight: 1.0, frozen: ['*embed*']}}\n"
    )
    assert main(["validate", str(ok)]) == 0
    capsys.readouterr()


def test_fsdp_is_refused_for_a_machine_without_gpus(bad_recipe, capsys):
    recipe = bad_recipe(PTQ + "  - qat: {{fsdp: true}}\n")
    assert main(["validate", str(recipe), "--device", "cpu"]) == 2
    assert_one_clear_error(
        capsys.readouterr().err, "qat.fsdp: fsdp: true needs a CUDA GPU per process"
    )
    assert main(["validate", str(recipe), "--device", "gpu"]) == 0
