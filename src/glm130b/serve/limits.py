"""The server's default limits, each with its reason (the command line can change them all)."""

# Cache rows decoded together: 16 rows of 2048 tokens of GLM-130B's KV cache take 2 x 70 layers x
# 12288 x 16 x 2048 x 2 bytes = 113 GB, beside the 65 GB of INT4 weights on 2 H200s; lower
# max_total_tokens to batch more.
MAX_BATCH = 16
# Sequences that may wait for a row before a request is refused with 429: 16 batches' worth.
MAX_QUEUE = 256
# 1 MiB: a 2048-token prompt is ~10 kB of text; a larger body is a mistake or an attack.
MAX_BODY_BYTES = 1 << 20
# Seconds a request may take in all (queue + generation) before a 504: 2048 tokens at ~10 tokens/s.
REQUEST_TIMEOUT_S = 300.0
# Seconds open requests get to finish after SIGTERM before the server exits anyway.
DRAIN_TIMEOUT_S = 60.0
