"""Pretraining corpora: source readers, preparation into memory-mapped token shards, the shard reader,
the demo corpus."""
