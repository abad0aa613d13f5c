"""Documentation keeps up with the code: every CLI command and every setting is documented."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from marduk_slurm import settings
from marduk_slurm.cli.main import build_parser

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    names = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                names.append(f"{prefix}{name}")
                names += _commands(sub, f"{prefix}{name} ")
    return names


def test_every_cli_command_is_documented_with_help_and_an_example() -> None:
    text = (DOCS / "cli.md").read_text()
    parser = build_parser()
    commands = _commands(parser)
    assert {"controller", "agent", "drain", "resume", "status"} <= set(commands)
    missing = [c for c in commands if f"marduk {c}" not in text]
    assert not missing, f"commands missing from docs/cli.md: {missing}"
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                assert "example" in (sub.description or ""), f"marduk {name} has no example"


def test_every_setting_is_documented() -> None:
    text = (DOCS / "configuration.md").read_text()
    for section, cls in settings.SECTIONS.items():
        assert f"### [{section}]" in text
        for field in dataclasses.fields(cls):
            assert f"| `{field.name}` |" in text, f"{section}.{field.name} not documented"
