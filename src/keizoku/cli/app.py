"""The ``keizoku`` Typer application and what its commands share: the consoles and how an error is printed."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from keizoku import __version__
from keizoku.rundir import ExitCode

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
console = Console(stderr=True)
out = Console()


def error(message: str) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)


def log(message: str) -> None:
    """A progress line of a command, on stderr, printed as it is (no markup)."""
    console.print(message, highlight=False, markup=False, soft_wrap=True)


def load_config_or_exit(path: Optional[Path], overrides: list[str] | None, exit_code: int = ExitCode.CONFIG):
    """The validated config, or every problem printed (one line per key) and exit."""
    from keizoku.config import ConfigError, load_config

    try:
        return load_config(path, overrides or [])
    except ConfigError as e:
        for line in str(e).splitlines():
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
