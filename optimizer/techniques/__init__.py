"""Model-optimization techniques as plain functions over a model and a config, usable without
the runner (in the manner of torchao's ``quantize_(model, config)``): the configs are pydantic
data, the functions call ModelOpt. Stages (optimizer/stages/) are thin adapters that add a
recipe section, validation against the plan, and run-directory outputs."""
