"""engine: torch's checkpoints: torch.distributed.checkpoint (DCP) shards of model and optimizer, every rank's RNG
and the trainer state, published as one directory so that a crash never damages the last complete one.

``RUN_DIR/checkpoints/step_00001000/`` (``keizoku.rundir``: names, staging, the commit marker, pruning) holds
``__N_M.distcp`` and ``.metadata`` (DCP: model and optimizer state, resharded on load to any world size),
``rng_rank{R}.pt`` (each rank's CPU and CUDA generator) and ``trainer_state.json`` (``TRAINER_STATE``: step,
consumed samples and tokens, the LR scheduler's state, the run's length in steps). Every rank writes into one
staging directory; rank 0 adds the trainer state and commits it when all have finished, then prunes to the newest
``checkpoint.keep_last``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from keizoku import rundir

TRAINER_STATE = "trainer_state.json"


def save(run_dir: Path, step: int, model, optimizer, state: dict, keep_last: int) -> Path:
    """Every rank: write this step's checkpoint; returns its final path once rank 0 has committed it."""
    rank = dist.get_rank()
    final = rundir.checkpoint_path(run_dir, step)
    staged = rundir.staging_path(final, tag="")  # one name that every rank knows
    if rank == 0:
        rundir.discard(staged)  # what a killed save of this step left
        staged.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(staged))
    torch.save(_rng_state(), staged / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        rundir.write_atomic(staged / TRAINER_STATE, json.dumps(state, indent=1))
        rundir.commit_checkpoint(staged, final, step)
        rundir.prune_checkpoints(run_dir, keep_last)
    dist.barrier()
    return final


def restore(path: Path, model, optimizer) -> dict:
    """Restore model and optimizer; returns the trainer state. The RNG is restored apart (``restore_rng``), right
    before the next step: building the data loader draws from it in between."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return read_trainer_state(path)


def read_trainer_state(path: Path) -> dict:
    return json.loads((Path(path) / TRAINER_STATE).read_text())


def restore_rng(path: Path) -> None:
    """This rank's RNG as it was when the checkpoint was saved."""
    rng = path / f"rng_rank{dist.get_rank()}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=False))


def _rng_state() -> dict:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
