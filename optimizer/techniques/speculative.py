"""Trained speculative-decoding draft heads (EAGLE-3, Medusa) with ModelOpt, usable without the
runner: convert, train (through :func:`optimizer.techniques.train.train`), export, and drafters
for the greedy verification loop (:mod:`optimizer.techniques.speculation`).

What is ModelOpt's: the draft architectures and their losses (``mtsp.convert`` with
``EAGLE3_DEFAULT_CFG`` / medusa; EAGLE's self-logit distillation with train-time test, Medusa's
per-head cross-entropy), the EAGLE-3 draft checkpoint (``export_speculative_decoding``: the
``LlamaForCausalLMEagle3`` config.json + model.safetensors that TensorRT-LLM's PyTorch backend
loads as ``speculative_model_dir`` and vLLM/SGLang as an eagle3 draft) and the TensorRT-LLM
Medusa checkpoint (``export_tensorrt_llm_checkpoint`` handles the heads in 0.47:
``MedusaForCausalLM``, ``medusa_heads.{i}.medusa_layers.{j}.linear`` / ``.lm_head``).

What is written here, and why:

- the EAGLE-3 architecture config is filled from the base model's config: ModelOpt's defaults
  are Llama-3-8B's (32 heads, 8 KV heads, head_dim 128, intermediate 14336, rope 10000), which
  fit no other base; and the export-time YaRN override ModelOpt injects is turned off, so the
  exported draft computes with the rope it was trained with;
- Medusa's base parameters are frozen here (ModelOpt only wraps the base forward in no_grad,
  so an optimizer would still hold, and weight decay still move, every base weight), and its
  labels are shifted (:class:`ShiftedLabels`);
- the EAGLE-3 export is re-saved in the requested storage dtype (ModelOpt writes the live
  dtype, e.g. float32 computing on a CPU, and its config.json says the template's
  ``bfloat16`` unless the architecture config names one);
- the drafters: ModelOpt's ``pseudo_speculative_generate`` re-runs the base model on the whole
  prefix for every proposal; :class:`EagleDrafter` keeps the draft's input features of the
  committed positions instead, so the verification loop's KV-cached base forwards feed it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from optimizer.errors import OptimizerError

EAGLE_FIELDS = ("num_layers", "intermediate_size", "aux_layer_ids", "ttt_steps", "compile")
MEDUSA_FIELDS = ("medusa_heads", "medusa_layers")


class DraftHeadConfig(BaseModel):
    """A draft head to train on top of a frozen base model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["eagle3", "medusa"]
    #: eagle3: decoder layers of the draft.
    num_layers: Annotated[int, Field(gt=0)] = 1
    #: eagle3: MLP width of the draft layers (default: the base model's).
    intermediate_size: Annotated[int, Field(gt=0)] | None = None
    #: eagle3: base decoder layers (0-based) whose outputs feed the draft (default ModelOpt's:
    #: three near the start, middle and end of the stack).
    aux_layer_ids: list[Annotated[int, Field(ge=0)]] | None = None
    #: eagle3: train-time-test steps (the draft trained on its own outputs this many times;
    #: ModelOpt's default 3; more steps train later draft positions better, at their cost).
    ttt_steps: Annotated[int, Field(gt=0)] = 3
    #: medusa: heads, i.e. the most tokens one step can draft (default 4, Medusa's and
    #: TensorRT-LLM's usual count; head i predicts the token i+2 ahead).
    medusa_heads: Annotated[int, Field(gt=0)] = 4
    #: medusa: residual blocks per head.
    medusa_layers: Annotated[int, Field(gt=0)] = 1
    #: torch.compile the EAGLE forward and loss (None: on CUDA only; the CPU gains nothing and
    #: pays the compile, minutes with ModelOpt's max-autotune, which a short run never earns
    #: back). Medusa has nothing to compile.
    compile: bool | None = None

    @model_validator(mode="after")
    def _fields_of_the_method(self) -> DraftHeadConfig:
        other = MEDUSA_FIELDS if self.method == "eagle3" else EAGLE_FIELDS
        wrong = [f for f in other if f in self.model_fields_set]
        if wrong:
            raise ValueError(f"{', '.join(wrong)} do not apply to method {self.method}")
        if self.aux_layer_ids is not None and len(set(self.aux_layer_ids)) != len(
            self.aux_layer_ids
        ):
            raise ValueError(f"aux_layer_ids {self.aux_layer_ids} repeat a layer")
        return self


