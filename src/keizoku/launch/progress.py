"""What a run has done and where its jobs are: for ``keizoku status`` and the driver's completeness check.

Sources, all in the run directory: ``jobs.jsonl`` (one line per submitted job, by ``keizoku submit``),
``jobs/JOB_ID.json`` (hosts, start, end and exit status, by the launch driver), ``metrics.jsonl`` and
``checkpoints/``; and the scheduler's own view of jobs still in its queue (squeue, qstat).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from keizoku.launch.driver import completed_checkpoint


def total_steps(cfg) -> int:
    from keizoku.data.blend import samples_for

    t = cfg.train
    return samples_for(t.max_steps, t.max_tokens, t.global_batch_size, cfg.data.seq_length)[0]


def total_steps_for_args(train_args: list[str]) -> Optional[int]:
    """Steps of the run `keizoku train ARGS` would do; None if the config does not load (training will say)."""
    from keizoku.config import ConfigError, load

    try:
        return total_steps(load(train_args[0], train_args[1:]))
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
class Status:
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


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file (none if it is missing), skipping a line a crash cut short."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash mid-write
    return out


def last_train_record(run_dir: Path) -> Optional[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    with open(path, "rb") as f:  # the end of a possibly long file
        f.seek(0, 2)
        f.seek(max(0, f.tell() - (1 << 20)))
        tail = f.read().decode(errors="replace").splitlines()
    for line in reversed(tail):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("kind") == "train":
            return record
    return None


def status(run_dir: Path, query_scheduler: bool = True) -> Status:
    run_dir = Path(run_dir)
    submitted = read_jsonl(run_dir / "jobs.jsonl")
    scheduler = submitted[-1]["scheduler"] if submitted else None
    jobs: dict[str, Job] = {}
    for s in submitted:
        jobs[s["job_id"]] = Job(s["job_id"], s.get("link"), s.get("of"), s.get("depends_on"), s.get("submitted"),
                                state="submitted")
    for path in sorted((run_dir / "jobs").glob("*.json")) if (run_dir / "jobs").is_dir() else []:
        try:
            rec = json.loads(path.read_text())
        except ValueError:
            continue
        job = jobs.setdefault(rec["job_id"], Job(rec["job_id"]))
        job.state, job.exit_status, job.hosts = rec.get("state", job.state), rec.get("exit_status"), rec.get("hosts", [])
        if rec.get("stop_reason"):
            job.detail = f"stop: {rec['stop_reason']}"
        scheduler = scheduler or rec.get("scheduler")
    if query_scheduler and scheduler in ("slurm", "gridengine", "pbs"):
        live = scheduler_states(scheduler, list(jobs))
        for job_id, (state, detail) in live.items():
            if job_id in jobs and (jobs[job_id].state in ("submitted", "running") or state != "finished"):
                jobs[job_id].state, jobs[job_id].detail = state, detail or jobs[job_id].detail
    ckpt_step, ckpt = completed_checkpoint(str(run_dir)) or (None, None)  # either engine's layout
    total = None
    config = run_dir / "config.yaml"
    if config.exists():
        total = total_steps_for_args([str(config)])
    return Status(run_dir, scheduler, list(jobs.values()), total, last_train_record(run_dir), ckpt, ckpt_step)


def scheduler_states(scheduler: str, job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """{job id: (state, detail)} for jobs the scheduler still knows; empty if its command is missing."""
    if not job_ids:
        return {}
    try:
        if scheduler == "slurm":
            out = _run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i|%T|%r"])
            rows = [line.split("|") for line in out.splitlines() if line.count("|") == 2]
            return {i: (s.lower(), "" if r in ("None", "(null)") else r) for i, s, r in rows}
        if scheduler == "gridengine":
            out = _run(["qstat", "-u", "*"])
            states = {"qw": "pending", "hqw": "held (waiting for the previous job)", "r": "running",
                      "t": "starting", "dr": "being deleted", "Eqw": "error", "s": "suspended"}
            found = {}
            for line in out.splitlines()[2:]:
                parts = line.split()
                if len(parts) >= 5 and parts[0] in job_ids:
                    found[parts[0]] = (states.get(parts[4], parts[4]), "")
            return found
        if scheduler == "pbs":
            out = _run(["qstat", "-x", *job_ids])
            states = {"Q": "pending", "H": "held (waiting for the previous job)", "R": "running",
                      "E": "exiting", "F": "finished", "X": "finished", "B": "running"}
            found = {}
            for line in out.splitlines():
                parts = line.split()
                if len(parts) >= 5:
                    short_id = parts[0].split(".", 1)[0]
                    for j in job_ids:
                        if j.split(".", 1)[0] == short_id:
                            found[j] = (states.get(parts[4], parts[4]), "")
            return found
    except (OSError, subprocess.SubprocessError):
        return {}
    return {}


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m keizoku.launch.progress total-steps CONFIG [overrides]``: for a driver outside the container."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) >= 2 and args[0] == "total-steps":
        steps = total_steps_for_args(args[1:])
        print("" if steps is None else steps)
        return 0
    print("usage: python -m keizoku.launch.progress total-steps CONFIG [overrides]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
