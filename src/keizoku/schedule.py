"""How long a run trains and at what learning rate: defined once here, for every engine.

``run_length``: a run of ``train.max_steps`` optimizer steps, or of ``train.max_tokens`` tokens rounded up to
whole global batches, draws ``steps × global_batch_size`` samples of ``seq_length`` tokens.

``LRSchedule``: the learning rate of optimizer step ``k`` (0-based). Warmup climbs linearly from lr/W to lr over
``W = schedule.warmup_steps`` steps (never 0, so the first step learns); then

- cosine: lr → min_lr along half a cosine from step W to the last step;
- wsd (warmup-stable-decay): lr held until ``decay_start``, then a linear decay to min_lr at the last step, over
  the final ``schedule.decay_fraction`` of all steps;
- constant: lr.

The engines use it as it is (engine torch: ``lr_at`` through ``LambdaLR``) or translate its points
(``warmup_steps``, ``decay_start``, ``last_step``) into their own scheduler's settings (engine megatron:
``keizoku.engines.megatron.plan``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from keizoku.config import KeizokuConfig, OptimConfig, ScheduleConfig


@dataclass(frozen=True)
class RunLength:
    steps: int  # optimizer steps
    samples: int  # training samples (sequences of seq_length + 1 tokens) over the run
    tokens: int  # tokens trained on: samples × seq_length


def run_length(cfg: KeizokuConfig) -> RunLength:
    t, seq = cfg.train, cfg.data.seq_length
    steps = t.max_steps if t.max_steps is not None else math.ceil(t.max_tokens / (t.global_batch_size * seq))
    return RunLength(steps, steps * t.global_batch_size, steps * t.global_batch_size * seq)


@dataclass(frozen=True)
class LRSchedule:
    kind: str  # cosine | wsd | constant
    lr: float
    min_lr: float
    warmup_steps: int
    decay_start: int  # the decay runs from this step (at lr) to last_step (at min_lr); cosine: warmup_steps
    last_step: int  # the step that reaches min_lr (cosine, wsd)

    @classmethod
    def of(cls, optim: OptimConfig, schedule: ScheduleConfig, total_steps: int) -> "LRSchedule":
        warmup = schedule.warmup_steps
        last = max(total_steps - 1, warmup)
        if schedule.kind == "wsd":
            decay_steps = max(1, round(schedule.decay_fraction * total_steps))
            decay_start = max(warmup, last - decay_steps)
        else:
            decay_start = warmup
        return cls(schedule.kind, optim.lr, optim.min_lr, warmup, decay_start, last)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.kind == "constant" or step <= self.decay_start and self.kind == "wsd":
            return self.lr
        progress = min((step - self.decay_start) / max(self.last_step - self.decay_start, 1), 1.0)
        if self.kind == "cosine":
            return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr + (self.min_lr - self.lr) * progress

    def factor_at(self, step: int) -> float:
        """``lr_at`` as a multiple of lr: what ``torch.optim.lr_scheduler.LambdaLR`` takes."""
        return self.lr_at(step) / self.lr
