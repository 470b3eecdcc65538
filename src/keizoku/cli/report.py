"""``keizoku report``: one self-contained HTML page of one or more runs (``keizoku.report``)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from keizoku.cli.app import app, error
from keizoku.cli.app import out as stdout
from keizoku.errors import KeizokuError
from keizoku.rundir import ExitCode


class XAxis(str, Enum):
    tokens = "tokens"
    steps = "steps"


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories; several are overlaid, one colour each.",
                                                   metavar="RUN_DIR", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where to write the page (default: "
                                                "RUN_DIR/report.html of the first run; a directory: report.html in "
                                                "it).", show_default=False)] = None,
    label: Annotated[Optional[list[str]], typer.Option("--label", help="A run's name in the legends and the table, "
                                                       "once per run in the runs' order (default: the directory's "
                                                       "name).", show_default=False)] = None,
    x: Annotated[XAxis, typer.Option("--x", help="The plots' x axis: tokens trained, or optimizer steps.")]
    = XAxis.tokens,
) -> None:
    """One HTML page of one or more runs: losses, learning rate, throughput, downstream scores, phases marked.

    Plots over tokens trained (--x steps: over steps): train loss and each validation set's, the learning rate
    (logged, and as planned), throughput, MFU, grad norm, memory, router loss, downstream scores (keizoku eval),
    each with a line where a phase begins; a table per run (model, engine, steps, tokens, last losses, wall time,
    phases). One file with its plots inside (PNG), readable offline and attachable: RUN_DIR/report.html, its path
    printed. Reads metrics.jsonl, config.yaml, schedule.json and config-history.jsonl; a run still training is reported as
    far as it has got (rerun to refresh). Compare runs: keizoku report runs/a runs/b --label baseline --label
    anneal -o compare.html. Exit status: 0 written; 1 a run directory without metrics.jsonl; 2 bad arguments.
    """
    from keizoku.report import make_report

    labels = label or []
    if len(labels) > len(run_dirs):
        error(f"--label: {len(labels)} given for {len(run_dirs)} run director"
              f"{'y' if len(run_dirs) == 1 else 'ies'}; give at most one per run, in the runs' order")
        raise typer.Exit(ExitCode.CONFIG)
    try:
        written = make_report(run_dirs, out=out, labels=labels, axis=x.value)
    except (KeizokuError, OSError) as e:  # ReportError among them: a run without metrics.jsonl
        error(str(e))
        raise typer.Exit(ExitCode.FAILED) from None
    stdout.print(str(written), highlight=False, markup=False, soft_wrap=True)
