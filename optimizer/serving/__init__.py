"""Serving runtimes that load the ModelOpt unified HF checkpoint (TensorRT-LLM >= 1.0 PyTorch
backend, vLLM, SGLang): :mod:`optimizer.serving.facts` is the one table of what each loads."""
