"""Downstream evaluation with lm-evaluation-harness (lm-eval 0.4.x): ``keizoku eval``, and ``eval.downstream``
while training.

``evaluate(path, options)`` scores a model on lm-eval tasks (``--tasks``: task, group and tag names, globs, and the
presets of ``PRESETS``, comma-separated and mixed). ``path`` is

- a **run directory**: its newest complete checkpoint, or ``--step N``'s, is first exported to Hugging Face format
  with the engine's own export (``keizoku.engines.export``, verified as ``keizoku export`` does) into
  ``RUN_DIR/eval/step_NNNNNNNN/hf`` — the export writes under a staging name and renames, so the directory is there
  whole or not at all, and an earlier export of the same step is reused. The export comes first, before lm-eval is
  loaded, so that a checkpoint that training prunes (it keeps ``checkpoint.keep_last``) is read as early as
  possible; a checkpoint gone before or while it is read ends the eval with one line that says so. lm-eval's full
  results go to ``RUN_DIR/eval/step_NNNNNNNN/results.json`` (published by rename), the scores are appended to
  ``RUN_DIR/metrics.jsonl`` as a ``downstream`` record (``record``), and to TensorBoard (``RUN_DIR/tensorboard``, tags
  ``downstream/<task>/<metric>``) when the run logs there and tensorboard is importable. Two evals of one step at
  once take turns (a lock file in the step's directory);
- a **Hugging Face model directory** (config.json): evaluated as it is; results go to ``--out`` (default
  ``./keizoku-eval/<the directory's name>``: never inside the model's directory); no metrics.jsonl.

The ``downstream`` record: ``{"kind": "downstream", "step": N, "<task>/<metric>": value, ...}`` — lm-eval's
``"<metric>,<filter>"`` keys with the filter ``none`` dropped and any other kept after ``_``
(``gsm8k/exact_match,strict-match`` → ``gsm8k/exact_match_strict-match``); standard errors and non-numbers left out
(results.json has them).

**While training** (``eval.downstream``: ``tasks`` and ``every``): the trainer's logging rank calls
``after_checkpoint(cfg, run_dir, step)`` once the checkpoint of ``step`` is published. It returns at once: a
checkpoint is due when its step is a multiple of ``every × checkpoint.interval``, the end of a phase or extension,
or the run's last step (``is_due``: by step, so it holds across restarts, pruning and stop-saves, which are not due unless they fall on
such a step). A due checkpoint is evaluated

- on a local run (no batch scheduler's job): by ``keizoku eval RUN_DIR --step N`` in a process of its own, in a new
  session (a Ctrl-C or the end of training does not reach it), at a lower priority (``nice``), its output in
  ``RUN_DIR/logs/eval-step_NNNNNNNN.log``; on ``eval.downstream.device`` — by default cpu, with
  ``CUDA_VISIBLE_DEVICES`` emptied, so that it never takes memory from training's GPUs (``cuda:N``: a GPU training
  leaves free);
- in a Grid Engine, Slurm or PBS job: by a job of its own, through ``keizoku submit eval`` with
  ``eval.downstream.profile`` (started the same way, so that training never waits for qsub/sbatch; its output, with
  the job id, in the same log). Without a profile, the training log says that the checkpoint is not evaluated and
  the command that would do it.

lm-eval is imported only here, and only when a model is evaluated (``pip install 'keizoku[eval]'``).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from keizoku.errors import KeizokuError
from keizoku.rundir import EXPORT_RECORD, RunDir, append_jsonl, discard, find_checkpoint, write_atomic

# Presets: names that stand for the usual suites (lm-eval 0.4.7+ task names; docs/eval.md lists them)
PRESETS: dict[str, list[str]] = {
    # the Japanese LLM leaderboard's tasks as lm-eval ships them (lm_eval/tasks/japanese_leaderboard), less JAQKET v2
    # (the group japanese_leaderboard has all eight)
    "ja": ["ja_leaderboard_jcommonsenseqa", "ja_leaderboard_jnli", "ja_leaderboard_marc_ja", "ja_leaderboard_jsquad",
           "ja_leaderboard_xwinograd", "ja_leaderboard_mgsm", "ja_leaderboard_xlsum"],
    "en": ["mmlu", "hellaswag", "arc_easy", "arc_challenge", "winogrande", "piqa", "openbookqa", "gsm8k"],
}
INSTALL = "pip install 'keizoku[eval]'"
RESULTS = "results.json"
EXPORT_DIR = "hf"
LOCK = ".lock"
DEFAULT_BATCH_SIZE = 8
# what keizoku submit eval sets in the profile: one node, and no walltime warning (an eval cut short runs again whole)
EVAL_JOB_SETTINGS = ("nodes=1", "warning_signal_s=0", "stop_margin_s=0")
# what a process started beside training must not inherit: it is no rank of the training's process group
_DISTRIBUTED_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                          "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")
_DISTRIBUTED_PREFIXES = ("TORCHELASTIC_", "OMPI_COMM_WORLD_", "PMI_", "PMIX_RANK", "MV2_COMM_WORLD_")


class EvalError(KeizokuError, RuntimeError):
    """The evaluation could not be done (exit 1); the message names what and what to do."""


class EvalArgumentError(EvalError):
    """A bad argument: an unknown task, a path that is no model, --step where there is no run (exit 2)."""


@dataclass
class EvalOptions:
    tasks: list[str]  # names, presets, comma-separated lists
    step: Optional[int] = None  # a run's checkpoint (None: the newest)
    limit: Optional[int] = None
    num_fewshot: Optional[int] = None
    batch_size: str = str(DEFAULT_BATCH_SIZE)  # a number, or lm-eval's auto / auto:N
    device: str = "auto"  # auto: cuda if available, else cpu
    include_paths: list[Path] = field(default_factory=list)
    out: Optional[Path] = None  # an HF directory's results (default: ./keizoku-eval/NAME)
    model_args: str = ""  # more of lm-eval's HF model arguments: k=v,k=v
    remove_export: bool = False  # a run's export is removed once evaluated


@dataclass
class Target:
    """What ``keizoku eval PATH`` evaluates, and where its results go."""

    path: Path  # as given
    run: Optional[RunDir]  # a run directory, or None for an HF model directory
    step: Optional[int]  # the run's checkpoint
    results_dir: Path  # RUN_DIR/eval/step_NNNNNNNN, or --out
    engine: str = "torch"
    trust_remote_code: bool = False
    tensorboard: bool = False  # the run logs to TensorBoard

    @property
    def export_dir(self) -> Path:
        return self.results_dir / EXPORT_DIR

    @property
    def results(self) -> Path:
        return self.results_dir / RESULTS


@dataclass
class Outcome:
    target: Target
    model_dir: Path
    tasks: list[str]
    results: dict  # lm-eval's
    scores: dict[str, float]  # the downstream record's values
    results_path: Path
    logged: bool  # a metrics.jsonl record was appended


# --- tasks ----------------------------------------------------------------------------------------------------

def expand_tasks(items: list[str]) -> list[str]:
    """Task names from ``--tasks`` items: comma-separated, presets expanded, each name once, in order."""
    out: list[str] = []
    for item in items:
        for name in (n.strip() for n in item.split(",")):
            if not name:
                continue
            for task in PRESETS.get(name, [name]):
                if task not in out:
                    out.append(task)
    return out


def _preset_of(task: str) -> str:
    return next((f" (preset {name})" for name, tasks in PRESETS.items() if task in tasks), "")


def task_manager(names: list[str], include_paths: list[Path], log: Callable[[str], None]):
    """An lm-eval TaskManager that knows every name (only the include paths' tasks when they are all there: lm-eval's
    own index of its thousands of tasks takes seconds), and the names with each glob expanded (as lm-eval's own
    command line does); EvalArgumentError naming the unknown ones."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_paths]
    for p in include_paths:
        if not p.is_dir():
            raise EvalArgumentError(f"--include-path {p}: no such directory (it holds your lm-eval task YAMLs)")
    if paths:
        tm = TaskManager(include_path=paths, include_defaults=False)
        if not _unknown(tm, names):
            return tm, _expanded(tm, names)
    log("indexing lm-eval's tasks")
    tm = TaskManager(include_path=paths or None)
    unknown = _unknown(tm, names)
    if unknown:
        said = []
        for name in unknown:
            close = difflib.get_close_matches(name, tm.all_tasks, n=3, cutoff=0.7)
            said.append(f"{name!r}{_preset_of(name)}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
        what = "a task, group or tag" if len(unknown) == 1 else "tasks, groups or tags"
        raise EvalArgumentError(
            f"--tasks: {', '.join(said)}: not {what} of lm-eval {_lm_eval_version()}"
            f"{' or of --include-path' if paths else ''}; `lm-eval ls tasks` (older releases: `lm_eval --tasks list`) "
            f"lists them; presets: {', '.join(PRESETS)}; your own task YAMLs: --include-path DIR")
    return tm, _expanded(tm, names)


def _expanded(tm, names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        for task in (tm.match_tasks([name]) if _is_glob(name) and name not in tm.all_tasks else [name]):
            if task not in out:
                out.append(task)
    return out


def _is_glob(name: str) -> bool:
    return any(c in name for c in "*?[")


def _unknown(tm, names: list[str]) -> list[str]:
    known = set(tm.all_tasks)
    return [n for n in names if n not in known and not (_is_glob(n) and tm.match_tasks([n]))]


def _lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "?"


def require_lm_eval() -> None:
    """EvalError unless lm-eval and its Hugging Face backend can be imported."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise EvalError(f"lm-eval (lm-evaluation-harness) is not installed: {INSTALL}")
    for name in ("accelerate", "transformers"):
        if importlib.util.find_spec(name) is None:
            raise EvalError(f"lm-eval's Hugging Face backend needs {name}, which is not installed: {INSTALL} (or pip "
                            "install 'lm-eval[hf]')")


# --- what PATH is ---------------------------------------------------------------------------------------------

def eval_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """Where a run's evaluation of the checkpoint of ``step`` lives."""
    return RunDir(run_dir).path / "eval" / f"step_{step:08d}"


def log_path(run_dir: str | os.PathLike, step: int) -> Path:
    """The log of the eval that ``after_checkpoint`` starts for ``step``."""
    return RunDir(run_dir).logs / f"eval-step_{step:08d}.log"


def default_out(model_dir: Path) -> Path:
    """Where an HF directory's results go without --out: ./keizoku-eval/NAME, never inside the model's directory."""
    return Path("keizoku-eval") / (model_dir.resolve().name or "model")


def resolve(path: Path, step: Optional[int], out: Optional[Path]) -> Target:
    """The run directory's checkpoint, or the HF directory, that ``path`` names; EvalArgumentError if neither."""
    from keizoku.config import ConfigError, load_config

    run = RunDir(path)
    if run.config.is_file():
        if out is not None:
            raise EvalArgumentError(f"--out {out}: a run's results go to {run.path / 'eval'}/step_N (leave --out out; "
                                    "it is for a Hugging Face model directory)")
        try:
            cfg = load_config(run.config)
        except ConfigError as e:
            raise EvalError(f"{run.config}: does not load ({str(e).splitlines()[0]})") from None
        from keizoku.engines import ExportError, checkpoint_to_export

        try:
            found = checkpoint_to_export(run.path, step, cfg.engine)
        except ExportError as e:
            raise EvalError(_gone(str(e), run, step, cfg.engine)) from None
        return Target(path, run, found.step, eval_dir(run.path, found.step), cfg.engine, cfg.model.trust_remote_code,
                      cfg.logging.tensorboard)
    if (path / "config.json").is_file():
        if step is not None:
            raise EvalArgumentError(f"--step {step}: {path} is a Hugging Face model directory, not a keizoku run "
                                    "directory; --step picks a run's checkpoint")
        return Target(path, None, None, out if out is not None else default_out(path))
    if not path.exists():
        raise EvalArgumentError(f"{path}: no such directory")
    raise EvalArgumentError(f"{path}: neither a keizoku run directory (no config.yaml) nor a Hugging Face model "
                            "directory (no config.json)")


def _gone(message: str, run: RunDir, step: Optional[int], engine: str) -> str:
    """A missing checkpoint's message, and, for one older than the newest, that training may have pruned it."""
    from keizoku.rundir import committed_checkpoints

    steps = [c.step for c in committed_checkpoints(run.path, engine)]
    if step is not None and steps and step < steps[-1]:
        return (f"{message} (training keeps only its newest checkpoint.keep_last checkpoints: one it has pruned is "
                f"gone for good; evaluate one that is there — step{'s' if len(steps) > 1 else ''} "
                f"{', '.join(map(str, steps))} — or raise checkpoint.keep_last so that evals keep up)")
    return message


# --- evaluating -----------------------------------------------------------------------------------------------

def evaluate(path: Path, opts: EvalOptions, log: Callable[[str], None] = print, verbose: bool = False) -> Outcome:
    """``keizoku eval PATH`` (the module docstring): the export, lm-eval, the results and the record."""
    names = expand_tasks(opts.tasks)
    if not names:
        raise EvalArgumentError("--tasks: no task given (task names, groups, or the presets "
                                f"{', '.join(PRESETS)}, comma-separated)")
    for p in opts.include_paths:
        if not p.is_dir():
            raise EvalArgumentError(f"--include-path {p}: no such directory (it holds your lm-eval task YAMLs)")
    target = resolve(path, opts.step, opts.out)
    require_lm_eval()
    if target.run is None:
        return _evaluate_model(target, path, names, opts, log, verbose)
    target.results_dir.mkdir(parents=True, exist_ok=True)
    with _locked(target.results_dir / LOCK, log, f"checkpoint step {target.step}"):
        try:
            model_dir = export_for_eval(target, log)
            return _evaluate_model(target, model_dir, names, opts, log, verbose)
        finally:
            if opts.remove_export and target.export_dir.exists():
                discard(target.export_dir)
                log(f"removed the export {target.export_dir} (--remove-export)")


def export_for_eval(target: Target, log: Callable[[str], None]) -> Path:
    """The run's checkpoint as an HF model in ``RUN_DIR/eval/step_N/hf``: an earlier export of it, or a new one."""
    from keizoku import engines

    out, run = target.export_dir, target.run
    assert run is not None and target.step is not None
    record = _export_record(out)
    if record is not None and record.get("step") == target.step:
        log(f"reusing the export of checkpoint step {target.step} in {out}")
        return out
    log(f"exporting checkpoint step {target.step} to {out}")
    try:
        engines.export(run.path, out, step=target.step, log=log, overwrite=True)
    except (KeizokuError, OSError) as e:
        if find_checkpoint(run.path, target.step, target.engine) is None:
            raise EvalError(_gone(f"{run.checkpoints}: checkpoint step {target.step} was removed while it was being "
                                  "exported; nothing was evaluated", run, target.step, target.engine)) from None
        raise EvalError(f"exporting checkpoint step {target.step} for the eval: {_one_line(e)}") from None
    return out


def _export_record(out: Path) -> Optional[dict]:
    try:
        record = json.loads((out / EXPORT_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


@contextmanager
def _locked(path: Path, log: Callable[[str], None], what: str) -> Iterator[None]:
    """One eval of a step at a time (another waits): an flock on ``path``, released when the process ends."""
    import fcntl

    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another keizoku eval of {what} is running; waiting for it to finish")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _evaluate_model(target: Target, model_dir: Path, names: list[str], opts: EvalOptions, log,
                    verbose: bool) -> Outcome:
    results = run_lm_eval(model_dir, names, opts, log, verbose, trust_remote_code=target.trust_remote_code)
    scores = record_values(results)
    results["keizoku"] = {"path": str(target.path.absolute()), "model": str(model_dir.absolute()),
                          "step": target.step, "tasks": names, "scores": scores, "argv": sys.argv[1:],
                          "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    target.results_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(target.results, _to_json(results))
    logged = False
    if target.run is not None:
        append_jsonl(target.run.metrics, record(target.step, scores))
        logged = True
        if target.tensorboard:
            _tensorboard(target.run, target.step, scores, log)
    return Outcome(target, model_dir, names, results, scores, target.results, logged)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_lm_eval(model_dir: Path, names: list[str], opts: EvalOptions, log: Callable[[str], None], verbose: bool = False,
                trust_remote_code: bool = False) -> dict:
    """lm-eval's ``simple_evaluate`` of the HF model in ``model_dir`` on ``names``: its results."""
    import logging

    if not verbose:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    import lm_eval
    import lm_eval.evaluator

    _quiet_git_hash(lm_eval.evaluator)
    tm, names = task_manager(names, opts.include_paths, log)
    device = resolve_device(opts.device)
    model_args: dict = {"pretrained": str(model_dir)}
    if trust_remote_code:
        model_args["trust_remote_code"] = True
    if opts.model_args:
        from lm_eval.utils import simple_parse_args_string

        model_args.update(simple_parse_args_string(opts.model_args))
    batch = int(opts.batch_size) if str(opts.batch_size).isdigit() else opts.batch_size
    log(f"evaluating {model_dir} on {', '.join(names)} (lm-eval {_lm_eval_version()}, device {device}, batch size "
        f"{batch}{f', at most {opts.limit} examples a task' if opts.limit else ''})")
    try:
        results = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=names, num_fewshot=opts.num_fewshot,
                                          batch_size=batch, device=device, limit=opts.limit, task_manager=tm,
                                          log_samples=False)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - lm-eval, datasets and transformers raise anything; one line says it
        if verbose:
            import traceback

            traceback.print_exc()
        raise EvalError(_lm_eval_failure(e)) from None
    if not results:
        raise EvalError("lm-eval returned no results")
    return results


def _quiet_git_hash(evaluator) -> None:
    """lm-eval records the git commit of the working directory, and git says "fatal: not a git repository" on
    stderr outside one: the same record, without the noise."""
    if not hasattr(evaluator, "get_git_commit_hash"):
        return

    def git_hash() -> Optional[str]:
        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL,
                                           text=True).strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    evaluator.get_git_commit_hash = git_hash


def _lm_eval_failure(e: BaseException) -> str:
    text = _one_line(e)
    if isinstance(e, ModuleNotFoundError):
        extra = " (the Japanese tasks: pip install 'lm-eval[japanese_leaderboard]')" if "japanese" in text.lower() or \
            e.name in ("fugashi", "neologdn", "emoji") else ""
        return f"lm-eval needs the module {e.name}, which is not installed: pip install {e.name}{extra} ({text})"
    offline = re.search(r"offline|couldn't reach|connection|resolve|not find.*hub|hub.*not", text, re.IGNORECASE)
    hint = ("; the tasks' datasets come from the Hugging Face Hub: download them once where it is reachable (unset "
            "HF_HUB_OFFLINE; they are cached in HF_DATASETS_CACHE), or evaluate your own task YAMLs over local "
            "files (--include-path)") if offline else "; rerun with --verbose for the traceback"
    return f"lm-eval failed: {type(e).__name__}: {text[:400]}{hint}"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _to_json(results: dict) -> str:
    try:
        from lm_eval.utils import handle_non_serializable
    except ImportError:  # pragma: no cover - every lm-eval 0.4 has it
        handle_non_serializable = str
    return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n"


def record_values(results: dict) -> dict[str, float]:
    """lm-eval's results → the downstream record's values: ``<task>/<metric>`` (the module docstring)."""
    out: dict[str, float] = {}
    for task, metrics in (results.get("results") or {}).items():
        for key, value in metrics.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # alias, name, sample_len; "N/A"
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr"):
                continue
            if not math.isfinite(value):
                continue
            out[f"{task}/{metric if filt in ('', 'none') else f'{metric}_{filt}'}"] = value
    return out


def record(step: int, scores: dict[str, float]) -> dict:
    """The metrics.jsonl record of a run's evaluation."""
    return {"kind": "downstream", "step": step, **scores}


def _tensorboard(run: RunDir, step: int, scores: dict[str, float], log) -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return  # tensorboard is not installed: metrics.jsonl has the scores
    writer = SummaryWriter(str(run.tensorboard))
    try:
        for name, value in scores.items():
            writer.add_scalar(f"downstream/{name}", value, step)
    finally:
        writer.close()


def table_rows(results: dict) -> list[tuple[str, str, str, str, str]]:
    """(task, metric, n-shot, value, ± stderr) of every score in lm-eval's results, for the command's table."""
    rows = []
    shots = results.get("n-shot") or {}
    for task, metrics in (results.get("results") or {}).items():
        for key, value in metrics.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr"):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append((task, metric if filt in ("", "none") else f"{metric} ({filt})", str(shots.get(task, "")),
                         f"{value:.4f}", f"{stderr:.4f}" if isinstance(stderr, (int, float)) else ""))
    return rows


