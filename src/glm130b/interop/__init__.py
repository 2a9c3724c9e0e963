"""Checkpoints in every direction (model directory, official shards of any degree, Hugging Face folders
ours and ChatGLM-6B's) and GLM as a transformers model."""
