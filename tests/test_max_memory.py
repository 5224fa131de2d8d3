"""``model.max_memory`` (issue 17): a model larger than one GPU, sharded over the GPUs of a
host and offloaded to host memory. The recipe field (its bad values are in the corpus,
test_hostile_recipes.py), the placement arguments it becomes, that fingerprints and baselines
do not depend on it, and that calibration, the hand-over save and both exports of an
accelerate-offloaded model give the same bytes as the resident model (on a CPU: offloaded to
host memory with the hooks dispatch_model puts there on a GPU machine, and to disk)."""

from __future__ import annotations

import json

import pytest

from optimizer import models
from optimizer.errors import OptimizerError
from optimizer.recipe import MaxMemory, load_recipe, memory_bytes

GiB = 2**30


@pytest.mark.parametrize(
    ("text", "size"),
    [("20GiB", 20 * GiB), ("20 GiB", 20 * GiB), ("1.5GiB", 3 * GiB // 2), ("500MB", 5 * 10**8)],
)
def test_memory_sizes(text, size):
    assert memory_bytes(text) == size


def test_placement_on_a_machine_without_gpus_ignores_the_cap():
    assert models.placement({"gpu": 8 * GiB}, gpus=0) == {"device_map": None}
    assert models.placement(None, gpus=0) == {"device_map": None}


def test_placement_caps_every_gpu_and_host_memory():
    caps = {"gpu": 20 * GiB, "cpu": 200 * GiB}
    weights = int(20 * GiB * models.WEIGHTS_SHARE)  # the rest is for activations
    assert models.placement(caps, gpus=2) == {
        "device_map": "auto",
        "max_memory": {0: weights, 1: weights, "cpu": 200 * GiB},
    }
    # unset halves: what accelerate finds free (host memory: 90 %, as transformers)
    available = {0: 70 * GiB, 1: 60 * GiB, "cpu": 100 * GiB}
    assert models.placement({"gpu": 20 * GiB}, gpus=2, available=available)["max_memory"] == {
        0: weights,
        1: weights,
        "cpu": 90 * GiB,
    }
    assert models.placement({"cpu": 10 * GiB}, gpus=2, available=available)["max_memory"] == {
        0: 70 * GiB,
        1: 60 * GiB,
        "cpu": 10 * GiB,
    }


def test_placement_without_a_cap_is_what_it_was():
    assert models.placement(None, gpus=4) == {"device_map": "auto"}
    assert models.placement(None, gpus=4, world_size=4, local_rank=3) == {"device_map": {"": 3}}
    with pytest.raises(OptimizerError, match="4-process launch"):
        models.placement({"gpu": GiB}, gpus=4, world_size=4, local_rank=0)


def test_load_model_passes_the_placement(monkeypatch, tiny_llama):
    """load_model hands placement()'s arguments to from_pretrained (GPUs faked)."""
    import torch
    from transformers import AutoModelForCausalLM

    seen = {}

    def fake(path, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(models, "_available_memory", lambda: {0: 80 * GiB, 1: 80 * GiB, "cpu": 0})
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake)
    monkeypatch.setattr(models, "enable_modelopt_checkpointing", lambda: None)
    with pytest.raises(RuntimeError, match="stop"):
        models.load_model(tiny_llama, "bfloat16", max_memory={"gpu": 8 * GiB, "cpu": 64 * GiB})
    assert seen["device_map"] == "auto"
    share = int(8 * GiB * models.WEIGHTS_SHARE)
    assert seen["max_memory"] == {0: share, 1: share, "cpu": 64 * GiB}
    assert seen["dtype"] == torch.bfloat16


def _recipe(write_recipe, model_lines: str):
    text = (
        "name: cap\nmodel:\n  source: {model}\n" + model_lines + "calibration: {{dataset: {calib}, "
        "num_samples: 8, seq_len: 64}}\nstages:\n  - ptq: {{format: fp8}}\n"
    )
    return write_recipe(text)


def test_the_field_validates_and_leaves_other_recipes_as_they_were(write_recipe, capsys):
    plain = load_recipe(_recipe(write_recipe, ""))
    capped = load_recipe(
        _recipe(write_recipe, "  max_memory: {{gpu: 20GiB, cpu: 200GiB}}\n"), device="cpu"
    )
    assert capped.model.max_memory == MaxMemory(gpu="20GiB", cpu="200GiB")
    assert capped.model.max_memory.as_bytes() == {"gpu": 20 * GiB, "cpu": 200 * GiB}
    assert "max_memory" not in plain.resolved()["model"]  # sha256 of old recipes unchanged
    assert capped.resolved()["model"]["max_memory"] == {"gpu": "20GiB", "cpu": "200GiB"}


def test_fingerprints_and_baseline_keys_do_not_depend_on_it(write_recipe):
    from optimizer.pipeline import stage_fingerprint

    plain = load_recipe(_recipe(write_recipe, ""))
    capped = load_recipe(_recipe(write_recipe, "  max_memory: {{gpu: 8GiB}}\n"))
    args = ("model-fp", {"calibration_data": "d"}, "", {"torch": "x"})
    assert stage_fingerprint(plain.stages[0], plain, *args) == stage_fingerprint(
        capped.stages[0], capped, *args
    )


# ----------------------------------------------------------------------------- offloaded


def _offload_map(layers: int) -> dict[str, str]:
    """The second half of the decoder and lm_head offloaded, the rest resident."""
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu"}
    for i in range(layers):
        device_map[f"model.layers.{i}"] = "disk" if i >= layers // 2 else "cpu"
    device_map["lm_head"] = "disk"
    return device_map


def _load(path, kind: str, tmp):
    """``path`` resident, or with half the decoder and lm_head offloaded: to disk by
    transformers itself, or to host memory the way accelerate's dispatch_model does it for a
    GPU machine (a state dict of host tensors behind the hooks), with the CPU as the
    execution device."""
    import torch
    from transformers import AutoModelForCausalLM

    models.enable_modelopt_checkpointing()
    device_map = _offload_map(2)
    kwargs = {}
    if kind == "disk":
        kwargs = {"device_map": device_map, "offload_folder": tmp / "offload"}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kwargs).eval()
    return offload_to_host(model) if kind == "host" else model


def offload_to_host(model):
    """``model`` with the layers :func:`_offload_map` sends to ``disk`` offloaded to host
    memory instead, behind the hooks accelerate's dispatch_model attaches on a GPU machine
    (here with the CPU as the execution device)."""
    import torch
    from accelerate.hooks import attach_align_device_hook_on_blocks
    from accelerate.utils import OffloadedWeightsLoader, extract_submodules_state_dict

    device_map = _offload_map(len(model.model.layers))
    offloaded = [name for name, device in device_map.items() if device == "disk"]
    weights = extract_submodules_state_dict(model.state_dict(), offloaded)
    attach_align_device_hook_on_blocks(
        model,
        execution_device={name: torch.device("cpu") for name in device_map},
        offload={name: name in offloaded for name in device_map},
        weights_map=OffloadedWeightsLoader(state_dict=weights),
        skip_keys=model._skip_keys_device_placement,
    )
    # as on a GPU machine: GPU 0 and "cpu" (save_pretrained reads offloaded weights then)
    model.hf_device_map = {n: "cpu" if n in offloaded else 0 for n in device_map}
    return model


def _tensors(directory):
    import torch
    from safetensors import safe_open

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            out.update({k: fh.get_tensor(k).reshape(-1).view(torch.uint8) for k in fh.keys()})  # noqa: SIM118
    return out


@pytest.mark.parametrize("kind", ["host", "disk"])
def test_an_offloaded_model_calibrates_saves_and_exports_to_the_same_bytes(
    kind, tiny_llama, tmp_path
):
    """ptq -> save -> reload -> both exports, as the pipeline does them, with half the layers
    and lm_head offloaded at every load: the same scales, the same checkpoints."""
    import torch

    from optimizer import calibration
    from optimizer.exporters import export_trtllm_checkpoint, export_unified_hf_checkpoint
    from optimizer.techniques.quantize import QuantizeConfig, quantize

    torch.manual_seed(0)
    tokens = torch.randint(0, 500, (4, 32))
    loop = calibration.forward_loop(tokens, 2, desc="test")
    out = {}
    for side in ("resident", kind):
        work = tmp_path / side
        model = _load(tiny_llama, side, work / "load-1")
        assert models.is_offloaded(model) == (side != "resident")
        quantize(model, QuantizeConfig(format="fp8"), loop)
        models.save_in_dtype(model, work / "model", "bfloat16", "bfloat16")
        del model
        model = _load(work / "model", side, work / "load-2")
        assert models.is_offloaded(model) == (side != "resident")
        export_trtllm_checkpoint(model, work / "trtllm", dtype="bfloat16")
        assert models.is_offloaded(model) == (side != "resident")  # weights back in the hooks
        export_unified_hf_checkpoint(model, work / "hf", dtype="bfloat16")
        out[side] = {
            part: (_tensors(work / part), json.loads((work / part / "config.json").read_text()))
            for part in ("model", "trtllm", "hf")
        }
    for part in ("model", "trtllm", "hf"):
        resident, offloaded = out["resident"][part], out[kind][part]
        assert resident[0].keys() == offloaded[0].keys(), part
        differ = [k for k in resident[0] if not torch.equal(resident[0][k], offloaded[0][k])]
        assert not differ, (part, differ)
        assert resident[1] == offloaded[1], part
    assert any("weight_scale" in k for k in out[kind]["hf"][0])  # it is quantized