# --- while training -------------------------------------------------------------------------------------------

def is_due(cfg, step: int) -> bool:
    """Whether eval.downstream evaluates the checkpoint of ``step``: a multiple of ``every × checkpoint.interval``,
    the end of a phase or extension, or the run's last step (a checkpoint.interval = 0 run saves only there)."""
    d = cfg.eval.downstream
    if not d.tasks or d.every < 1 or step < 1:
        return False
    from keizoku.schedule import run_plan

    interval = cfg.checkpoint.interval
    return (interval > 0 and step % (interval * d.every) == 0) or \
        step in {segment.end_step for segment in run_plan(cfg).segments}


def after_checkpoint(cfg, run_dir: str | os.PathLike, step: int) -> None:
    """Called by the trainer's logging rank once the checkpoint of ``step`` is published: if it is due (``is_due``),
    start its evaluation without waiting for it — a local process, or a scheduler job (the module docstring). Never
    raises and never blocks (it starts a process); safe to call from any thread. A problem is one line on stderr."""
    try:
        if is_due(cfg, step):
            start_eval(cfg, run_dir, step)
    except Exception as e:  # noqa: BLE001 - training goes on, whatever happens to its evaluation
        _say(f"eval.downstream: checkpoint step {step} is not evaluated: {type(e).__name__}: {_one_line(e)}")


