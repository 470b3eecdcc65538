"""What a run has done and where its jobs are: ``keizoku status`` (``run_status``), and the run's length for the
launch driver's completeness check (``total_steps_for_args``).

Sources, all in the run directory (``keizoku.rundir.RunDir``): ``jobs.jsonl`` (one line per submitted job, by
``keizoku submit``), ``jobs/JOB_ID.json`` (hosts, start, end and exit status, by the launch driver),
``metrics.jsonl``, ``config.yaml`` and ``checkpoints/``; and the scheduler's own view of the jobs still in its
queue (``Scheduler.job_states``: squeue, qstat).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from keizoku.launch.schedulers import SCHEDULERS
from keizoku.metrics import last_record
from keizoku.rundir import ExitCode, RunDir, latest_checkpoint, read_jsonl


def total_steps_for_args(train_args: list[str]) -> Optional[int]:
    """Steps of the run `keizoku train ARGS` would do; None if the config does not load (training will say)."""
    from keizoku.config import ConfigError, load_config
    from keizoku.schedule import run_length

    try:
        return run_length(load_config(train_args[0], train_args[1:])).steps
    except (ConfigError, IndexError):
        return None


@dataclass
class Job:
    job_id: str
    link: Optional[int] = None
    of: Optional[int] = None
    depends_on: Optional[str] = None
    submitted: Optional[float] = None
    state: str = "unknown"  # the scheduler's (pending, running, held...) or the driver's record once ended
    detail: str = ""
    exit_status: Optional[int] = None
    hosts: list[str] = field(default_factory=list)


@dataclass
class RunStatus:
    run_dir: Path
    scheduler: Optional[str]
    jobs: list[Job]
    total_steps: Optional[int]
    last: Optional[dict]  # the last train metrics record
    checkpoint: Optional[str]
    checkpoint_step: Optional[int]

    def to_dict(self) -> dict:
        return {"run_dir": str(self.run_dir), "scheduler": self.scheduler, "total_steps": self.total_steps,
                "last": self.last, "checkpoint": self.checkpoint, "checkpoint_step": self.checkpoint_step,
                "jobs": [vars(j) for j in self.jobs]}


def run_status(run_dir: Path, query_scheduler: bool = True) -> RunStatus:
    """The run's jobs (as submitted, as the driver recorded them, as the scheduler sees them), its last training
    step, its length and its newest complete checkpoint (either engine's)."""
    run = RunDir(run_dir)
    submitted = read_jsonl(run.job_list)
    jobs = {s["job_id"]: Job(s["job_id"], s.get("link"), s.get("of"), s.get("depends_on"), s.get("submitted"),
                             state="submitted") for s in submitted}
    recorded = _add_job_records(run, jobs)
    scheduler = submitted[-1]["scheduler"] if submitted else recorded
    if query_scheduler and scheduler in SCHEDULERS:
        _add_scheduler_states(jobs, SCHEDULERS[scheduler].job_states(list(jobs)))
    newest = latest_checkpoint(run.path)
    total = total_steps_for_args([str(run.config)]) if run.config.exists() else None
    return RunStatus(run.path, scheduler, list(jobs.values()), total, last_record(run.path),
                     str(newest.path) if newest else None, newest.step if newest else None)


def _add_job_records(run: RunDir, jobs: dict[str, Job]) -> Optional[str]:
    """The driver's records into ``jobs``; the first scheduler they name."""
    scheduler = None
    for path in sorted(run.job_records.glob("*.json")) if run.job_records.is_dir() else []:
        try:
            rec = json.loads(path.read_text())
        except ValueError:
            continue
        job = jobs.setdefault(rec["job_id"], Job(rec["job_id"]))
        job.state, job.exit_status = rec.get("state", job.state), rec.get("exit_status")
        job.hosts = rec.get("hosts", [])
        if rec.get("stop_reason"):
            job.detail = f"stop: {rec['stop_reason']}"
        scheduler = scheduler or rec.get("scheduler")
    return scheduler


def _add_scheduler_states(jobs: dict[str, Job], live: dict[str, tuple[str, str]]) -> None:
    """The queue's word wins while a job waits or runs; a finished job keeps the driver's record."""
    for job_id, (state, detail) in live.items():
        if job_id in jobs and (jobs[job_id].state in ("submitted", "running") or state != "finished"):
            jobs[job_id].state, jobs[job_id].detail = state, detail or jobs[job_id].detail


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m keizoku.launch.status total-steps CONFIG [overrides]``: for a driver outside the container."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) >= 2 and args[0] == "total-steps":
        steps = total_steps_for_args(args[1:])
        print("" if steps is None else steps)
        return ExitCode.OK
    print("usage: python -m keizoku.launch.status total-steps CONFIG [overrides]", file=sys.stderr)
    return ExitCode.CONFIG


if __name__ == "__main__":
    sys.exit(main())
