"""Tokenizers: GLM special tokens, the icetk-compatible GLM-130B tokenizer, our bilingual one, training it."""
