"""``keizoku eval``: downstream benchmarks (lm-evaluation-harness) of a run's checkpoint or a Hugging Face model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from keizoku.cli.app import app, error, log, out
from keizoku.rundir import ExitCode


@app.command("eval")
def evaluate(
    path: Annotated[Path, typer.Argument(help="A keizoku run directory (its newest checkpoint, or --step's) or a "
                                              "Hugging Face model directory.", show_default=False)],
    tasks: Annotated[list[str], typer.Option("--tasks", help="lm-eval tasks, groups or tags, and presets: ja "
                                             "(the Japanese leaderboard's tasks), en (mmlu, hellaswag, arc, ...); "
                                             "comma-separated or repeated, mixed.", show_default=False)] = ...,
    step: Annotated[Optional[int], typer.Option(help="A run's checkpoint step (default: the newest complete "
                                                     "one).", show_default=False)] = None,
    limit: Annotated[Optional[int], typer.Option(help="At most N examples per task (a quick look: such scores are "
                                                      "not comparable with full ones).", min=1,
                                                 show_default=False)] = None,
    num_fewshot: Annotated[Optional[int], typer.Option(help="Few-shot examples per prompt (default: each task's "
                                                            "own).", min=0, show_default=False)] = None,
    batch_size: Annotated[str, typer.Option(help="Requests per forward pass: a number, or auto (lm-eval finds the "
                                                 "largest that fits).")] = "8",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, or auto: cuda if there is one, else cpu.")] = "auto",
    include_path: Annotated[Optional[list[Path]], typer.Option(
        "--include-path", help="A directory of your own lm-eval task YAMLs (repeatable).", show_default=False)] = None,
    out_dir: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="A Hugging Face model directory's results (default: ./keizoku-eval/NAME). A run's go to "
                            "RUN_DIR/eval/step_N.", show_default=False)] = None,
    model_args: Annotated[str, typer.Option(help="More of lm-eval's HF model arguments, k=v,k=v (e.g. "
                                                 "dtype=float32).")] = "",
    remove_export: Annotated[bool, typer.Option("--remove-export", help="A run: remove the checkpoint's export "
                                                "(RUN_DIR/eval/step_N/hf) once it is evaluated (kept by default and "
                                                "reused by the next eval of that step).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="lm-eval's own log lines, the libraries' warnings, and "
                                                            "the traceback of a failure.")] = False,
) -> None:
    """Score a model on lm-evaluation-harness tasks (lm-eval 0.4; pip install 'keizoku[eval]').

    A run directory's checkpoint is first exported to Hugging Face format (verified, as keizoku export does) into
    RUN_DIR/eval/step_N/hf, reused by later evals of that step; lm-eval's results go to
    RUN_DIR/eval/step_N/results.json and the scores to RUN_DIR/metrics.jsonl ({"kind": "downstream", "step": N,
    "TASK/METRIC": value}) and TensorBoard. A Hugging Face model directory is evaluated as it is, its results in
    --out. The tasks' datasets come from the Hugging Face Hub (cached); your own tasks over local files:
    --include-path DIR (docs/eval.md).

    Examples: keizoku eval runs/my-run --tasks ja --limit 100;  keizoku eval my-model-hf --tasks en,lambada_openai

    Exit status: 0 evaluated; 1 failed (the export, lm-eval, a checkpoint pruned meanwhile); 2 bad arguments (an
    unknown task, a path that is neither a run nor a model).
    """
    if not verbose:
        from keizoku.quiet import silence_library_noise

        silence_library_noise()
    from keizoku.downstream import EvalArgumentError, EvalOptions, evaluate as run_eval, table_rows
    from keizoku.errors import KeizokuError

    opts = EvalOptions(tasks=list(tasks), step=step, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                       device=device, include_paths=list(include_path or []), out=out_dir, model_args=model_args,
                       remove_export=remove_export)
    if not (batch_size.isdigit() and int(batch_size) > 0 or batch_size == "auto" or batch_size.startswith("auto:")):
        error(f"--batch-size {batch_size}: a number of at least 1, auto or auto:N")
        raise typer.Exit(ExitCode.CONFIG)
    try:
        outcome = run_eval(path, opts, log=log, verbose=verbose)
    except EvalArgumentError as e:
        error(str(e))
        raise typer.Exit(ExitCode.CONFIG) from None
    except (KeizokuError, OSError) as e:
        error(str(e))
        raise typer.Exit(ExitCode.FAILED) from None
    from rich.table import Table

    t = outcome.target
    out.print(f"{t.path} — checkpoint step {t.step}" if t.run is not None else str(t.path), highlight=False,
              markup=False, soft_wrap=True)
    table = Table()
    for col, justify in (("task", "left"), ("metric", "left"), ("n-shot", "right"), ("value", "right"),
                         ("± stderr", "right")):
        table.add_column(col, justify=justify)
    for row in table_rows(outcome.results):
        table.add_row(*row)
    out.print(table)
    out.print(f"results: {outcome.results_path}", highlight=False, soft_wrap=True)
    if outcome.logged:
        out.print(f"scores appended to {t.run.metrics} (kind downstream, step {t.step})", highlight=False,
                  soft_wrap=True)