def eval_args(cfg, run_dir: str | os.PathLike, step: int, device: str) -> list[str]:
    """The ``keizoku eval`` arguments that evaluate the checkpoint of ``step`` as eval.downstream says."""
    d = cfg.eval.downstream
    args = [str(Path(run_dir).absolute()), "--step", str(step), "--tasks", ",".join(d.tasks), "--device", device,
            "--batch-size", str(d.batch_size)]
    args += ["--limit", str(d.limit)] if d.limit is not None else []
    args += ["--num-fewshot", str(d.num_fewshot)] if d.num_fewshot is not None else []
    args += ["--include-path", str(Path(d.include_path).absolute())] if d.include_path else []
    args += [] if d.keep_export else ["--remove-export"]
    return args


def start_eval(cfg, run_dir: str | os.PathLike, step: int, env=None) -> Optional[subprocess.Popen]:
    """Start the evaluation of the checkpoint of ``step``: ``keizoku eval`` here, or ``keizoku submit eval`` under a
    batch scheduler (``env``: this process's variables). The process, running on its own; None when nothing was
    started (a scheduler without eval.downstream.profile)."""
    from keizoku.launch.schedulers import scheduler_of

    env = dict(os.environ if env is None else env)
    d = cfg.eval.downstream
    scheduler = scheduler_of(env)
    log = log_path(run_dir, step)
    if scheduler.queues_jobs:
        args = eval_args(cfg, run_dir, step, d.device or "auto")
        if not d.profile:
            _say(f"eval.downstream: checkpoint step {step} is not evaluated: this run is a {scheduler.name} job, and "
                 f"eval.downstream.profile names no site profile for its eval job; set it, or submit it yourself: "
                 f"keizoku submit eval --profile NAME -- {' '.join(args)}")
            return None
        sets = [x for s in d.profile_set for x in ("--set", s)]
        cmd = [sys.executable, "-m", "keizoku", "submit", "eval", "--profile", d.profile, *sets, "--", *args]
        what = f"submitting the eval job of checkpoint step {step} ({scheduler.name})"
    else:
        device = d.device or "cpu"
        cmd = [sys.executable, "-m", "keizoku", "eval", *eval_args(cfg, run_dir, step, device)]
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # it sees no GPU, so it takes no memory from training's
        if shutil.which("nice"):
            cmd = ["nice", "-n", "10", *cmd]
        what = f"evaluating checkpoint step {step} on {device} in the background"
    proc = start_detached(cmd, log, _child_env(env))
    _say(f"eval.downstream: {what} (pid {proc.pid}; log {log})")
    return proc