def draft_head_method(model) -> str | None:
    """``"eagle3"``, ``"medusa"`` or None: which draft head a (converted) model carries."""
    from modelopt.torch.speculative.plugins.hf_eagle import HFEagleModel
    from modelopt.torch.speculative.plugins.hf_medusa import HFMedusaModel

    if isinstance(model, HFEagleModel):
        return "eagle3"
    if isinstance(model, HFMedusaModel):
        return "medusa"
    return None


def convert_draft_head(model, config: DraftHeadConfig):
    """Add the draft head to ``model`` in place (ModelOpt's ``mtsp.convert``) with the base
    frozen; returns the model."""
    import modelopt.torch.speculative as mtsp
    import torch

    if draft_head_method(model) is not None:
        raise OptimizerError(f"the model already has a {draft_head_method(model)} draft head")
    base = getattr(model.config, "text_config", None) or model.config
    if config.method == "medusa":
        mtsp.convert(
            model,
            [
                (
                    "medusa",
                    {
                        "medusa_num_heads": config.medusa_heads,
                        "medusa_num_layers": config.medusa_layers,
                    },
                )
            ],
        )
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("medusa_heads."))
        return model

    from modelopt.torch.speculative.config import EAGLE3_DEFAULT_CFG

    layers = base.num_hidden_layers
    bad = [i for i in config.aux_layer_ids or [] if i >= layers]
    if bad:
        raise OptimizerError(
            f"aux_layer_ids {bad}: the base model has {layers} decoder layers (0..{layers - 1})"
        )
    cfg = copy.deepcopy(EAGLE3_DEFAULT_CFG)["config"]
    rope = dict(getattr(base, "rope_parameters", None) or {})
    rope_theta = rope.get("rope_theta", getattr(base, "rope_theta", 10000.0))
    rope.setdefault("rope_type", "default")
    rope["rope_theta"] = rope_theta
    cfg["eagle_architecture_config"].update(
        num_hidden_layers=config.num_layers,
        num_attention_heads=base.num_attention_heads,
        num_key_value_heads=getattr(base, "num_key_value_heads", None) or base.num_attention_heads,
        head_dim=getattr(base, "head_dim", None) or base.hidden_size // base.num_attention_heads,
        intermediate_size=config.intermediate_size or base.intermediate_size,
        hidden_act=getattr(base, "hidden_act", "silu"),
        rms_norm_eps=getattr(base, "rms_norm_eps", 1e-5),
        attention_bias=getattr(base, "attention_bias", False),
        mlp_bias=getattr(base, "mlp_bias", False),
        rope_scaling=rope,
        rope_theta=rope_theta,
        torch_dtype=str(model.dtype).removeprefix("torch."),
        eagle_aux_hidden_state_layer_ids=list(config.aux_layer_ids or []),
    )
    compile_ = torch.cuda.is_available() if config.compile is None else config.compile
    cfg.update(
        eagle_ttt_steps=config.ttt_steps,
        eagle_use_torch_compile=compile_,
        # ModelOpt swaps in YaRN (factor 32) at export when training used the default rope:
        # the exported draft would then compute other than the one trained and verified here.
        eagle_export_rope_scaling={},
    )
    mtsp.convert(model, [("eagle", cfg)])
    return model


class ShiftedLabels:
    """Packed windows with Medusa's labels: ``labels[t] = input_ids[t + 1]`` (last: ignored).

    ModelOpt's Medusa forward expects labels already shifted (it trains head i at position t on
    ``labels[t + 1 + i]``, i.e. the token i+2 ahead, the base's lm_head having the next one);
    our windows carry ``labels = input_ids`` for HF models, which shift inside. Unshifted,
    head 0 would learn the base's own next token and every head would draft one position
    early."""

    def __init__(self, windows):
        self.windows = windows
        self.tokens = windows.tokens

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        item = self.windows[i]
        ids = item["input_ids"]
        item["labels"] = torch.cat([ids[1:], ids.new_full((1,), -100)])
        return item

    def head(self, n: int) -> ShiftedLabels:
        return ShiftedLabels(self.windows.head(n))


