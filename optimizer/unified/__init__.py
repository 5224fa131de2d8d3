"""ModelOpt unified Hugging Face checkpoints (what ``export_hf_checkpoint`` writes, what
TensorRT-LLM's PyTorch backend, vLLM and SGLang load): checking them and reading them back."""
