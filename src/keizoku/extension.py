"""``keizoku extend RUN_DIR``: training a run past its end is an explicit act, recorded, never a silent reshape.

Raising ``train.max_steps`` on a trained run would stretch its LR schedule from the first step (keizoku refuses
it). An extension instead appends a segment after the run's planned end (``config.extensions``, a
``PhaseConfig``): the steps before it keep the rates they were trained with, and the new steps either

- **continue the decay from where the rate is** (no warmup; ``lr`` defaults to the rate at the run's last step):
  down to ``min_lr`` along ``decay`` — for a run that ended at min_lr, min_lr on; or
- **re-warm** (Ibrahim et al. 2024, "Simple and Scalable Strategies to Continually Pre-train LLMs"): a linear
  warmup over ``warmup_steps`` from the rate where the run is to a new peak ``lr``, then ``decay`` to ``min_lr``
  at the extension's last step.

The extension is written into RUN_DIR/config.yaml (the run's record, which supplies it to every later start of
the run: ``config._with_recorded_extensions``) and config-history.jsonl (``"act": "extend"``); the checkpoint the
run ended on is marked kept (``rundir.keep_checkpoint``); the whole effective schedule is printed and plotted
(RUN_DIR/schedule.png, schedule.json) before any training resumes. Training then goes on with the usual
``keizoku train CONFIG`` (or the run's own RUN_DIR/config.yaml), ``keizoku submit`` or ``launch``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from keizoku.config import ConfigError, DatasetEntry, KeizokuConfig, PhaseConfig, load_config, save_resolved, validate
from keizoku.errors import KeizokuError
from keizoku.rundir import RunDir, committed_checkpoints, keep_checkpoint, kept_reason
from keizoku.schedule import RunPlan, run_plan, write_plan


class ExtensionError(KeizokuError, ValueError):
    """An extension that cannot be made as asked; the message names the option or the run at fault."""


@dataclass(frozen=True)
class Extended:
    cfg: KeizokuConfig
    plan: RunPlan
    extension: PhaseConfig
    kept: Path | None  # the checkpoint of the run's end, now kept
    plot: Path


def extend(run_dir: str | Path, *, steps: int | None = None, tokens: int | None = None, rewarm_steps: int = 0,
           lr: float | None = None, min_lr: float | None = None, decay: str | None = None, name: str | None = None,
           blend: list[DatasetEntry] | None = None, argv: list[str] | None = None) -> Extended:
    """Append an extension to the run in ``run_dir`` (see the module docstring); returns what was recorded."""
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise ExtensionError(f"{run.path}: not a keizoku run directory (no config.yaml); extend a run that has "
                             "trained")
    cfg = load_config(run.config)
    done = committed_checkpoints(run.path)
    if not done:
        raise ExtensionError(f"{run.path}: has no complete checkpoint yet; train it first (an extension continues a "
                             "run that has trained)")
    if (steps is None) == (tokens is None):
        raise ExtensionError("give the extension's length: --steps N or --tokens N (one of them)")
    before = run_plan(cfg)
    rewarming = rewarm_steps > 0
    if lr is not None and not rewarming:
        raise ExtensionError("--lr is the peak of a re-warm: give --rewarm-steps N with it (without, the decay "
                             "continues from the rate where the run is)")
    extension = PhaseConfig(
        name=name or f"extension-{len(cfg.extensions) + 1}", max_steps=steps, max_tokens=tokens,
        blend=list(blend or []), lr=lr if lr is not None else (cfg.optim.lr if rewarming else None),
        min_lr=min_lr, warmup_steps=rewarm_steps, decay=decay or _decay_of(before, rewarming))
    extended = replace(cfg, extensions=[*cfg.extensions, extension])
    errors = validate(extended)
    if errors:
        raise ConfigError("\n".join(errors))
    plan = run_plan(extended)
    save_resolved(extended, run.path, allow_changes=True, has_trained=True, argv=argv, act="extend")
    kept = None
    last = done[-1]
    if last.engine == "torch" and last.step >= before.steps and not kept_reason(last.path):
        keep_checkpoint(last.path, f"the end of the run before {extension.name}")
        kept = last.path
    per_step = cfg.train.global_batch_size * cfg.data.seq_length
    return Extended(extended, plan, extension, kept, write_plan(plan, run.path, per_step))


def _decay_of(plan: RunPlan, rewarming: bool) -> str:
    """The extension's decay when none is asked: a re-warm decays along a cosine; continuing keeps the shape the run
    ended with (wsd's final decay is linear)."""
    if rewarming:
        return "cosine"
    kind = plan.segments[-1].schedule.kind
    return "linear" if kind == "wsd" else kind
