"""The run's metrics, as both engines write them: ``RUN_DIR/metrics.jsonl``, the console, TensorBoard, W&B.

A record is one JSON line ``{"kind": "train" | "eval" | "downstream", "step": N, ...values}``, appended (a resumed
run continues the file). ``train`` values: loss, lr, grad_norm, tokens_per_s, tokens_per_s_per_device, step_s,
tokens (and, where measured, data_share, memory_gib, memory_retries, mfu; router_aux_loss for a mixture of experts,
whose ``loss`` stays the LM loss); ``eval``: ``<set>_loss`` and
``<set>_ppl`` for each ``data.validation`` set (``eval_values``). ``downstream`` records are appended by
``keizoku eval`` (``keizoku.downstream``, run by hand or by ``eval.downstream`` in a process of its own, not through
``MetricsLogger``): ``{"kind": "downstream", "step": N, "<task>/<metric>": value, ...}``, one per evaluation of the
checkpoint of step N, from lm-eval's ``"<metric>,<filter>"`` (filter ``none`` dropped, another kept after ``_``:
``gsm8k/exact_match_strict-match``; no standard errors); they may come after records of later steps.
``keizoku status`` and the quickstart read them back (``last_record``, ``keizoku.rundir.read_jsonl``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from keizoku.rundir import RunDir, write_atomic


def eval_values(losses: dict[str, float]) -> dict[str, float]:
    """{set: mean token loss} → the eval record's values: ``<set>_loss`` and ``<set>_ppl``."""
    out = {}
    for name, loss in losses.items():
        out[f"{name}_loss"] = loss
        out[f"{name}_ppl"] = math.exp(min(loss, 50))
    return out


class MetricsLogger:
    """Writes records to metrics.jsonl and, as asked, the console, TensorBoard (``tensorboard_dir``) and W&B
    (``wandb``: a run object). Only the process that logs creates one (rank 0, or the last rank under Megatron's
    pipeline parallelism)."""

    def __init__(self, run_dir: str | Path, console: bool = True, tensorboard_dir: Optional[Path] = None,
                 wandb: Any = None):
        self.file = open(RunDir(run_dir).metrics, "a")
        self.console = console
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tensorboard_dir))
            except ImportError:
                print("keizoku: tensorboard is not installed; metrics go to metrics.jsonl only", flush=True)
        self.wandb = wandb

    def log(self, kind: str, step: int, values: dict) -> None:
        self.file.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self.file.flush()
        if self.console:
            shown = "  ".join(f"{k} {_fmt(v)}" for k, v in values.items())
            print(f"[{kind} step {step}] {shown}", flush=True)
        scalars = {f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def resume_at(self, step: int) -> int:
        """A run resumed from its checkpoint of ``step`` replays the steps after it: drop their records (and a line a
        kill cut short) from metrics.jsonl, rewritten atomically, so that it holds one record per step and kind.
        Returns how many were dropped."""
        path = Path(self.file.name)
        self.file.close()
        kept, dropped = [], 0
        for line in path.read_text().splitlines():
            try:
                record_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                record_step = None
            if isinstance(record_step, int) and record_step <= step:
                kept.append(line)
            else:
                dropped += 1
        if dropped:
            write_atomic(path, "".join(f"{line}\n" for line in kept))
        self.file = open(path, "a")
        return dropped

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return str(v)


def last_record(run_dir: str | Path, kind: str = "train") -> Optional[dict]:
    """The last record of ``kind``, read from the end of a possibly long metrics.jsonl."""
    path = RunDir(run_dir).metrics
    if not path.exists():
        return None
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - (1 << 20)))
        tail = f.read().decode(errors="replace").splitlines()
    for line in reversed(tail):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash mid-write, or the partial first line of the tail
        if record.get("kind") == kind:
            return record
    return None
