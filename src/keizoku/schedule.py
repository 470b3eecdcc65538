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

``run_plan``: the whole run as ``Segment``s, in order — the run itself (no ``phases:``), or each phase — and then
each extension (``keizoku extend``). A segment has its steps, data (blend, validation sets; its samples are drawn
with seed ``data.seed + index``, ``index`` its place in the run) and its ``LRSchedule``, counted from its own first
step: after a warmup of ``warmup_steps`` from the rate where the run is (``warmup_from``: where the segment before
ended; 0 for the first) up to its ``lr`` (default: optim.lr for the first segment, else where the one before
ended), constant, linear or cosine down to ``min_lr`` at its last step. A run without phases or extensions is one
segment whose schedule is ``LRSchedule.of`` as above: its rates and samples are what they were before phases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from keizoku.config import DatasetEntry, KeizokuConfig, OptimConfig, PhaseConfig, ScheduleConfig


@dataclass(frozen=True)
class RunLength:
    steps: int  # optimizer steps
    samples: int  # training samples (sequences of seq_length + 1 tokens) over the run
    tokens: int  # tokens trained on: samples × seq_length


def run_length(cfg: KeizokuConfig) -> RunLength:
    """The whole run's length: all its segments (phases, extensions)."""
    steps = run_plan(cfg).steps
    t, seq = cfg.train, cfg.data.seq_length
    return RunLength(steps, steps * t.global_batch_size, steps * t.global_batch_size * seq)


def _steps(max_steps: int | None, max_tokens: int | None, tokens_per_step: int) -> int:
    return max_steps if max_steps is not None else math.ceil(max_tokens / tokens_per_step)


@dataclass(frozen=True)
class LRSchedule:
    kind: str  # cosine | wsd | constant | linear (a phase's decay: from warmup_steps to last_step)
    lr: float
    min_lr: float
    warmup_steps: int
    decay_start: int  # the decay runs from this step (at lr) to last_step (at min_lr); cosine: warmup_steps
    last_step: int  # the step that reaches min_lr (cosine, wsd, linear)
    warmup_from: float = 0.0  # the warmup climbs from here (a re-warm: the rate where the run was)

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
            return self.warmup_from + (self.lr - self.warmup_from) * (step + 1) / self.warmup_steps
        if self.kind == "constant" or step <= self.decay_start and self.kind == "wsd":
            return self.lr
        progress = min((step - self.decay_start) / max(self.last_step - self.decay_start, 1), 1.0)
        if self.kind == "cosine":
            return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr + (self.min_lr - self.lr) * progress

    def factor_at(self, step: int) -> float:
        """``lr_at`` as a multiple of lr: what ``torch.optim.lr_scheduler.LambdaLR`` takes."""
        return self.lr_at(step) / self.lr


@dataclass(frozen=True)
class Segment:
    """A stretch of the run with its own data and part of the LR schedule: the run itself, a phase or an
    extension (see the module docstring)."""

    name: str
    kind: str  # run | phase | extension
    index: int  # its place in the run: its samples' seed is data.seed + index
    first_step: int  # optimizer steps of the run before it
    steps: int
    schedule: LRSchedule  # counted from the segment's first step
    blend: list[DatasetEntry] = field(default_factory=list)
    validation: dict[str, list[DatasetEntry]] = field(default_factory=dict)
    blend_key: str = "data.blend"  # the config key its blend comes from, for messages: phases[1].blend, ...

    @property
    def end_step(self) -> int:
        """The run's step count once this segment is done."""
        return self.first_step + self.steps

    def describe(self, tokens_per_step: int) -> str:
        s = self.schedule
        shape = (f"warmup {s.warmup_steps} from {s.warmup_from:.3g} to {s.lr:.3g}, " if s.warmup_steps else
                 f"from {s.lr:.3g}, ")
        shape += {"constant": "constant", "cosine": f"cosine to {s.min_lr:.3g}", "linear": f"linear to {s.min_lr:.3g}",
                  "wsd": f"constant, then linear to {s.min_lr:.3g} from step {self.first_step + s.decay_start + 1}"
                  }[s.kind]
        return (f"{self.kind} {self.name}: steps {self.first_step + 1}-{self.end_step} ({self.steps:,} steps, "
                f"{self.steps * tokens_per_step:,} tokens); LR {shape}")


