"""The `glm130b` command line (cli.commands holds the table of commands)."""

from glm130b.cli.commands import main

__all__ = ["main"]
