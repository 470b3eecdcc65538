"""The ``keizoku`` command line: ``app`` and its consoles (``app``), and one module per group of commands —
``data`` (tokenize, inspect), ``training`` (quickstart, train, export, convert, config), ``evaluate`` (eval),
``launch`` (launch, submit, status), ``report`` (report). Commands parse arguments, call the library and turn its
errors into one-line messages and exit codes (``keizoku.rundir.ExitCode``); the work itself is done elsewhere."""

from __future__ import annotations

import sys

from keizoku.cli import data, evaluate, launch, report, training  # noqa: F401 - registers the commands
from keizoku.cli.app import app

# `keizoku --help` lists the commands in the order of the pipeline
ORDER = ["quickstart", "tokenize", "tokenize-merge", "inspect", "train", "extend", "export", "eval", "launch", "submit",
         "status", "report"]
app.registered_commands.sort(key=lambda c: ORDER.index(c.name or c.callback.__name__)
                             if (c.name or c.callback.__name__) in ORDER else len(ORDER))


def main() -> None:
    args = sys.argv[1:]
    if args[:2] in (["submit", "tokenize"], ["submit", "eval"]):  # the hidden commands submit-tokenize, submit-eval
        import typer.main

        typer.main.get_command(app).commands[f"submit-{args[1]}"].main(args[2:], prog_name=f"keizoku submit {args[1]}")
        return
    app(prog_name="keizoku")
