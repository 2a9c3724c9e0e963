"""Serving: an OpenAI-compatible HTTP server over a continuous-batching engine (docs/serving.md)."""
