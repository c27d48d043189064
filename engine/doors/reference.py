"""The CLI and config references in docs/reference/, generated from the code: every command's
help as typer prints it, and every config key of defaults.toml with its comment and default.
`python -m engine.doors.reference [DOCS_FOLDER]` writes them; tests/test_docs.py checks that the
files in the repository are what this writes, so they cannot drift from the code."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click
import typer

from engine.config import DEFAULTS_FILE


def _commands(group: click.Group, prefix: str) -> list[tuple[str, click.Command]]:
    found = []
    for name in sorted(group.commands):
        command = group.commands[name]
        if command.hidden:
            continue
        found.append((f"{prefix} {name}", command))
        if isinstance(command, click.Group):
            found += _commands(command, f"{prefix} {name}")
    return found


def cli_reference() -> str:
    from engine.doors.cli import app

    root = typer.main.get_command(app)
    parts = ["# CLI reference", "",
             "Generated from the code by `python -m engine.doors.reference` (CI checks it is current). Every",
             "command also takes `--config PATH` before its name (`engine --config PATH COMMAND`), and",
             "`--case snake|camel|pascal` for the keys of `--json` output.", ""]
    for name, command in [("engine", root), *_commands(root, "engine")]:
        with click.Context(command, info_name=name, terminal_width=100, max_content_width=100) as ctx:
            text = command.get_help(ctx)
        parts += [f"## `{name}`", "", "```text", text.rstrip(), "```", ""]
    return "\n".join(parts)


def config_reference() -> str:
    """Each [section] of defaults.toml, and each key with its default and the comment above it."""
    parts = ["# Config reference", "",
             "Generated from `engine/defaults.toml` (the `config.toml` that `engine init` writes) by",
             "`python -m engine.doors.reference`. Every key can be set in config.toml, or by an environment",
             "variable `ENGINE_<SECTION>_<KEY>` (`ENGINE_RUNNER_LEASE_SECONDS=60`). Relative paths resolve",
             "against the folder that holds config.toml.", ""]
    comment: list[str] = []
    for line in DEFAULTS_FILE.read_text().splitlines():
        stripped = line.strip()
        section = re.match(r"^\[([^\]]+)\]$", stripped)
        if section:
            parts += ["", f"## [{section.group(1)}]", ""]
            if comment:
                parts += [" ".join(comment), ""]
            parts += ["| key | default | what it does |", "| --- | --- | --- |"]
            comment = []
        elif stripped.startswith("#"):
            comment.append(stripped.lstrip("#").strip())
        elif "=" in stripped:
            key, value = (part.strip().replace("|", "\\|") for part in stripped.split("=", 1))
            said = " ".join(comment).replace("|", "\\|")
            parts.append(f"| `{key}` | `{value}` | {said} |")
            comment = []
        elif not stripped:
            comment = []  # a comment block followed by a blank line belongs to no key (the file's own header)
    return "\n".join(parts).strip() + "\n"


def references() -> dict[str, str]:
    """The generated files, by their path under docs/."""
    return {"reference/cli.md": cli_reference(), "reference/config.md": config_reference()}


def main(argv: list[str]) -> None:
    docs = Path(argv[0]) if argv else Path(__file__).resolve().parents[2] / "docs"
    for name, text in references().items():
        (docs / name).parent.mkdir(parents=True, exist_ok=True)
        (docs / name).write_text(text)
        print(f"wrote {docs / name}")


if __name__ == "__main__":
    main(sys.argv[1:])
