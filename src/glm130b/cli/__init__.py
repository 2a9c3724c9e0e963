"""The `glm130b` command line (cli.main holds the table of commands)."""

from glm130b.cli.main import main

__all__ = ["main"]
