"""Tiny randomly initialised Llamas for fast, deterministic unit tests."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: The shipped calibration set (package data; recipes name it `python-docs`).
CALIBRATION = REPO / "optimizer" / "resources" / "calibration" / "python-docs.jsonl"


TINY_FP8_RECIPE = """\
name: tiny-fp8
model:
  source: {model}
  dtype: bfloat16
calibration:
  dataset: {calib}
  num_samples: 8
  seq_len: 64
  batch_size: 4
stages:
  - ptq:
      format: fp8
  - export:
      trtllm_checkpoint: {{tp: 1, pp: 1}}
      hf_checkpoint: true
"""

#: The resolved ptq section of TINY_FP8_RECIPE: every default filled in.
TINY_PTQ_RESOLVED = {
    "ptq": {
        "format": "fp8",
        "modelopt_recipe": None,
        "algorithm": None,
        "group_size": None,
        "kv_cache": "none",
        "exclude": [],
    }
}


def make_tokenizer(vocab_size: int = 512):
    """A small byte-level BPE trained on the shipped calibration text (deterministic)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in CALIBRATION.read_text().splitlines()[:200]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def make_tiny_llama(
    path: Path,
    *,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 256,
    seed: int = 0,
    rope_parameters: dict | None = None,
) -> Path:
    """Save a random Llama (bf16 safetensors + tokenizer) as a local HF checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0},
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run_tiny_recipe(
    directory: Path,
    model: Path,
    stages: list[str],
    *,
    num_samples: int = 2,
    seq_len: int = 32,
    batch_size: int = 8,
    extra: tuple[str, ...] = (),
) -> int:
    """Write ``directory/recipe.yaml`` running ``stages`` (YAML flow mappings such as
    ``"ptq: {format: fp8}"``) on ``model`` and run it into ``directory/run``; the exit code."""
    from optimizer.cli import main

    recipe = directory / "recipe.yaml"
    recipe.write_text(
        f"name: tiny\nmodel: {{source: {model}}}\n"
        f"calibration: {{dataset: {CALIBRATION}, num_samples: {num_samples}, seq_len: {seq_len}, "
        f"batch_size: {batch_size}}}\nstages:\n" + "".join(f"  - {s}\n" for s in stages)
    )
    return main(["run", str(recipe), "-o", str(directory / "run"), "-q", *extra])


def record_evaluations(monkeypatch) -> list[tuple[int, int]]:
    """Spy on the harness: per evaluated model, (ModelOpt input quantizers enabled, linears
    with a forward pre-hook: the rebuilt export's activation fake-quant)."""
    import torch

    from optimizer.evaluation import harness

    evaluated: list[tuple[int, int]] = []
    original = harness.score_suite

    def spy(target, suite, **kwargs):
        model, _ = target
        evaluated.append(
            (
                sum(
                    getattr(getattr(m, "input_quantizer", None), "is_enabled", False)
                    for m in model.modules()
                ),
                sum(
                    bool(m._forward_pre_hooks)
                    for m in model.modules()
                    if isinstance(m, torch.nn.Linear)
                ),
            )
        )
        return original(target, suite, **kwargs)

    monkeypatch.setattr(harness, "score_suite", spy)
    return evaluated


#: A run whose stage ``sys.argv[3]`` ("module:Class") dies by SIGKILL as it starts: the
#: stages before it have committed, nothing cleans up (as an OOM kill).
_KILL_AT_STAGE = """
import importlib, os, signal, sys
from optimizer.cli import main
module, name = sys.argv[3].split(":")
def die(self, ctx):
    os.kill(os.getpid(), signal.SIGKILL)
setattr(getattr(importlib.import_module(module), name), "run", die)
sys.exit(main(["run", sys.argv[1], "-o", sys.argv[2], "-q"]))
"""


def run_killed_at(recipe: Path, run_dir: Path, stage: str):
    """``optimize run recipe -o run_dir`` in a subprocess killed when ``stage`` (e.g.
    "optimizer.stages.ptq:PTQ") starts; returns the CompletedProcess."""
    import os
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-c", _KILL_AT_STAGE, str(recipe), str(run_dir), stage],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )


#: Tiny configs of every family in optimizer/architectures.py (transformers 5 defaults that
#: do not fit a 64-wide model are overridden: Mistral's and Qwen3's head_dim 128, Gemma's
#: 256, Qwen3-MoE's 8 experts per token).
FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"head_dim": 16, "sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "gemma2": (
        "Gemma2Config",
        {"head_dim": 16, "sliding_window": 64, "query_pre_attn_scalar": 16},
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        {
            "head_dim": 16,
            "sliding_window": 64,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    "phi3": ("Phi3Config", {}),
    "mixtral": (
        "MixtralConfig",
        {"head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {
            "head_dim": 16,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        },
    ),
}


def make_tiny_family(path: Path, model_type: str, seed: int = 0) -> Path:
    """Save a random 2-layer model of ``model_type`` (bf16 safetensors + tokenizer)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    cls, extra = FAMILY_CONFIGS[model_type]
    config = getattr(transformers, cls)(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **extra,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.config.architectures = [type(model).__name__]  # (from_config leaves it unset)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def plant_a_dead_expert(src: Path, out: Path, expert: int = 3) -> Path:
    """A copy of a tiny MoE whose router never picks ``expert``: every token's hidden state
    gets a large constant component (embedding column 0), and the expert's router row
    points against it."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from optimizer.techniques.moe import routers

    shutil.copytree(src, out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 10.0
        for router in routers(model).values():
            router.weight[:, 0] = 0.0  # the other experts ignore the constant component
            router.weight[expert, 0] = -100.0
    model.to(torch.bfloat16).save_pretrained(out)
    return out


#: An 8-document ARC-Easy suite whose threshold admits anything: for runs on random tiny
#: models, where the gate's job is to run, not to judge.
TINY_SUITE = """\
name: tiny
limit: 8
tasks:
  - {task: local_arc_easy, metric: acc}
thresholds:
  default: {max_drop: 1.0}
"""
