"""Learning-rate schedules: linear warmup, then cosine, WSD (warmup-stable-decay) or constant.

``lr_at(step)`` gives the learning rate used for optimizer step ``step`` (0-based): warmup climbs linearly
from lr/warmup to lr over ``warmup_steps`` steps (never 0, so the first step learns), then

- cosine: lr → min_lr along half a cosine, reaching min_lr at the last step;
- wsd: lr held until the final ``decay_fraction`` of the steps, then a linear decay to min_lr at the last step;
- constant: lr.
"""

from __future__ import annotations

import math

from keizoku.config import OptimConfig, ScheduleConfig


def lr_at(step: int, total_steps: int, optim: OptimConfig, schedule: ScheduleConfig) -> float:
    lr, min_lr, warmup = optim.lr, optim.min_lr, schedule.warmup_steps
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule.kind == "constant":
        return lr
    last = max(total_steps - 1, warmup)
    if schedule.kind == "cosine":
        progress = (step - warmup) / max(last - warmup, 1)
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_steps = max(1, round(schedule.decay_fraction * total_steps))
    decay_start = max(warmup, last - decay_steps)
    if step <= decay_start:
        return lr
    progress = (step - decay_start) / max(last - decay_start, 1)
    return lr + (min_lr - lr) * min(progress, 1.0)


def lambda_for(total_steps: int, optim: OptimConfig, schedule: ScheduleConfig):
    """A ``torch.optim.lr_scheduler.LambdaLR`` factor function (the optimizer's lr is optim.lr)."""
    return lambda step: lr_at(step, total_steps, optim, schedule) / optim.lr