def training_splits(model, splits):
    """The splits a draft head trains on (Medusa: shifted labels; EAGLE distils the base's
    own logits, its loss mask comes from the attention mask, labels unused)."""
    import dataclasses

    if draft_head_method(model) != "medusa":
        return splits
    return dataclasses.replace(
        splits, train=ShiftedLabels(splits.train), heldout=ShiftedLabels(splits.heldout)
    )


def draft_metrics(model, heldout, batch_size: int) -> dict[str, Any]:
    """After training: for EAGLE, the held-out top-1 accuracy of the draft's first token
    against the base's (ModelOpt's ``train_acc`` of an eval-mode forward, one TTT step)."""
    import torch

    method = draft_head_method(model)
    if method != "eagle3":
        return {"method": method}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    accs, weights = [], []
    with torch.no_grad():
        for start in range(0, len(heldout), batch_size):
            ids = heldout.tokens[start : start + batch_size].to(device)
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
            accs.append(out.train_acc[0][0])
            weights.append(ids.shape[0])
    model.train(was_training)
    acc = sum(a * w for a, w in zip(accs, weights, strict=True)) / sum(weights)
    return {"method": method, "heldout_draft_accuracy": round(float(acc), 5)}


def export_draft_head(model, config: DraftHeadConfig, out_dir: Path, *, dtype: str | None = None):
    """Write the deployable draft checkpoint into ``out_dir``; returns ``{"files", "summary"}``.

    ``dtype`` (e.g. "bfloat16") defaults to the model's. eagle3: the EAGLE-3 draft alone
    (config.json + model.safetensors). medusa: a TensorRT-LLM Medusa checkpoint (base and heads
    together) through ModelOpt's TensorRT-LLM exporter, which packs the live weights in place:
    the model is not usable afterwards."""
    method = draft_head_method(model)
    if method != config.method:
        raise OptimizerError(f"the model carries a {method} draft head, not {config.method}")
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = dtype or str(model.dtype).removeprefix("torch.")
    if method == "medusa":
        import json

        from optimizer.exporters import export_trtllm_checkpoint

        summary = export_trtllm_checkpoint(model, out_dir, dtype=dtype)
        trt = json.loads((out_dir / "config.json").read_text())
        # ModelOpt names the converted class (MedusaLlamaForCausalLM) as the base; TensorRT-LLM
        # builds the base from base_architecture, which must name the model's own class.
        trt["base_architecture"] = model.original_cls.__name__
        (out_dir / "config.json").write_text(json.dumps(trt, indent=4))
        summary |= {k: trt[k] for k in ("architecture", "num_medusa_heads", "num_medusa_layers")}
        summary["max_draft_len"] = trt["max_draft_len"]
    else:
        summary = _export_eagle(model, out_dir, dtype)
    files = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    return {"files": files, "summary": summary}


