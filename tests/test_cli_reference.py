"""The README's command reference and ``--help`` describe the parser as it is."""

import argparse
import pathlib
import re

import pytest

from jaxnet.app.cli import build_parser

README = pathlib.Path(__file__).parent.parent / "README.md"
OPTION = r"(?<![\w-])(--[a-z][a-z0-9-]*)"


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    [subparsers] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(subparsers.choices)


def _reference() -> str:
    """The README's section on the command, up to the next section."""
    match = re.search(r"^## The `jaxnet` command\n(.*?)(?=^## )", README.read_text(), re.S | re.M)
    assert match, "README.md has no section '## The `jaxnet` command'"
    return match.group(1)


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings
            if flag not in ("-h", "--help")}


def test_every_command_and_option_is_in_the_readme():
    text = _reference()
    for name, parser in _commands().items():
        assert re.search(rf"^jaxnet {name}\b", text, re.M), f"README lacks `jaxnet {name}`"
        missing = [flag for flag in _options(parser)
                   if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)]
        assert not missing, f"README's `jaxnet {name}` lacks {missing}"


def test_every_command_and_option_in_the_readme_exists():
    text, commands = _reference(), _commands()
    named = set(re.findall(r"^jaxnet ([a-z]+)", text, re.M))
    assert named <= set(commands), f"README names commands the parser lacks: {named - set(commands)}"
    flags = set().union(*(_options(parser) for parser in commands.values())) | {"--help"}
    unknown = set(re.findall(OPTION, text)) - flags
    assert not unknown, f"README names options the parser lacks: {sorted(unknown)}"


def test_readme_choices_are_the_parsers():
    text = _reference()
    for name, parser in _commands().items():
        for flag, action in _options(parser).items():
            if action.choices is None:
                continue
            listed = [m.split("|") for m in re.findall(re.escape(flag) + r" ([\w-]+(?:\|[\w-]+)+)",
                                                         text)]
            assert listed, f"README lists no choices for {flag} (`jaxnet {name}`)"
            for choices in listed:
                assert sorted(choices) == sorted(action.choices), (flag, choices, action.choices)


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_argument_has_help(name):
    parser = _commands()[name]
    for action in parser._actions:
        text = re.sub(r"\(default: [^)]*\)", "", action.help or "").strip()
        assert text, f"jaxnet {name}: {action.option_strings or action.dest} has no help text"


def test_the_commands_have_help():
    parser = build_parser()
    [subparsers] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert subparsers.help
    helps = {choice.dest: choice.help for choice in subparsers._choices_actions}
    assert set(helps) == set(_commands()) and all(helps.values()), helps


def test_there_is_no_bench_command():
    assert "bench" not in _commands()
    assert "jaxnet bench" not in README.read_text()
