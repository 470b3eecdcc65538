"""Training engines behind one small interface; ``engine:`` in the config chooses one here, and nowhere else.

Every engine offers the same entry points (``ENGINES``: where each one lives, imported only when called):

- ``train(cfg, allow_changes) -> int``: train the config from its run directory's newest checkpoint (or the base
  model); the process exit status (``keizoku.rundir.ExitCode``); ``allow_changes``: see ``config.save_resolved``;
- ``export(run_dir, out, *, step, verify, log, dtype, verify_logits) -> dict``: a checkpoint of the run → a
  Hugging Face model directory in ``dtype`` (auto: the base model's), verified (``verify_logits``: also the
  logits; None: where the engine finds it affordable); returns what ``out/keizoku_export.json`` records;
- ``import_hf(hf_path, *, out | import_dir, ...)``: for an engine that trains on its own format of the HF weights
  (megatron), the import ``keizoku convert import`` makes; ``None`` where the engine reads HF checkpoints itself.

``torch``: FSDP2 on the Hugging Face model (``keizoku.engines.torch``). ``megatron``: Megatron-Bridge
(``keizoku.engines.megatron``), imported only for ``engine: megatron``. Adding an engine: a package with these
functions, its line in ``ENGINES`` and its name in ``KeizokuConfig.engine``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from keizoku.config import KeizokuConfig, load_config
from keizoku.errors import KeizokuError
from keizoku.rundir import (COMMIT, EXPORT_RECORD, Checkpoint, RunDir, checkpoint_path, committed_checkpoints,
                            find_checkpoint, is_committed)


@dataclass(frozen=True)
class EntryPoints:
    """``module:function`` of each entry point of an engine."""

    train: str
    export: str
    import_hf: Optional[str] = None


ENGINES = {
    "torch": EntryPoints(train="keizoku.engines.torch.trainer:train", export="keizoku.engines.torch.export:export"),
    "megatron": EntryPoints(train="keizoku.engines.megatron.trainer:train",
                            export="keizoku.engines.megatron.export:export",
                            import_hf="keizoku.engines.megatron.importer:import_for_cli"),
}


class ExportError(KeizokuError, ValueError):
    """A run cannot be exported as asked; the message names the run directory or checkpoint."""


def entry_point(engine: str, name: str) -> Callable:
    """The function ``name`` (train, export, import_hf) of ``engine``, imported now."""
    if engine not in ENGINES:
        raise KeizokuError(f"engine: {engine!r} is not available in this version of keizoku ({', '.join(ENGINES)})")
    where = getattr(ENGINES[engine], name)
    if where is None:
        raise KeizokuError(f"engine {engine} has no {name}: it needs none")
    module, function = where.split(":")
    return getattr(importlib.import_module(module), function)


def train(cfg: KeizokuConfig, allow_changes: bool = False) -> int:
    """Train with ``cfg.engine``; the exit status. ``allow_changes``: a run that has trained may change what it
    trains (``config.save_resolved``)."""
    return entry_point(cfg.engine, "train")(cfg, allow_changes=allow_changes)


def export(run_dir: str | Path, out: str | Path, *, step: int | None = None, verify: bool = True, log=print,
           dtype: str = "auto", verify_logits: bool | None = None, overwrite: bool = False) -> dict:
    """Export a run's checkpoint with the engine that trained it (its ``config.yaml`` says which) to ``out``: a new
    or empty directory, or with ``overwrite`` an earlier keizoku export (``check_export_target``)."""
    check_export_target(Path(run_dir), Path(out), overwrite)
    cfg = load_config(RunDir(run_dir).config)
    checkpoint_to_export(Path(run_dir), step, cfg.engine)  # before the engine is imported: a wrong --step fails fast
    return entry_point(cfg.engine, "export")(Path(run_dir), Path(out), step=step, verify=verify, log=log,
                                             dtype=dtype, verify_logits=verify_logits)


def check_export_target(run_dir: Path, out: Path, overwrite: bool) -> None:
    """An export replaces nothing of the user's: ``out`` must be new or empty, or an earlier keizoku export (it holds
    ``EXPORT_RECORD``) given ``overwrite``; never the current directory, the run directory or a folder holding it, nor
    anything inside the run's checkpoints."""
    out, run = out.absolute(), run_dir.absolute()
    if out == Path.cwd().absolute():
        raise ExportError(f"--out {out}: is the current directory; name a new directory for the model")
    if out == run or out in run.parents:
        raise ExportError(f"--out {out}: is or holds the run directory; name a new directory for the model")
    if RunDir(run).checkpoints.absolute() in (out, *out.parents):
        raise ExportError(f"--out {out}: is inside the run's checkpoints, which keizoku manages (and prunes); name a "
                          "directory outside them")
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"--out {out}: is a file; name a new directory for the model")
    if not any(out.iterdir()):
        return
    if not (out / EXPORT_RECORD).is_file():
        raise ExportError(f"--out {out}: exists and holds files that are not a keizoku export; keizoku does not "
                          "replace them: name a new directory")
    if not overwrite:
        raise ExportError(f"--out {out}: holds an earlier keizoku export; add --overwrite to replace it")


def import_hf(engine: str, hf_path: str, **options) -> Path:
    """``keizoku convert import``: the HF checkpoint in ``engine``'s own format (see ``EntryPoints.import_hf``)."""
    return entry_point(engine, "import_hf")(hf_path, **options)


def checkpoint_to_export(run_dir: Path, step: int | None, engine: str) -> Checkpoint:
    """The complete checkpoint of ``step`` (None: the newest) that an export reads, or an ExportError naming the
    run's complete checkpoints (and the asked one, when it is there but incomplete)."""
    found = find_checkpoint(run_dir, step, engine)
    if found is not None:
        return found
    steps = [c.step for c in committed_checkpoints(run_dir, engine)]
    if step is None:
        raise ExportError(f"{run_dir}: no complete checkpoint in {RunDir(run_dir).checkpoints}; train first (a "
                          "checkpoint is saved every checkpoint.interval steps and at the end)")
    others = (f"export a complete one with --step (this run has step{'s' if len(steps) > 1 else ''} "
              f"{', '.join(map(str, steps))}), or leave --step out for the newest") if steps else \
        "the run has no complete checkpoint"
    path = checkpoint_path(run_dir, step, engine)
    if engine == "torch" and path.is_dir() and not is_committed(path):
        raise ExportError(f"{path}: incomplete: it has no {COMMIT}, so its save never finished; {others}")
    raise ExportError(f"{RunDir(run_dir).checkpoints}: no complete checkpoint for step {step}; {others}")
