"""Shared by every package: error types, atomic writes, config files and field checks, dtype names."""