def start_detached(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    """``cmd`` in a new session (no signal to training's process group reaches it, and it outlives training), its
    output appended to ``log``; reaped by a daemon thread when it ends."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, close_fds=True)
    threading.Thread(target=proc.wait, name=f"keizoku-eval-{proc.pid}", daemon=True).start()
    return proc


def _child_env(env: dict) -> dict:
    """Training's environment less what makes a process a rank of its process group."""
    out = {k: v for k, v in env.items()
           if k not in _DISTRIBUTED_VARIABLES and not k.startswith(_DISTRIBUTED_PREFIXES)}
    out["PYTHONUNBUFFERED"] = "1"
    return out


def _say(message: str) -> None:
    print(f"keizoku: {message}", file=sys.stderr, flush=True)


# --- checks before training starts (keizoku.preflight) ---------------------------------------------------------

def problems(cfg) -> list[str]:
    """What eval.downstream asks that this machine cannot give: lm-eval, its include_path, its profile."""
    d = cfg.eval.downstream
    if not d.tasks or d.every < 1:
        return []
    found = []
    try:
        require_lm_eval()
    except EvalError as e:
        found.append(f"eval.downstream.tasks: {e}")
    if d.include_path and not Path(d.include_path).is_dir():
        found.append(f"eval.downstream.include_path: {d.include_path}: no such directory")
    if d.profile:
        from keizoku.launch.profile import ProfileError, load_profile

        try:
            load_profile(d.profile, [*d.profile_set, *EVAL_JOB_SETTINGS])
        except ProfileError as e:
            found.append(f"eval.downstream.profile: {_one_line(e)}")
    return found
