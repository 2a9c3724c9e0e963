"""Importing glm130b.hf registers GLM with transformers' Auto classes: after it,
`AutoModelForCausalLM.from_pretrained(folder)` loads a folder written by `glm130b convert --to hf`."""

from transformers import AutoConfig, AutoModelForCausalLM

from glm130b.interop.modeling_hf import MODEL_TYPE, GLMForCausalLM, GLMHFConfig

AutoConfig.register(MODEL_TYPE, GLMHFConfig, exist_ok=True)
AutoModelForCausalLM.register(GLMHFConfig, GLMForCausalLM, exist_ok=True)

__all__ = ["GLMForCausalLM", "GLMHFConfig"]
