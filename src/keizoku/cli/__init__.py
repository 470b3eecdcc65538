"""The ``keizoku`` command line: ``app`` and its consoles (``app``), and one module per group of commands —
``data`` (tokenize, inspect), ``training`` (quickstart, train, export, convert, config), ``launch`` (launch,
submit, status). Commands parse arguments, call the library and turn its errors into one-line messages and exit
codes (``keizoku.rundir.ExitCode``); the work itself is done elsewhere."""

from __future__ import annotations

import sys

from keizoku.cli import data, launch, training  # noqa: F401 - registers the commands
from keizoku.cli.app import app

# `keizoku --help` lists the commands in the order of the pipeline
ORDER = ["quickstart", "tokenize", "tokenize_merge", "inspect", "train", "export", "launch", "submit", "status"]
app.registered_commands.sort(key=lambda c: ORDER.index(c.callback.__name__) if c.callback.__name__ in ORDER
                             else len(ORDER))


def main() -> None:
    args = sys.argv[1:]
    if args[:2] == ["submit", "tokenize"]:  # `keizoku submit tokenize …` is the hidden command submit-tokenize
        import typer.main

        typer.main.get_command(app).commands["submit-tokenize"].main(args[2:], prog_name="keizoku submit tokenize")
        return
    app(prog_name="keizoku")
