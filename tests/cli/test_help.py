"""`--help` of every command: each option says what it does, and a run setting shows its default."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from glm130b.cli.commands import build_parser, main
from glm130b.core.config_io import field_descriptions
from glm130b.train.config import TrainConfig, option_names


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, path + (name,))
    if path:
        yield path, parser


COMMANDS = list(_commands(build_parser()))


@pytest.mark.parametrize("path,parser", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_option_of_every_command_has_a_description(path, parser):
    undocumented = [
        action.option_strings or action.dest
        for action in parser._actions
        if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
        and not (action.help or "").strip()
    ]
    assert not undocumented, f"glm130b {' '.join(path)}: options without a description: {undocumented}"
    formatter = parser._get_formatter()
    for action in parser._actions:
        own, shown = action.help or "", formatter._get_help_string(action) or ""
        added = shown[len(own) :] if shown.startswith(own) else shown
        assert "None" not in added, f"glm130b {' '.join(path)} {action.option_strings}: shows argparse's None: {shown}"
        assert shown.count("default:") <= 1, f"glm130b {' '.join(path)} {action.option_strings}: default twice: {shown}"
        if action.option_strings and action.default not in (None, argparse.SUPPRESS) and "default:" not in own:
            assert "default:" in shown, f"glm130b {' '.join(path)} {action.option_strings}: default hidden: {shown}"


def test_pretrain_help_shows_each_settings_description_and_default(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--lr VALUE peak learning rate, reached after warmup (default: 8e-05)" in text
    assert "--spike_guard.window VALUE healthy steps whose median is the reference (default: 50)" in text
    assert "--model.num_layers VALUE transformer blocks (default: the preset's)" in text
    settings = text.split("run settings")[1].split(" --activation_checkpointing")[0].split(" --")[1:]
    assert all(option.count("(default:") == 1 for option in settings)  # not argparse's "None" of one not given too
    assert len(option_names()) > 70


def test_finetune_help_shows_the_fine_tuning_defaults_not_the_recipes(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: full 8e-06, lora 0.0002, ptuning 0.02)" in text  # METHOD_DEFAULTS, not the recipe's 8e-05
    assert "--train.global_batch_size VALUE sequences per optimiser step" in text
    assert "accumulation (default: 8)" in text


def test_an_option_not_given_leaves_the_config_files_value(tmp_path):
    args = build_parser().parse_args(["pretrain", "--lr", "1e-3"])
    given = {k: v for k, v in vars(args).items() if k.startswith("override:")}
    assert given == {"override:lr": "1e-3"}


@dataclass
class Documented:
    # A section's title ------------------------------------------------
    plain: int = 1
    # Above the field,
    # on two lines.
    above: int = 2  # and beside it
    beside: str = "#"  # a '#' in the value is not a comment

    other: int = 3


def test_field_descriptions_read_the_comments_beside_each_field():
    assert field_descriptions(Documented) == {
        "above": "Above the field, on two lines. and beside it",
        "beside": "a '#' in the value is not a comment",
    }
    assert "lr" in field_descriptions(TrainConfig)


def test_field_descriptions_without_the_source_are_empty_not_an_error(monkeypatch):
    def no_source(obj):
        raise OSError("could not get source code")

    monkeypatch.setattr("inspect.getsource", no_source)
    assert field_descriptions(Documented) == {}
