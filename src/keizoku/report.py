"""``keizoku report RUN_DIR [RUN_DIR ...]``: one self-contained HTML page of one or more runs — plots as embedded
PNG images (matplotlib's Agg renderer, no display needed), a table per run, nothing fetched from elsewhere.

What it reads of a run directory (``keizoku.rundir``), none of it required but ``metrics.jsonl``:

- ``metrics.jsonl`` (``keizoku.metrics``): ``train`` records (loss, lr, grad_norm, tokens_per_s,
  tokens_per_s_per_device, step_s, tokens; data_share, memory_gib, mfu, router_aux_loss where measured; ``phase``
  in a run with phases), ``eval`` records (``<set>_loss``, ``<set>_ppl``) and ``downstream`` records
  (``<task>/<metric>``, ``keizoku.downstream``). A line a crash cut short is skipped (and counted on the page);
  a step logged twice keeps its last record.
- ``config.yaml`` (read as plain YAML, so that a run written by another keizoku release still reports): the model,
  the engine, the tokens of a step (``train.global_batch_size × data.seq_length``) and the run's planned length.
- ``schedule.json`` (``keizoku.schedule.RunPlan.to_json``): the segments (phases, extensions) and the planned LR.
  Without it, the phase boundaries come from the records' ``phase`` (``boundaries_from_records``).
- ``config-history.jsonl``: the time of the first start (the wall time since then).

The x axis is tokens trained (``--x steps``: optimizer steps). A record's tokens are the train record's at its step;
an eval or downstream record's, or a planned LR's, are interpolated between the train records' (``TokenAxis``), or
step × tokens per step past them. Every plot over the run marks where each phase begins with a vertical line
labelled with its name. A plot with no data is left out, and the page says so.

``loss_figure`` (train loss and every validation set on one plot) is also the quickstart's ``loss.png``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from keizoku.errors import KeizokuError
from keizoku.rundir import RunDir, read_jsonl, write_atomic

REPORT = "report.html"
SCHEDULE = "schedule.json"
# one colour per run, in the order given (matplotlib's tab10)
RUN_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf"]
# a single run's loss plot: one colour per series (the quickstart's: ja red, en blue)
SERIES_COLOURS = ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive",
                  "tab:cyan"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
# the train record's values plotted on their own, after the losses and the learning rate: (key, title, y label)
TRAIN_PLOTS = [
    ("tokens_per_s", "Throughput", "tokens/s"),
    ("tokens_per_s_per_device", "Throughput per device", "tokens/s per device"),
    ("mfu", "MFU", "model FLOPs utilisation"),
    ("grad_norm", "Gradient norm", "grad norm (before clipping)"),
    ("router_aux_loss", "Router load-balancing loss", "router_aux_loss"),
    ("memory_gib", "Peak memory", "GiB (max allocated)"),
    ("data_share", "Data loading share", "share of step time waiting for data"),
]
SMOOTH_ABOVE = 200  # a train series of more points gets a moving average drawn over it


class ReportError(KeizokuError, ValueError):
    """A run directory that cannot be reported on; the message names it and what is missing."""


# ---------------------------------------------------------------------------------------------------------------
# reading a run


@dataclass(frozen=True)
class Boundary:
    """Where a segment of the run (a phase, an extension) begins: after ``step`` optimizer steps, ``tokens`` tokens
    (None: unknown). ``last_step``: its last step where known (schedule.json)."""

    name: str
    step: int
    tokens: Optional[float] = None
    kind: str = "phase"
    last_step: Optional[int] = None


class TokenAxis:
    """Tokens trained after ``step`` optimizer steps: the train records' ``tokens`` where logged, interpolated
    between them, and past the last one (or without any) ``tokens_per_step`` a step (config.yaml; else the last
    record's average)."""

    def __init__(self, train: Sequence[dict], tokens_per_step: Optional[int] = None):
        known = {0: 0.0}
        for r in train:
            if _number(r.get("tokens")) and isinstance(r.get("step"), int):
                known[r["step"]] = float(r["tokens"])
        self.points = sorted(known.items())
        self.per_step = tokens_per_step
        if not self.per_step and self.points[-1][0] > 0:
            self.per_step = self.points[-1][1] / self.points[-1][0]

    @property
    def usable(self) -> bool:
        return bool(self.per_step) or len(self.points) > 1

    def __call__(self, step: float) -> Optional[float]:
        import bisect

        if step <= 0:
            return 0.0
        steps = [s for s, _ in self.points]
        i = bisect.bisect_left(steps, step)
        if i < len(steps) and steps[i] == step:
            return self.points[i][1]
        if i < len(steps):  # between two known points (the first is step 0)
            (s0, t0), (s1, t1) = self.points[i - 1], self.points[i]
            return t0 + (t1 - t0) * (step - s0) / (s1 - s0)
        if not self.per_step:
            return None
        s_last, t_last = self.points[-1]
        return t_last + (step - s_last) * self.per_step


@dataclass
class Run:
    """One run directory, as the report reads it."""

    path: Path
    label: str
    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    downstream: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    schedule: Optional[dict] = None
    history: list[dict] = field(default_factory=list)
    skipped: int = 0  # metrics.jsonl lines that could not be read
    boundaries: list[Boundary] = field(default_factory=list)
    boundary_source: str = ""  # schedule.json | metrics.jsonl | ""
    notes: list[str] = field(default_factory=list)
    tokens: TokenAxis = None  # type: ignore[assignment]

    @property
    def validation_sets(self) -> list[str]:
        """The validation sets, in the order their records first name them."""
        names: dict[str, None] = {}
        for r in self.evals:
            for key, value in r.items():
                if key.endswith("_loss") and _number(value):
                    names[key[: -len("_loss")]] = None
        return list(names)

    @property
    def downstream_metrics(self) -> list[str]:
        names: dict[str, None] = {}
        for r in self.downstream:
            for key, value in r.items():
                if "/" in key and _number(value):
                    names[key] = None
        return list(names)

    @property
    def tokens_per_step(self) -> Optional[int]:
        try:
            per_step = int(self.config["train"]["global_batch_size"]) * int(self.config["data"]["seq_length"])
        except (KeyError, TypeError, ValueError):
            return None
        return per_step or None

    def planned_steps(self) -> Optional[int]:
        """The run's length: schedule.json's last segment, else config.yaml's phases and extensions (or train)."""
        if self.schedule and self.schedule.get("segments"):
            last = self.schedule["segments"][-1].get("last_step")
            if isinstance(last, int):
                return last
        parts = [p for p in (self.config.get("phases") or []) if isinstance(p, dict)] or [self.config.get("train")]
        parts += [p for p in (self.config.get("extensions") or []) if isinstance(p, dict)]
        total = 0
        for part in parts:
            if not isinstance(part, dict):
                return None
            if isinstance(part.get("max_steps"), int):
                total += part["max_steps"]
            elif isinstance(part.get("max_tokens"), int) and self.tokens_per_step:
                total += math.ceil(part["max_tokens"] / self.tokens_per_step)
            else:
                return None
        return total or None

    def planned_lr(self) -> list[tuple[int, float]]:
        """schedule.json's sample of the planned LR: (step, rate)."""
        points = []
        for item in (self.schedule or {}).get("lr") or []:
            if isinstance(item, (list, tuple)) and len(item) == 2 and _number(item[0]) and _number(item[1]):
                points.append((int(item[0]), float(item[1])))
        return points


def read_metrics(path: str | os.PathLike) -> tuple[list[dict], int]:
    """metrics.jsonl's records, and how many lines could not be read (a line a crash cut short, or one that is no
    record: not an object with a kind and an integer step)."""
    records, skipped = [], 0
    with open(path, "rb") as f:
        for raw in f:
            line = raw.decode("utf-8", errors="replace").strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                skipped += 1
                continue
            if not isinstance(record, dict) or not isinstance(record.get("kind"), str) or \
                    not isinstance(record.get("step"), int) or isinstance(record.get("step"), bool):
                skipped += 1
                continue
            records.append(record)
    return records, skipped


def _by_step(records: list[dict], kind: str) -> list[dict]:
    """The records of ``kind`` in step order; a step logged twice (a replay the logger did not drop) keeps its last."""
    last = {r["step"]: r for r in records if r["kind"] == kind}
    return [last[s] for s in sorted(last)]


def boundaries_from_schedule(schedule: dict, tokens_at: Callable[[float], Optional[float]]) -> list[Boundary]:
    """schedule.json's segments → where each phase or extension begins (a plain run's one segment has none)."""
    out = []
    for seg in schedule.get("segments") or []:
        if not isinstance(seg, dict) or seg.get("kind") == "run" or not isinstance(seg.get("first_step"), int):
            continue
        start = seg["first_step"] - 1
        tokens = seg.get("first_tokens")
        out.append(Boundary(str(seg.get("name", "?")), start,
                            float(tokens) if _number(tokens) else tokens_at(start),
                            str(seg.get("kind", "phase")),
                            seg.get("last_step") if isinstance(seg.get("last_step"), int) else None))
    return out


def boundaries_from_records(records: Sequence[dict], tokens_at: Callable[[float], Optional[float]]) -> list[Boundary]:
    """Where the records' ``phase`` changes. A record names the phase its step trained in, so a phase begins after
    the last step recorded in the one before (exact where that phase's end was evaluated, as the trainer does;
    otherwise at most a logging interval early). The first phase begins at step 0; records without a phase before
    the first that has one (a run extended later) are the run before it."""
    ordered = sorted((r for r in records if r.get("kind") in ("train", "eval")), key=lambda r: r["step"])
    out: list[Boundary] = []
    current: object = ...  # nothing seen yet
    last_step = 0
    for r in ordered:
        phase = r.get("phase")
        phase = str(phase) if phase is not None else None
        if current is ... or phase != current and phase is not None:
            if phase is not None:
                start = 0 if current is ... else last_step
                out.append(Boundary(phase, start, tokens_at(start), "phase"))
            current = phase
        if phase == current:
            last_step = r["step"]
    return out


def read_run(path: str | os.PathLike, label: Optional[str] = None) -> Run:
    """Everything the report shows of the run in ``path``; ReportError if it has no metrics.jsonl."""
    run_dir = RunDir(path)
    if not run_dir.path.is_dir():
        raise ReportError(f"{run_dir.path}: no such run directory")
    if not run_dir.metrics.is_file():
        raise ReportError(f"{run_dir.path}: no {run_dir.metrics.name} (not a keizoku run directory, or a run that "
                          "has not logged a step yet)")
    run = Run(run_dir.path, label or run_dir.path.absolute().name)
    records, run.skipped = read_metrics(run_dir.metrics)
    run.train, run.evals, run.downstream = (_by_step(records, k) for k in ("train", "eval", "downstream"))
    if run.skipped:
        run.notes.append(f"{run.skipped} unreadable line{'s' * (run.skipped > 1)} of {run_dir.metrics.name} skipped "
                         "(cut short by a crash?)")
    run.config = _read_yaml(run_dir.config, run.notes)
    run.history = read_jsonl(run_dir.history)
    run.tokens = TokenAxis(run.train, run.tokens_per_step)
    schedule_path = run_dir.path / SCHEDULE
    if schedule_path.is_file():
        try:
            schedule = json.loads(schedule_path.read_text())
            if not isinstance(schedule, dict) or not isinstance(schedule.get("segments"), list):
                raise ValueError("no segments")
            run.schedule = schedule
        except (ValueError, OSError) as e:
            run.notes.append(f"{SCHEDULE} unreadable ({e}); phases taken from {run_dir.metrics.name}")
    if run.schedule is not None:
        run.boundaries, run.boundary_source = boundaries_from_schedule(run.schedule, run.tokens), SCHEDULE
    else:
        run.boundaries = boundaries_from_records(run.train + run.evals, run.tokens)
        run.boundary_source = run_dir.metrics.name if run.boundaries else ""
    return run


def read_runs(paths: Sequence[str | os.PathLike], labels: Sequence[str] = ()) -> list[Run]:
    """The runs in ``paths``, named by ``labels`` in order, the rest by their directory's name (with its parent's
    where two share one)."""
    if len(labels) > len(paths):
        raise ReportError(f"{len(labels)} --label for {len(paths)} run director{'y' if len(paths) == 1 else 'ies'}: "
                          "give at most one per run, in the runs' order")
    names = [Path(p).absolute().name for p in paths]
    runs = []
    for i, p in enumerate(paths):
        label = labels[i] if i < len(labels) else None
        if label is None and names.count(names[i]) > 1:
            label = "/".join(Path(p).absolute().parts[-2:])
        runs.append(read_run(p, label))
    return runs


def _read_yaml(path: Path, notes: list[str]) -> dict:
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, OSError) as e:
        notes.append(f"{path.name} unreadable: {' '.join(str(e).split())[:200]}")
        return {}
    return data if isinstance(data, dict) else {}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------------------------
