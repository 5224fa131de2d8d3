"""The pipeline's work done by hand: what a user writes with ModelOpt, transformers and lm-eval
alone (the "bare" side of bench/pipeline_vs_bare.py, run there in a fresh process).

  load the model -> calibration windows -> mtq.quantize(model, FP8_DEFAULT_CFG, forward_loop)
  -> lm-eval on the quantized model -> export_tensorrt_llm_checkpoint -> export_hf_checkpoint
  -> lm-eval on the bf16 model

The one project import is ``optimizer.calibration.tokenize`` (pure Python + torch), so that
the calibration windows are the pipeline's to the token (the bench compares their sha256).
Everything else is the libraries' public API with their defaults, except where the
pipeline's settings are matched on purpose: lm-eval batch 16 and max_length 2048 (the
suite's), the offline task definitions of optimizer/resources/evals, and no indexing of
lm-eval's own task catalogue (``include_defaults=False``, as the pipeline does).
Writes its phases (seconds, peak GPU memory per phase) as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "probe"))
import phase_probe  # noqa: E402  (stdlib only)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True, help="export directories go here")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--calib", type=Path, required=True, help="a .jsonl with a text field")
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--task", default="local_arc_easy")
    ap.add_argument("--tasks-dir", type=Path, required=True)
    ap.add_argument("--gate-limit", type=int, default=400, help="documents; 0: no evaluation")
    ap.add_argument("--eval-batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--max-memory-gpu", help="accelerate max_memory per GPU, e.g. 7GiB")
    ap.add_argument("--max-memory-cpu")
    ap.add_argument("--no-trtllm", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    phases = phase_probe.Phases()
    info: dict = {"errors": {}}
    phases.extra = info

    try:
        run(args, phases, info)
    except Exception as e:  # recorded; the parent reports it
        info["errors"]["fatal"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    phases.write(str(args.out))
    return 1 if "fatal" in info["errors"] else 0


def param_counts(model) -> dict:
    """Parameters (each once), the input embedding's, the output layer's, and whether the two
    are tied: what the FLOPs of a forward pass are counted from."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "embedding": embedding.numel(),
        "lm_head": head.weight.numel() if head is not None else 0,
        "tied": head is not None and head.weight is embedding,
    }


def run(args, phases: phase_probe.Phases, info: dict) -> None:
    with phases.span("imports"):
        import lm_eval
        import lm_eval.models.huggingface
        import modelopt.torch.quantization as mtq
        import torch
        import transformers

    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from modelopt.torch.export import export_hf_checkpoint, export_tensorrt_llm_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimizer.calibration import tokenize  # the pipeline's windows, to the token

    cuda = torch.cuda.is_available()
    dtype = getattr(torch, args.dtype)
    info["cuda"] = cuda
    info["torch_cuda"] = torch.version.cuda
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["gpu_total_memory"] = props.total_memory
    info["versions"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None,
    }

    load_kwargs: dict = {"dtype": dtype}
    if cuda:
        load_kwargs["device_map"] = "auto"
        if args.max_memory_gpu:
            load_kwargs["max_memory"] = {
                **{i: args.max_memory_gpu for i in range(torch.cuda.device_count())},
                **({"cpu": args.max_memory_cpu} if args.max_memory_cpu else {}),
            }

    def load(role: str):
        with phases.span("load", role=role):
            model = AutoModelForCausalLM.from_pretrained(args.model, **load_kwargs).eval()
            tokenizer = AutoTokenizer.from_pretrained(args.model)
        return model, tokenizer

    model, tokenizer = load("model")
    info["params"] = param_counts(model)
    info["device_map"] = sorted(
        {str(d) for d in (getattr(model, "hf_device_map", {}) or {}).values()}
    )

    with phases.span("calibration_data") as rec:
        texts = []
        for line in args.calib.read_text().splitlines():
            if line.strip():
                text = json.loads(line).get("text")
                if isinstance(text, str) and text.strip():
                    texts.append(text)
        spec = SimpleNamespace(
            dataset=str(args.calib),
            num_samples=args.num_samples,
            seq_len=args.seq_len,
            seed=args.seed,
            chat_template=False,
        )
        tokens = tokenize(spec, texts, tokenizer)
        rec["tokens"] = int(tokens.numel())
        rec["sha256"] = phase_probe.tokens_digest(tokens)

    def forward_loop(m):
        with (
            phases.span("calibration_forward", tokens=int(tokens.numel()), logits="all"),
            torch.no_grad(),
        ):
            for start in range(0, tokens.shape[0], args.batch_size):
                m(input_ids=tokens[start : start + args.batch_size].to(m.device))

    with phases.span("ptq"):
        mtq.quantize(model, mtq.FP8_DEFAULT_CFG, forward_loop)

    def evaluate(m, role: str):
        with phases.span("evaluate", role=role) as rec:
            lm = HFLM(
                pretrained=m,
                tokenizer=tokenizer,
                batch_size=args.eval_batch_size,
                max_length=args.max_length,
            )
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=[args.task],
                limit=args.gate_limit,
                task_manager=TaskManager(include_path=str(args.tasks_dir), include_defaults=False),
            )
            rec["acc"] = out["results"][args.task].get("acc,none")

    if args.gate_limit:
        evaluate(model, "quantized")  # the live fake-quant model: the exports pack it in place

    if not args.no_trtllm:
        try:
            with phases.span("trtllm_export"):
                export_tensorrt_llm_checkpoint(
                    model,
                    "llama",
                    dtype=torch.bfloat16,
                    export_dir=args.work / "trtllm_checkpoint",
                    inference_tensor_parallel=1,
                    inference_pipeline_parallel=1,
                )
        except Exception as e:
            info["errors"]["trtllm_export"] = f"{type(e).__name__}: {str(e)[:300]}"
    try:
        with phases.span("hf_export"):
            export_hf_checkpoint(
                model, dtype=torch.bfloat16, export_dir=args.work / "hf_checkpoint"
            )
    except Exception as e:
        info["errors"]["hf_export"] = f"{type(e).__name__}: {str(e)[:300]}"

    if args.gate_limit:
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        baseline, _ = load("baseline")
        evaluate(baseline, "baseline")
    info["finished_at"] = time.time()


if __name__ == "__main__":
    sys.exit(main())
