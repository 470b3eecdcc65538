"""Sharded checkpoints with torch.distributed.checkpoint, written so that a crash never damages the last one.

Layout: ``RUN_DIR/checkpoints/step_00001000/`` holds the DCP shards (model and optimizer), one RNG file per
rank and ``trainer_state.json`` (step, consumed samples and tokens, scheduler). It is written as
``.step_00001000.tmp/`` and renamed when every rank has finished, so a directory under its final name is
complete; ``latest`` only considers those. The newest ``keep_last`` are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under root, if any."""
    if not root.is_dir():
        return None
    done = [d for d in root.iterdir() if _STEP_DIR.match(d.name) and (d / STATE_FILE).exists()]
    return max(done, key=lambda d: d.name, default=None)


def save(root: Path, step: int, model, optimizer, state: dict, keep_last: int) -> Path:
    rank = dist.get_rank()
    final, tmp = root / f"step_{step:08d}", root / f".step_{step:08d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(d for d in root.iterdir() if _STEP_DIR.match(d.name))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(path: Path, model, optimizer) -> dict:
    """Restore model and optimizer; returns the trainer state. The RNG is restored apart (``restore_rng``), right
    before the next step: building the data loader draws from it in between."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return json.loads((path / STATE_FILE).read_text())


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