# the figures


@dataclass
class Plot:
    """One figure of the page: its title, the image, what it shows (the caption)."""

    title: str
    png: bytes
    caption: str
    slug: str


class _X:
    """The x axis shared by every plot over the run: tokens trained, or optimizer steps."""

    def __init__(self, runs: Sequence[Run], axis: str = "tokens"):
        self.tokens = axis == "tokens" and all(r.tokens.usable for r in runs)
        self.label = "tokens trained" if self.tokens else "optimizer step"

    def of(self, run: Run, step: float) -> Optional[float]:
        return run.tokens(step) if self.tokens else float(step)

    def series(self, run: Run, records: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
        """(x, y) of the records that hold a number under ``key``; a train record's own ``tokens`` are its x."""
        xs, ys = [], []
        for r in records:
            value = r.get(key)
            if not _number(value):
                continue
            x = float(r["tokens"]) if self.tokens and _number(r.get("tokens")) else self.of(run, r["step"])
            if x is None:
                continue
            xs.append(x)
            ys.append(float(value))
        return xs, ys

    def boundary(self, run: Run, b: Boundary) -> Optional[float]:
        if not self.tokens:
            return float(b.step)
        return b.tokens if b.tokens is not None else run.tokens(b.step)


def _figure(ylabel: str, x: _X, title: Optional[str] = None, size=(7.6, 3.7)):
    """A figure of one plot over the run (constrained layout: the legend and the phase labels outside the axes)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=size, dpi=110, layout="constrained")
    ax = fig.subplots()
    if title:
        ax.set_title(title)
    ax.set_xlabel(x.label)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if x.tokens:
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _si(v)))
    return fig, ax


def _si(value: float) -> str:
    """1.5e9 → 1.5B: tokens as people say them."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.4g}{unit}"
    return f"{value:.4g}"


def _draw_boundaries(ax, runs: Sequence[Run], x: _X, colours: Sequence[str]) -> list[str]:
    """Each run's phase boundaries: a dotted vertical line where a phase begins (none at the very start), and its
    name above the plot, a row per run, in the run's colour; a phase that begins beyond the plotted data (a run not
    yet there) is left out. Returns the names drawn."""
    drawn = []
    row = 0
    ax.set_xlim(left=0)  # every plot over the run starts where the run does; the data decide where it ends
    right = ax.get_xlim()[1]
    for run, colour in zip(runs, colours):
        placed = False
        for b in run.boundaries:
            pos = x.boundary(run, b)
            if pos is None or pos > right:  # a phase planned beyond what is plotted (schedule.json)
                continue
            if b.step > 0:
                ax.axvline(pos, color=colour, ls=":", lw=1.3, alpha=0.9, zorder=1)
            ax.annotate(b.name, xy=(pos, 1), xycoords=ax.get_xaxis_transform(), xytext=(1, 2 + 11 * row),
                        textcoords="offset points", ha="left", va="bottom", fontsize=8, color=colour,
                        annotation_clip=False, gid=f"phase:{b.name}")
            drawn.append(b.name)
            placed = True
        row += placed
    return drawn


def _finish(fig, ax, runs: Sequence[Run], x: _X, colours: Sequence[str]) -> tuple[bytes, list[str]]:
    """Phase boundaries, the legend (beside the plot when it is long), and the PNG."""
    phases = _draw_boundaries(ax, runs, x, colours)
    handles, labels = ax.get_legend_handles_labels()
    if len(runs) == 1 and len(handles) == 1:
        pass  # one line of one run: the page names it
    elif len(handles) > 3:
        fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    elif handles:
        ax.legend(fontsize=8, loc="best")
    image = io.BytesIO()
    fig.savefig(image, format="png")
    return image.getvalue(), phases


def _smoothed(ys: list[float]) -> Optional[list[float]]:
    """A centred moving average over about 2% of the points, for a long noisy series; None for a short one."""
    if len(ys) <= SMOOTH_ABOVE:
        return None
    import numpy as np

    half = max(1, len(ys) // 100)
    values = np.asarray(ys, dtype=float)
    sums = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(len(values))
    lo, hi = np.maximum(idx - half, 0), np.minimum(idx + half + 1, len(values))
    return list((sums[hi] - sums[lo]) / (hi - lo))


def _caption(what: str, phases: Sequence[str]) -> str:
    text = what
    if phases:
        text += f"; dotted lines: where each phase begins ({', '.join(dict.fromkeys(phases))})"
    return text


def loss_figure(runs: Sequence[Run], axis: str = "tokens", title: Optional[str] = None,
                train_label: str = "train loss"):
    """Train loss and each validation set's loss on one plot. One run: a colour per series (train grey); several: a
    colour per run and a marker per validation set. Returns (figure, its PNG, the phases drawn); None without
    losses."""
    x = _X(runs, axis)
    single = len(runs) == 1
    sets = list(dict.fromkeys(s for r in runs for s in r.validation_sets))
    if not any(x.series(r, r.train, "loss")[0] for r in runs) and not sets:
        return None
    fig, ax = _figure("loss (nats/token)", x, title)
    for i, run in enumerate(runs):
        colour = _colour(i) if not single else "0.55"
        xs, ys = x.series(run, run.train, "loss")
        smooth = _smoothed(ys)
        name = train_label if single else f"{run.label}: train"
        ax.plot(xs, ys, color=colour, lw=1.0, alpha=0.35 if smooth else 0.9, label=None if smooth else name,
                gid=f"train:{run.label}")
        if smooth:
            ax.plot(xs, smooth, color=colour, lw=1.4, label=f"{name} (moving average)")
        for j, s in enumerate(sets):
            xs, ys = x.series(run, run.evals, f"{s}_loss")
            if not xs:
                continue
            c = SERIES_COLOURS[j % len(SERIES_COLOURS)] if single else _colour(i)
            ax.plot(xs, ys, color=c, marker=MARKERS[j % len(MARKERS)], ms=4, lw=1.3, ls="-" if single else "--",
                    label=f"{s} validation loss" if single else f"{run.label}: {s} validation",
                    gid=f"eval:{run.label}:{s}")
    png, phases = _finish(fig, ax, runs, x, ["0.3"] if single else [_colour(i) for i in range(len(runs))])
    return fig, png, phases


def write_loss_png(run_dir: str | os.PathLike, out: str | os.PathLike, title: str, axis: str = "steps",
                   train_label: str = "train loss") -> Path:
    """``loss_figure`` of one run as a PNG file (the quickstart's loss.png), written atomically."""
    found = loss_figure([read_run(run_dir)], axis, title, train_label)
    if found is None:
        raise ReportError(f"{run_dir}: no losses recorded to plot")
    return write_atomic(out, found[1])


def _colour(i: int) -> str:
    return RUN_COLOURS[i % len(RUN_COLOURS)]


def _series_plot(runs: Sequence[Run], x: _X, title: str, ylabel: str, pick: Callable[[Run], Sequence[dict]],
                 key: str, caption: str, markers: bool = False, log_if_wide: bool = False,
                 extra: Optional[Callable] = None, sci: bool = False) -> Optional[Plot]:
    """One value over the run, a line per run; None when no run has it."""
    data = [(run, *x.series(run, pick(run), key)) for run in runs]
    if not any(xs for _, xs, _ in data):
        return None
    values = [y for _, _, ys in data for y in ys]
    if sci and max(map(abs, values)) > 0:  # 3e-4 as 3.0 with "(×1e-4)" in the label: no offset text in the corner
        from matplotlib.ticker import FuncFormatter

        exponent = math.floor(math.log10(max(map(abs, values))))
        ylabel = f"{ylabel} (×1e{exponent})"
    fig, ax = _figure(ylabel, x)
    if sci and max(map(abs, values)) > 0:
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 10 ** exponent:.3g}"))
    colours = [_colour(i) for i in range(len(runs))]
    for (run, xs, ys), colour in zip(data, colours):
        if not xs:
            continue
        smooth = None if markers else _smoothed(ys)
        ax.plot(xs, ys, color=colour, lw=1.2, alpha=0.35 if smooth else 1.0, marker="o" if markers else None, ms=4,
                label=None if smooth else run.label, gid=f"{key}:{run.label}", zorder=3)
        if smooth:
            ax.plot(xs, smooth, color=colour, lw=1.4, label=f"{run.label} (moving average)", zorder=3)
    if extra is not None:
        extra(ax, colours)
    if log_if_wide and min(values) > 0 and max(values) / min(values) > 100:
        ax.set_yscale("log")
    png, phases = _finish(fig, ax, runs, x, colours)
    return Plot(title, png, _caption(caption, phases), _slug(title))


def build_plots(runs: Sequence[Run], axis: str = "tokens") -> tuple[list[Plot], list[str]]:
    """The page's figures, in order, and a note for each kind of plot left out for want of data."""
    x = _X(runs, axis)
    plots: list[Plot] = []
    missing: list[str] = []

    def add(plot: Optional[Plot], absent: Optional[str] = None) -> None:
        if plot is not None:
            plots.append(plot)
        elif absent:
            missing.append(absent)

    found = loss_figure(runs, axis)
    if found is not None:
        _, png, phases = found
        what = ("train loss (each train record's loss) and each validation set's loss (eval records)"
                + ("; colour: the run, marker: the validation set" if len(runs) > 1 else ""))
        plots.append(Plot("Train and validation loss", png, _caption(what, phases), "loss"))
    else:
        missing.append("no training steps or evaluations recorded yet")
    sets = list(dict.fromkeys(s for r in runs for s in r.validation_sets))
    if len(runs) > 1:
        add(_series_plot(runs, x, "Train loss", "loss (nats/token)", lambda r: r.train, "loss",
                         "train loss of each run"))
        for s in sets:
            add(_series_plot(runs, x, f"Validation loss: {s}", "loss (nats/token)", lambda r: r.evals, f"{s}_loss",
                             f"loss on validation set {s}", markers=True))
    if not sets:
        missing.append("no validation losses recorded (data.validation is empty, or no evaluation has run yet)")

    def planned(ax, colours):
        for run, colour in zip(runs, colours):
            points = [(x.of(run, s), lr) for s, lr in run.planned_lr()]
            points = [(px, lr) for px, lr in points if px is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, color=colour, ls="--", lw=1.0, alpha=0.6, zorder=2,
                        label=f"{run.label}: planned ({SCHEDULE})", gid=f"planned-lr:{run.label}")

    lr = _series_plot(runs, x, "Learning rate", "learning rate", lambda r: r.train, "lr",
                      "the logged learning rate" + ("; dashed: the schedule as planned (schedule.json)"
                                                    if any(r.planned_lr() for r in runs) else ""), extra=planned,
                      sci=True)
    add(lr, "no learning rate recorded yet")
    for key, title, ylabel in TRAIN_PLOTS:
        add(_series_plot(runs, x, title, ylabel, lambda r: r.train, key, f"{key} of the train records",
                         log_if_wide=key == "grad_norm"))
    metrics = list(dict.fromkeys(m for r in runs for m in r.downstream_metrics))
    for m in metrics:
        add(_series_plot(runs, x, f"Downstream: {m}", m, lambda r: r.downstream, m,
                         f"{m} of the downstream records (keizoku eval)", markers=True))
    if not metrics:
        missing.append("no downstream evaluations yet (keizoku eval RUN_DIR --tasks ..., or eval.downstream)")
    if plots and not x.tokens and axis == "tokens":
        missing.append("x axis: optimizer steps (a run records no tokens and config.yaml gives no tokens per step)")
    return plots, missing


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


# ---------------------------------------------------------------------------------------------------------------
# the run table


@dataclass
class Summary:
    """The run table's row of one run; values as shown (``exact``: the numbers behind some, for the page's data
    attributes)."""

    cells: dict[str, str]
    exact: dict[str, str]


COLUMNS = ["run", "run directory", "model", "engine", "steps", "tokens", "last train loss", "last eval losses",
           "wall time", "phases"]


def summarize(run: Run) -> Summary:
    cfg = run.config
    model = (cfg.get("model") or {}).get("hf_path") if isinstance(cfg.get("model"), dict) else None
    last = run.train[-1] if run.train else None
    done = max([r["step"] for r in run.train + run.evals] or [0])
    planned = run.planned_steps()
    exact: dict[str, str] = {}
    if last is not None and _number(last.get("loss")):
        loss = f"{last['loss']:.4f} (step {last['step']})"
        exact["last train loss"] = repr(float(last["loss"]))
    else:
        loss = "—"
    evals = "—"
    if run.evals:
        e = run.evals[-1]
        values = [(s, e.get(f"{s}_loss")) for s in run.validation_sets]
        evals = ", ".join(f"{s} {v:.4f}" for s, v in values if _number(v)) + f" (step {e['step']})"
        exact["last eval losses"] = json.dumps({s: v for s, v in values if _number(v)})
    tokens = last.get("tokens") if last is not None else None
    return Summary({
        "run": run.label,
        "run directory": str(run.path),
        "model": str(model) if model else "—",
        "engine": str(cfg.get("engine") or "—"),
        "steps": f"{done:,} of {planned:,}" if planned else f"{done:,}",
        "tokens": f"{int(tokens):,} ({_si(tokens)})" if _number(tokens) else "—",
        "last train loss": loss,
        "last eval losses": evals,
        "wall time": _wall_time(run),
        "phases": _phases(run, planned or done),
    }, exact)


def _wall_time(run: Run) -> str:
    """Time in training steps (each train record's step_s × the steps since the record before: an estimate under
    logging.interval > 1, without evaluation and checkpoint time), and time since the first start
    (config-history.jsonl) to the last write of metrics.jsonl."""
    parts = []
    seconds, before = 0.0, 0
    for r in run.train:
        if _number(r.get("step_s")):
            seconds += r["step_s"] * max(r["step"] - before, 1)
        before = r["step"]
    if seconds:
        parts.append(f"{_duration(seconds)} in steps")
    starts = [h.get("time") for h in run.history if isinstance(h, dict) and isinstance(h.get("time"), str)]
    if starts:
        try:
            import calendar

            first = calendar.timegm(time.strptime(starts[0], "%Y-%m-%dT%H:%M:%SZ"))
            end = RunDir(run.path).metrics.stat().st_mtime
            if end >= first:
                parts.append(f"{_duration(end - first)} since the first start "
                             f"({len(starts)} start{'s' * (len(starts) > 1)})")
        except (ValueError, OSError):
            pass
    return "; ".join(parts) or "—"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    d, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    if d:
        return f"{d}d {h}h {m:02d}m"
    if h:
        return f"{h}h {m:02d}m"
    return f"{m}m {s:02d}s" if m else f"{s}s"


def _phases(run: Run, end: int) -> str:
    if not run.boundaries:
        return "—"
    parts = []
    for i, b in enumerate(run.boundaries):
        last = b.last_step if b.last_step is not None else \
            run.boundaries[i + 1].step if i + 1 < len(run.boundaries) else end
        kind = "" if b.kind == "phase" else f" ({b.kind})"
        parts.append(f"{b.name}{kind}: steps {b.step + 1:,}–{last:,}")
    return "; ".join(parts) + f" [{run.boundary_source}]"


# ---------------------------------------------------------------------------------------------------------------
# the page

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em auto;max-width:1400px;color:#222;
padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
h3{font-size:1em;margin:.2em 0}
.meta{color:#666;font-size:.9em}
table.runs{border-collapse:collapse;font-size:.85em;width:100%}
table.runs th,table.runs td{border:1px solid #ddd;padding:.3em .5em;text-align:left;vertical-align:top}
table.runs th{background:#f4f4f4}
.swatch{display:inline-block;width:.9em;height:.9em;border-radius:2px;margin-right:.4em;vertical-align:-.1em}
.plots{display:flex;flex-wrap:wrap;gap:1.2em}
figure{margin:0;flex:1 1 600px;max-width:100%}
figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.8em;color:#555}
ul.notes{font-size:.9em;color:#8a5a00}
"""


def render_html(runs: Sequence[Run], plots: Sequence[Plot], missing: Sequence[str]) -> str:
    from keizoku import __version__

    e = html.escape
    rows = []
    for i, run in enumerate(runs):
        s = summarize(run)
        cells = []
        for col in COLUMNS:
            value = e(s.cells[col])
            if col == "run":
                value = f'<span class="swatch" style="background:{_colour(i)}"></span>{value}'
            exact = f' data-value="{e(s.exact[col])}"' if col in s.exact else ""
            cells.append(f'<td data-col="{e(col)}"{exact}>{value}</td>')
        rows.append(f'<tr class="run" data-run="{e(run.label)}">{"".join(cells)}</tr>')
    notes = [f"{run.label}: {n}" for run in runs for n in run.notes] + list(missing)
    figures = []
    for p in plots:
        data = base64.b64encode(p.png).decode("ascii")
        figures.append(f'<figure id="plot-{e(p.slug)}"><h3>{e(p.title)}</h3>'
                       f'<img alt="{e(p.title)}" title="{e(p.title)}" src="data:image/png;base64,{data}">'
                       f'<figcaption>{e(p.caption)}</figcaption></figure>')
    names = ", ".join(run.label for run in runs)
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>keizoku report: {e(names)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>keizoku report: {e(names)}</h1>",
        f'<p class="meta">made {e(time.strftime("%Y-%m-%d %H:%M:%S %Z"))} by keizoku {e(__version__)} from '
        f'{e(", ".join(str(r.path) for r in runs))}</p>',
        "<h2>Runs</h2>",
        '<table class="runs"><thead><tr>' + "".join(f"<th>{e(c)}</th>" for c in COLUMNS) + "</tr></thead>",
        "<tbody>" + "\n".join(rows) + "</tbody></table>",
        ('<ul class="notes">' + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>") if notes else "",
        "<h2>Plots</h2>",
        '<div class="plots">' + "\n".join(figures) + "</div>" if figures else "<p>Nothing to plot yet.</p>",
        "</body></html>",
        "",
    ])


def make_report(paths: Sequence[str | os.PathLike], out: Optional[str | os.PathLike] = None,
                labels: Sequence[str] = (), axis: str = "tokens") -> Path:
    """Read the runs, plot them, write the page (atomically) to ``out`` — default: the first run's report.html; a
    directory: report.html in it. Returns its path."""
    if not paths:
        raise ReportError("give at least one run directory")
    runs = read_runs(paths, labels)
    plots, missing = build_plots(runs, axis)
    target = Path(out) if out is not None else RunDir(paths[0]).path / REPORT
    if target.is_dir():
        target = target / REPORT
    return write_atomic(target, render_html(runs, plots, missing))
