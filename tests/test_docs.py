"""The README's promises that a newcomer acts on first."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The README's "Try it" commands: the code blocks that start a fresh virtual environment."""
    blocks = re.findall(r"```\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [block.strip() for block in blocks if block.startswith("python3 -m venv .venv")]


def test_ci_runs_the_readmes_two_commands_in_the_readmes_order():
    commands = readme_commands()
    assert len(commands) == 2
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert ci == commands


def test_the_first_command_writes_nothing_into_sample_models():
    # The tests list sample_models/: a folded model left there by the first command would be a stranger.
    first = readme_commands()[0]
    output = first.split(" -o ", 1)[1].split()[0]
    assert not output.startswith("sample_models/")


def test_the_installed_package_says_what_it_is_for_and_which_pythons():
    from importlib.metadata import metadata

    about = metadata("bnfold")
    classifiers = about.get_all("Classifier") or []
    assert "onnx" in about["Keywords"] and "Typing :: Typed" in classifiers
    lowest = about["Requires-Python"].removeprefix(">=")
    assert f"Programming Language :: Python :: {lowest}" in classifiers  # the lowest Python allowed is named


def test_the_changelog_opens_with_the_version_being_built():
    # the release step (docs/development.md): a .devN version is the CHANGELOG's unreleased one
    import bnfold

    heading = next(line for line in (ROOT / "CHANGELOG.md").read_text().splitlines() if line.startswith("## "))
    version, _, state = heading.removeprefix("## ").partition(" ")
    released = ".dev" not in bnfold.__version__
    assert version == bnfold.__version__.split(".dev")[0]
    assert (state == "(unreleased)") != released and (not released or re.fullmatch(r"\(\d{4}-\d\d-\d\d\)", state))
