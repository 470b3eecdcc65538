"""One training step under ``torch.profiler`` (``logging.profile_step``): where a step's time goes.

Each rank of ``logging.profile_ranks`` (default: rank 0) writes, in RUN_DIR/profile/:
- ``rank{R}-step{N}.trace.json.gz``: the timeline (CPU ops, CUDA kernels, NCCL), for https://ui.perfetto.dev or
  chrome://tracing;
- ``rank{R}-step{N}.txt``: the operators sorted by their own device time (CPU time without a GPU), top 50.
Both appear under their final names only when complete. The profiled step itself runs slower (the profiler's own
cost), so its tokens/s in the metrics is not representative; the step before and after are.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from keizoku.config import LoggingConfig
from keizoku.rundir import RunDir, publish, staging_path, write_atomic


def start(logging: LoggingConfig, step: int, rank: int, device: torch.device) -> profile | None:
    """A running profiler when ``step`` (1-based) is ``logging.profile_step`` and ``rank`` one of
    ``logging.profile_ranks``, else None."""
    if logging.profile_step <= 0 or step != logging.profile_step or rank not in logging.profile_ranks:
        return None
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities)
    prof.start()
    return prof


def finish(prof: profile, run_dir: Path, rank: int, step: int, device: torch.device) -> Path:
    """Stop after the step's work has finished and write the trace and the table; returns the table's path."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    prof.stop()
    out = RunDir(run_dir).profile
    out.mkdir(parents=True, exist_ok=True)
    name = f"rank{rank}-step{step}"
    trace = out / f"{name}.trace.json.gz"
    staged = staging_path(trace)  # keeps the .gz suffix, by which torch compresses
    prof.export_chrome_trace(str(staged))
    publish(staged, trace, replace=True)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return write_atomic(out / f"{name}.txt", f"keizoku: step {step}, rank {rank}, operators by {key}\n"
                        + prof.key_averages().table(sort_by=key, row_limit=50) + "\n")
