"""Every code block of README.md and docs/ is an example a user will paste, so each is checked.

Each fenced block sits under a marker saying how:

    <!-- example: run -->               run as written, in order, in one folder per document that
                                        holds the stand-ins below (a tiny model, its tokenizer, small
                                        corpora), with the repository's configs/ and benchmarks/
    <!-- example: parse: REASON -->     not run (REASON: the 130B checkpoint, GPUs, a server, minutes
                                        of training); every `glm130b` command in it must parse
                                        with the real command line, every `python FILE` and `make
                                        TARGET` must exist, and Python must compile and its imports resolve
    <!-- example: output -->            not code: printed output, a file layout, a record format; its
                                        `$ glm130b` lines parse as above
"""

from __future__ import annotations

import ast
import gzip
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from glm130b import GLM, GLMConfig
from glm130b.checkpoint.model_dir import save_model
from glm130b.cli.commands import build_parser
from glm130b.tokenizer.tokenizers import train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
MARKER = re.compile(r"<!-- example: (run|parse: [^>]*\S|output) -->\s*$")
TEXT = "the quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。\n" * 40
# What a block may need besides python: the console script next to this interpreter.
BIN = str(Path(sys.executable).parent)


@dataclass
class Block:
    document: Path
    line: int
    language: str
    code: str
    mode: str  # run | parse | output

    @property
    def name(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            above = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            marker = MARKER.search(above)
            mode = marker.group(1).split(":")[0] if marker else "unmarked"
            found.append(Block(document, line, match.group(1), match.group(2), mode))
    return found


BLOCKS = blocks()


def test_every_block_says_how_it_is_checked():
    unmarked = [b.name for b in BLOCKS if b.mode == "unmarked"]
    assert not unmarked, f"code blocks without an <!-- example: ... --> marker on the line above: {unmarked}"
    assert sum(b.mode == "run" for b in BLOCKS) >= 6


# ------------------------------------------------------------------------------ parse
def shell_commands(code: str, prompted_only: bool = False) -> list[list[str]]:
    """The commands of a shell block as word lists: continuations joined, comments and prompts
    dropped, a synopsis's [optional] brackets and `...` removed, leading VAR=value assignments and
    `for ...; do` / `done` lines skipped. prompted_only: only the lines after a `$ ` prompt (output)."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        if prompted_only and not line.startswith("$ "):
            continue
        words = [w.strip("[]") for w in shlex.split(line.removeprefix("$ "), comments=True)]
        words = [w for w in words if w and w != "..."]
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            words = words[1:]
        if words and words[0] not in ("for", "done"):
            commands.append(words)
    return commands


def glm130b_arguments(words: list[str]) -> list[str] | None:
    """The arguments of a `glm130b` command, also when torchrun or python -m launches it."""
    if words[0] == "glm130b":
        return words[1:]
    if "glm130b.cli" in words:
        return words[words.index("glm130b.cli") + 1 :]
    return None


def check_parses(block: Block) -> None:
    if block.language == "python":
        tree = ast.parse(block.code, filename=block.name)  # a SyntaxError names the line
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}"), (
                        f"{block.name}: {node.module} has no {alias.name}"
                    )
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("glm130b"):
                        importlib.import_module(alias.name)
        return
    if block.language == "json":
        for line in block.code.splitlines():
            json.loads(line)
        return
    for words in shell_commands(block.code, prompted_only=block.mode == "output"):
        arguments = glm130b_arguments(words)
        if arguments is not None:
            try:
                build_parser().parse_args(arguments)
            except SystemExit as stop:
                raise AssertionError(f"{block.name}: `{' '.join(words)}` does not parse (exit {stop.code})") from None
        elif words[0] == "python" and words[1].endswith(".py"):
            assert (ROOT / words[1]).is_file(), f"{block.name}: {words[1]} does not exist"
        elif words[0] == "make":
            targets = re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.M)
            assert words[1] in targets, f"{block.name}: make has no target {words[1]}"


CHECKED = [b for b in BLOCKS if b.mode in ("parse", "output")]


@pytest.mark.parametrize("block", CHECKED, ids=[b.name for b in CHECKED])
def test_each_example_not_run_names_real_commands_options_and_imports(block):
    check_parses(block)


# ------------------------------------------------------------------------------ run
@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> Path:
    """The files the runnable examples name: a tiny model (DIR, MODEL_DIR) with its tokenizer (tok),
    and small English and Chinese corpora as JSON lines, gzip, a folder and parquet (raw/)."""
    root = tmp_path_factory.mktemp("stand-ins")
    train_tokenizer([TEXT], root / "tok", vocab_size=308)  # ids below the tiny model's 1000
    torch.manual_seed(0)  # widths that group-wise INT4 (group 128) divides
    model = GLM(GLMConfig(num_layers=2, hidden_size=128, num_attention_heads=4, vocab_size=1000, inner_hidden_size=256))
    save_model(model.eval(), root / "DIR")
    shutil.copytree(root / "tok", root / "DIR" / "tokenizer")
    shutil.copytree(root / "DIR", root / "MODEL_DIR")
    raw = root / "raw"
    (raw / "en").mkdir(parents=True)
    lines = [json.dumps({"text": line}) for line in TEXT.splitlines()]
    (raw / "en" / "part-0.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(raw / "en.jsonl.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    import pyarrow as pa  # the `parquet` extra, installed for the tests
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": TEXT.splitlines()}), raw / "zh.parquet")
    return root


def run_block(block: Block, folder: Path) -> None:
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)}
    if block.language == "python":
        command = [sys.executable, "-c", block.code]
    else:
        command = ["bash", "-e", "-o", "pipefail", "-c", block.code]
    done = subprocess.run(
        command, cwd=folder, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 0, (
        f"{block.name} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    )


RUN_DOCUMENTS = sorted({b.document for b in BLOCKS if b.mode == "run"})


@pytest.mark.parametrize("document", RUN_DOCUMENTS, ids=[str(d.relative_to(ROOT)) for d in RUN_DOCUMENTS])
def test_runnable_examples_run_as_written(document, stand_ins, tmp_path):
    folder = tmp_path / "work"
    shutil.copytree(stand_ins, folder)
    for name in ("configs", "benchmarks"):
        (folder / name).symlink_to(ROOT / name)
    for block in [b for b in BLOCKS if b.document == document and b.mode == "run"]:
        run_block(block, folder)