def _export_eagle(model, out_dir: Path, dtype: str) -> dict[str, Any]:
    import json

    import torch
    from modelopt.torch.export import export_speculative_decoding
    from safetensors.torch import load_file, save_file

    export_speculative_decoding(model, export_dir=out_dir)
    config_file, weights = out_dir / "config.json", out_dir / "model.safetensors"
    config = json.loads(config_file.read_text())
    target = getattr(torch, dtype)
    tensors = load_file(weights)
    tensors = {k: t.to(target) if t.is_floating_point() else t for k, t in tensors.items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    config["torch_dtype"] = dtype
    config_file.write_text(json.dumps(config, indent=4))
    return {
        "architectures": config["architectures"],
        "num_hidden_layers": config["num_hidden_layers"],
        "aux_layer_ids": config["eagle_config"]["eagle_aux_hidden_state_layer_ids"],
        "draft_vocab_size": config["draft_vocab_size"],
        "dtype": dtype,
        "tensors": len(tensors),
    }


def base_forward(model):
    """``(input_ids, past_key_values, output_hidden_states) -> CausalLMOutputWithPast``: the
    plain base forward of a converted model (its own ``forward`` runs the draft training
    path), with ``use_cache=True`` into the given ``DynamicCache``. For EAGLE, ModelOpt's
    aux-hidden-state hooks append on every base forward; what an earlier forward left and
    nobody observed (plain greedy decoding) is dropped first, so the list never grows."""
    import torch
    from modelopt.torch.speculative.plugins.hf_eagle import HFEagleModel
    from modelopt.torch.speculative.plugins.hf_medusa import HFMedusaModel

    method = draft_head_method(model)
    owner = {"eagle3": HFEagleModel, "medusa": HFMedusaModel}.get(method)
    # ModelOpt's own route to the base (pseudo_speculative_generate's super().forward)
    plain = super(owner, model).forward if owner else model.forward

    def forward(input_ids, past_key_values, output_hidden_states):
        if method == "eagle3":
            model._aux_hidden_states.clear()
        with torch.no_grad():
            return plain(
                input_ids=input_ids,
                past_key_values=past_key_values,
                use_cache=True,
                output_hidden_states=output_hidden_states,
            )

    return forward


class EagleDrafter:
    """EAGLE-3 proposals from cached draft features: ``fc`` over the concatenated aux hidden
    states of every committed position (read from ModelOpt's hooks, the same tensors it trains
    on; the HF ``hidden_states`` tuple would not do: its last entry is after the final norm),
    then the draft module ``k`` times on the whole prefix, fed back its pre-norm hidden, as
    ModelOpt's ``pseudo_speculative_generate`` does."""

    wants_hidden_states = False  # the aux features come from ModelOpt's layer hooks

    def __init__(self, model):
        if draft_head_method(model) != "eagle3":
            raise OptimizerError("EagleDrafter needs a model converted with an eagle3 draft head")
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.model._aux_hidden_states.clear()
        self._features = None

    def observe(self, hidden_states, keep: int) -> None:
        import torch

        with torch.no_grad():
            aux = self.model.pop_and_gather_aux_hiddens()[:, :keep]
            new = self.model.eagle_module.fc(aux.to(self.model.eagle_module.fc.weight.dtype))
        self._features = new if self._features is None else torch.cat([self._features, new], 1)

    def propose(self, tokens, k: int):
        import torch
        from modelopt.torch.speculative.utils import temporary_set_config_value

        m = self.model
        n = 0 if self._features is None else self._features.shape[1]
        if tokens.shape[1] != n + 1:
            raise ValueError(f"propose: {tokens.shape[1]} tokens for {n} observed positions")
        hidden = self._features
        ids = tokens[:, 1:].to(hidden.device)
        m.eagle_module._maybe_init_rope(device=hidden.device)
        drafts = []
        with (
            torch.no_grad(),
            temporary_set_config_value(m.eagle_config, "_attn_implementation", "sdpa"),
        ):
            for _ in range(k):
                mask = m._prepare_decoder_attention_mask(
                    None, tuple(ids.shape), 0, hidden.device, hidden.dtype
                )
                _, prenorm, logits, _ = m._eagle_forward(
                    hidden, m._base_model_embeddings(ids), mask, None
                )
                token = logits[:, -1:].argmax(dim=-1)
                if m.eagle_config.draft_vocab_size != m.eagle_config.vocab_size:
                    token = token + m.eagle_module.d2t[token]
                drafts.append(token)
                ids = torch.cat([ids, token], dim=-1)
                hidden = torch.cat([hidden, prenorm[:, -1:]], dim=1)
        return torch.cat(drafts, dim=-1)[0].to(tokens.device)


class MedusaDrafter:
    """Medusa proposals: head i's argmax at the last committed position's final (normed)
    hidden state predicts the token i+2 ahead of it (the base's lm_head has the next)."""

    wants_hidden_states = True

    def __init__(self, model):
        if draft_head_method(model) != "medusa":
            raise OptimizerError("MedusaDrafter needs a model converted with a medusa draft head")
        self.model = model
        self.reset()

    def reset(self) -> None:
        self._last = None

    def observe(self, hidden_states, keep: int) -> None:
        # transformers 5.14: hidden_states[-1] is after the final norm (= last_hidden_state)
        self._last = hidden_states[-1][:, keep - 1 : keep]

    def propose(self, tokens, k: int):
        import torch

        heads = self.model.medusa_heads
        if k > len(heads):
            raise OptimizerError(
                f"draft length {k} exceeds the {len(heads)} medusa heads; lower the draft "
                "length or train more medusa_heads"
            )
        with torch.no_grad():
            h = self._last.to(heads[0][-1].weight.dtype)
            drafts = [heads[i](h)[0, -1].argmax() for i in range(k)]
        return torch.stack(drafts).to(tokens.device)