@dataclass(frozen=True)
class RunPlan:
    """The run's segments in order, and the learning rate of every step."""

    segments: tuple[Segment, ...]
    base_lr: float  # optim.lr: what the optimizer's rate is a multiple of

    @property
    def steps(self) -> int:
        return self.segments[-1].end_step

    def segment_at(self, step: int) -> Segment:
        """The segment that trains step ``step`` (0-based; the run's step count: the last segment)."""
        for seg in self.segments:
            if step < seg.end_step:
                return seg
        return self.segments[-1]

    def lr_at(self, step: int) -> float:
        seg = self.segment_at(step)
        return seg.schedule.lr_at(step - seg.first_step)

    def factor_at(self, step: int) -> float:
        """``lr_at`` as a multiple of optim.lr: what ``torch.optim.lr_scheduler.LambdaLR`` takes."""
        return self.lr_at(step) / self.base_lr

    def to_json(self, tokens_per_step: int, points: int = 2000) -> dict:
        """The plan as RUN_DIR/schedule.json records it: the segments and the rate at up to ``points`` steps
        (every segment's first and last step among them)."""
        stride = max(1, self.steps // points)
        marks = sorted({*range(0, self.steps, stride), self.steps - 1,
                        *(s.first_step for s in self.segments), *(s.end_step - 1 for s in self.segments)})
        return {"segments": [{"name": s.name, "kind": s.kind, "first_step": s.first_step + 1, "last_step": s.end_step,
                              "first_tokens": s.first_step * tokens_per_step,
                              "last_tokens": s.end_step * tokens_per_step} for s in self.segments],
                "lr": [[k + 1, self.lr_at(k)] for k in marks]}


def run_plan(cfg: KeizokuConfig) -> RunPlan:
    """The run's segments: the run itself or its phases, then its extensions (see the module docstring)."""
    per_step = cfg.train.global_batch_size * cfg.data.seq_length
    segments: list[Segment] = []
    if not cfg.phases:
        t = cfg.train
        steps = _steps(t.max_steps, t.max_tokens, per_step)
        segments.append(Segment("run", "run", 0, 0, steps, LRSchedule.of(cfg.optim, cfg.schedule, steps),
                                list(cfg.data.blend), dict(cfg.data.validation)))
    for kind, section, phases in (("phase", "phases", cfg.phases), ("extension", "extensions", cfg.extensions)):
        for i, ph in enumerate(phases):
            segments.append(_segment(cfg, ph, kind, f"{section}[{i}]", segments[-1] if segments else None, per_step))
    return RunPlan(tuple(segments), cfg.optim.lr)


def _segment(cfg: KeizokuConfig, ph: PhaseConfig, kind: str, key: str, before: Segment | None,
             per_step: int) -> Segment:
    steps = _steps(ph.max_steps, ph.max_tokens, per_step)
    where = before.schedule.lr_at(before.steps - 1) if before is not None else 0.0
    lr = ph.lr if ph.lr is not None else (where if before is not None else cfg.optim.lr)
    warmup = min(ph.warmup_steps, steps)
    schedule = LRSchedule(ph.decay, lr, cfg.optim.min_lr if ph.min_lr is None else ph.min_lr, warmup, warmup,
                          max(steps - 1, warmup), warmup_from=where)
    extension = before is not None and kind == "extension"  # by default, more of what the run ended on
    blend = list(ph.blend) or (list(before.blend) if extension else list(cfg.data.blend))
    blend_key = f"{key}.blend" if ph.blend else before.blend_key if extension else "data.blend"
    validation = dict(ph.validation) if ph.validation is not None else \
        dict(before.validation) if extension else dict(cfg.data.validation)
    return Segment(ph.name, kind, before.index + 1 if before is not None else 0,
                   before.end_step if before is not None else 0, steps, schedule, blend, validation, blend_key)


def write_plan(plan: RunPlan, run_dir, tokens_per_step: int) -> Path:
    """RUN_DIR/schedule.json (``RunPlan.to_json``) and RUN_DIR/schedule.png: the rate over the run's steps, each
    segment shaded and named. Returns the plot's path."""
    import io
    import json

    from keizoku.rundir import write_atomic

    run_dir = Path(run_dir)
    record = plan.to_json(tokens_per_step)
    write_atomic(run_dir / "schedule.json", json.dumps(record, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=110)
    steps, rates = zip(*record["lr"])
    ax.plot(steps, rates, color="tab:blue", lw=1.6)
    for i, seg in enumerate(record["segments"]):
        ax.axvspan(seg["first_step"] - 0.5, seg["last_step"] + 0.5, color="0.5" if i % 2 else "0.8", alpha=0.15, lw=0)
        ax.text((seg["first_step"] + seg["last_step"]) / 2, 1.01, seg["name"], transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.set_xlim(0.5, plan.steps + 0.5)
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png")
    plt.close(fig)
    return write_atomic(run_dir / "schedule.png", image.getvalue())
