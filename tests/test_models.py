"""Model sources: local directories, hub ids (failing fast offline), builtin GGUF conversion."""

import json
import os

import pytest

from optimizer import models
from optimizer.errors import OptimizerError


def test_local_dir_resolves_with_content_fingerprint(tiny_llama, tmp_path):
    import shutil

    resolved = models.resolve_source(str(tiny_llama), tmp_path)
    assert resolved.path == tiny_llama
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama, copy)
    assert models.fingerprint_dir(copy) == resolved.fingerprint  # same content, same identity
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (copy / "config.json").write_text(json.dumps(config))
    assert models.fingerprint_dir(copy) != resolved.fingerprint


def test_local_dir_without_config_is_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no config.json" in models.check_source(str(tmp_path / "empty"), tmp_path)


def test_hub_id_fails_at_once_when_hub_unreachable(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # empty cache
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def cache_only(*args, local_files_only=False, **kwargs):
        # A download would retry for minutes: only the cache lookup may happen.
        assert local_files_only, "a download was attempted although the hub is unreachable"
        raise LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cache_only)
    with pytest.raises(OptimizerError) as exc:
        models.resolve_source("meta-llama/Meta-Llama-3-8B-Instruct", tmp_path)
    msg = str(exc.value)
    assert "not in the local Hugging Face cache and the hub cannot be reached" in msg
    assert "127.0.0.1 is unreachable" in msg and "local checkpoint directory" in msg


def test_hub_id_with_offline_flag(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OptimizerError, match="HF_HUB_OFFLINE is set"):
        models.resolve_source("org/model", tmp_path)


def test_cache_dir_override(monkeypatch, tmp_path):
    monkeypatch.setenv("OPTIMIZER_CACHE_DIR", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"


@pytest.mark.slow
def test_builtin_is_converted_once_then_reused(builtin_cache, monkeypatch):
    first = models.resolve_source("builtin:smollm2-135m-instruct", builtin_cache)
    config = json.loads((first.path / "config.json").read_text())
    assert first.path.is_relative_to(builtin_cache)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert config["rope_parameters"]["rope_theta"] == 100000.0
    assert (first.path / "model.safetensors").stat().st_size > 250e6
    mtime = (first.path / "model.safetensors").stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("the builtin model was converted a second time")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    again = models.resolve_source("builtin:smollm2-135m-instruct", builtin_cache)
    assert again == first and (again.path / "model.safetensors").stat().st_mtime_ns == mtime


def test_saved_tokenizers_do_not_depend_on_the_environment(tiny_llama, tmp_path):
    """HF_HUB_OFFLINE makes transformers load with local_files_only=True, which it would save
    into tokenizer_config.json: exports would differ between machines."""
    import subprocess
    import sys

    saved = {}
    for offline in ("0", "1"):
        out = tmp_path / f"tok-{offline}"
        code = (
            "import sys; from optimizer import models; "
            "models.load_tokenizer(sys.argv[1]).save_pretrained(sys.argv[2])"
        )
        env = {**os.environ, "HF_HUB_OFFLINE": offline}
        subprocess.run([sys.executable, "-c", code, str(tiny_llama), str(out)], env=env, check=True)
        saved[offline] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert saved["0"] == saved["1"]
    assert b"local_files_only" not in saved["1"]["tokenizer_config.json"]
