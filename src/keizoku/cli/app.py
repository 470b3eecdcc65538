"""The ``keizoku`` Typer application and what its commands share: the consoles and how an error is printed."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from typer import core as typer_core

from keizoku import __version__
from keizoku.rundir import ExitCode


def _flags_show_no_type() -> None:
    """typer 0.2x's help shows ``<bool>`` beside every flag (``--force <bool>``, even ``--help``), as if it took a
    value; a flag shows nothing there, as in click's help and older typer's."""
    option = getattr(typer_core, "TyperOption", None)
    shown = getattr(option, "display_type_rich", None)
    if shown is None or getattr(shown, "keizoku", False):
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) and not getattr(self, "count", False) else shown(self, ctx)

    display_type_rich.keizoku = True
    option.display_type_rich = display_type_rich


_flags_show_no_type()

app = typer.Typer(
    name="keizoku",
    help="keizoku (継続): continual pre-training of Hugging Face LLMs — "
    "JSONL → Megatron datasets → training → Hugging Face checkpoint.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class _Console(Console):
    """A rich console that, when its stream is no terminal and COLUMNS is unset (a log file, CI, a pipe), lays out
    at an unbounded width instead of rich's 80 columns: tables are as wide as their content, never cut or folded,
    and lines are not wrapped; a rule stays 80 columns wide. COLUMNS, where set, is the width."""

    def __init__(self, stderr: bool = False) -> None:
        stream = sys.stderr if stderr else sys.stdout
        self.unbounded = not os.environ.get("COLUMNS", "").isdigit() and not (stream and stream.isatty())
        super().__init__(stderr=stderr, width=100_000 if self.unbounded else None)

    def rule(self, *args, **kwargs) -> None:
        if not self.unbounded:
            return super().rule(*args, **kwargs)
        from rich.rule import Rule

        self.print(Rule(*args, **kwargs), width=80)


console = _Console(stderr=True)
out = _Console()


def error(message: str) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)


def log(message: str) -> None:
    """A progress line of a command, on stderr, printed as it is (no markup)."""
    console.print(message, highlight=False, markup=False, soft_wrap=True)


def load_config_or_exit(path: Optional[Path], overrides: list[str] | None, exit_code: int = ExitCode.CONFIG):
    """The validated config, or every problem printed (one line per key; an indented line, the YAML line at fault,
    as it is) and exit."""
    from keizoku.config import ConfigError, load_config

    try:
        return load_config(path, overrides or [])
    except ConfigError as e:
        for line in str(e).splitlines():
            if line.startswith(" "):
                log(line)
            else:
                error(line)
        raise typer.Exit(exit_code) from None


def leave(status: int) -> None:
    """Exit without interpreter teardown, once everything is written and the process group is gone: C++ threads
    of torch.distributed/gloo can abort the process there ("terminate called without an active exception") and
    turn a finished run into a failed exit status."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _version(value: bool) -> None:
    if value:
        print(f"keizoku {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    pass
