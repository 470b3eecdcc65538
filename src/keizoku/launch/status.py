"""What a run has done and where its jobs are: ``keizoku status`` (``run_status``), and the run's length for the
launch driver's completeness check (``total_steps_for_args``).

Sources, all in the run directory (``keizoku.rundir.RunDir``): ``jobs.jsonl`` (one line per submitted job, by
``keizoku submit``), ``jobs/JOB_ID.json`` (hosts, start, heartbeat, end, exit status and what failed, by the launch
driver), ``metrics.jsonl``, ``config.yaml`` and ``checkpoints/``; and the scheduler's own view: of the jobs still in
its queue (``Scheduler.job_states``: squeue, qstat) and of how the others ended (``Scheduler.job_ends``: sacct or
scontrol, qacct, ``qstat -x -f``). How they combine: ``run_status``; the states: docs/launch.md.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from keizoku.launch.driver import HEARTBEAT_S, STALE_AFTER_S
from keizoku.launch.schedulers import SCHEDULERS, JobEnd, QueryError, Scheduler
from keizoku.metrics import last_record
from keizoku.rundir import ExitCode, RunDir, latest_checkpoint, read_jsonl


def total_steps_for_args(train_args: list[str]) -> Optional[int]:
    """Steps of the run `keizoku train ARGS` would do; None if the config does not load (training will say)."""
    from keizoku.config import ConfigError, load_config
    from keizoku.schedule import run_length

    try:
        overrides = [a for a in train_args[1:] if not a.startswith("--")]  # keizoku train's flags: --allow-changes
        return run_length(load_config(train_args[0], overrides)).steps
    except (ConfigError, IndexError):
        return None


# keizoku status's states (docs/launch.md has the table: meaning, what to do)
FAULTS = ("failed", "lost", "cancelled", "error")  # states that get a line saying what to do


@dataclass
class Job:
    job_id: str
    link: Optional[int] = None
    of: Optional[int] = None
    depends_on: Optional[str] = None
    submitted: Optional[float] = None
    state: str = "unknown"  # the queue's (pending, running, held...), else the driver's record, the scheduler's
    detail: str = ""  # what happened: the failed rank and node, the signal, the scheduler's words
    exit_status: Optional[int] = None
    hosts: list[str] = field(default_factory=list)
    log: Optional[str] = None  # the job script's output
    advice: str = ""  # what to do, for a failed, lost or cancelled job


@dataclass
class RunStatus:
    run_dir: Path
    scheduler: Optional[str]
    jobs: list[Job]
    total_steps: Optional[int]
    last: Optional[dict]  # the last train metrics record
    checkpoint: Optional[str]
    checkpoint_step: Optional[int]
    query_error: Optional[str] = None  # why the scheduler's queue could not be asked

    def to_dict(self) -> dict:
        return {"run_dir": str(self.run_dir), "scheduler": self.scheduler, "total_steps": self.total_steps,
                "last": self.last, "checkpoint": self.checkpoint, "checkpoint_step": self.checkpoint_step,
                "query_error": self.query_error, "jobs": [vars(j) for j in self.jobs]}


def run_status(run_dir: Path, query_scheduler: bool = True, now: Optional[float] = None) -> RunStatus:
    """The run's jobs (as submitted, as the scheduler sees them, as the driver recorded them), its last training
    step, its length and its newest complete checkpoint (either engine's).

    A job's state: the queue's while it holds the job; then the driver's record of how it ended; a record that
    never got its end (the driver was killed, its node died) is lost once the job has left the queue, or, with
    no queue to ask, once the driver's pid is gone (seen from its host) or its heartbeat is older than
    ``STALE_AFTER_S``; the scheduler's accounting (``Scheduler.job_ends``) says which jobs were cancelled, and how
    a job that left no record ended. The queue is asked before the records are read, so that a job that ends in
    between is seen with its record."""
    run = RunDir(run_dir)
    now = time.time() if now is None else now
    submitted = read_jsonl(run.job_list)
    jobs = {s["job_id"]: Job(s["job_id"], s.get("link"), s.get("of"), s.get("depends_on"), s.get("submitted"),
                             state="submitted", log=s.get("log")) for s in submitted}
    scheduler_name = submitted[-1]["scheduler"] if submitted else None
    for rec in _job_records(run):
        jobs.setdefault(rec["job_id"], Job(rec["job_id"]))
        scheduler_name = scheduler_name or rec.get("scheduler")
    scheduler = SCHEDULERS.get(scheduler_name or "")
    live: Optional[dict] = None
    query_error = None
    if query_scheduler and scheduler is not None and scheduler.queues_jobs:
        try:
            live = scheduler.job_states(list(jobs))
        except QueryError as e:
            query_error = f"{scheduler.name} could not be asked ({e})"
    records = {rec["job_id"]: rec for rec in _job_records(run)}  # read after the queue: see the docstring
    newest = latest_checkpoint(run.path)
    gone = [] if live is None else [j for j in jobs if j not in live and _ask_accounting(records.get(j))]
    ends = scheduler.job_ends(gone) if gone and scheduler is not None else {}
    for job in jobs.values():
        _settle(job, records.get(job.job_id), live, ends.get(job.job_id), scheduler, now)
        if query_error and job.state == "submitted":
            job.detail = query_error
    _advise(list(jobs.values()), newest, run, scheduler)
    total = total_steps_for_args([str(run.config)]) if run.config.exists() else None
    return RunStatus(run.path, scheduler_name, list(jobs.values()), total, last_record(run.path),
                     str(newest.path) if newest else None, newest.step if newest else None, query_error)


def _ask_accounting(rec: Optional[dict]) -> bool:
    """Whether the accounting can tell more than the driver's record: no record or no end in it; or a stop on
    SIGTERM, which is what scancel and qdel send (and a time limit without a warning), to tell cancelled jobs."""
    if not rec or "ended" not in rec:
        return True
    return str(rec.get("stop_reason")).startswith("SIGTERM")


def _job_records(run: RunDir) -> list[dict]:
    """The driver's records, ``jobs/JOB_ID.json`` (one it is rewriting is read whole or not at all)."""
    out = []
    for path in sorted(run.job_records.glob("*.json")) if run.job_records.is_dir() else []:
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and rec.get("job_id"):
            out.append(rec)
    return out


def _settle(job: Job, rec: Optional[dict], live: Optional[dict], end: Optional[JobEnd],
            scheduler: Optional[Scheduler], now: float) -> None:
    """The job's state and detail from the record, the queue (None: not asked) and the accounting."""
    sched = scheduler.name if scheduler else "the scheduler"
    if rec:
        job.hosts = rec.get("hosts", [])
        job.exit_status = rec.get("exit_status")
    if live is not None and job.job_id in live:  # the queue's word, while it holds the job
        job.state, job.detail = live[job.job_id]
        if rec and "ended" not in rec and job.state == "running":
            job.detail = _silence(rec, now) or job.detail
        return
    if rec and "ended" in rec:  # the driver recorded how it ended
        job.state = rec.get("state", ExitCode.outcome(rec.get("exit_status", 1)))
        if rec.get("detail"):
            job.detail = rec["detail"]
        elif rec.get("stop_reason"):
            job.detail = _stop_words(rec["stop_reason"], scheduler)
        else:
            job.detail = f"exit status {job.exit_status}" if job.state == "failed" else rec.get("note", "")
        if end is not None and end.state == "cancelled":
            job.state = "cancelled"
            job.detail = f"cancelled while running ({end.words})" + (f": {job.detail}" if job.detail else "")
        elif end is not None and end.state in ("out_of_memory", "node_fail") and job.state == "failed":
            job.detail += f" ({end.words})"
        return
    if rec:  # the driver started it and recorded no end
        host = rec.get("driver_host") or (job.hosts[0] if job.hosts else "?")
        if live is None:  # no queue to ask: the driver's liveness
            if _driver_gone(rec):
                job.state = "lost"
                job.detail = (f"the launch driver (pid {rec.get('driver_pid')} on {host}) is gone: it recorded no "
                              f"end ({_heartbeat_age(rec, now)})")
            elif _stale(rec, now):
                job.state, job.detail = "lost", _silence(rec, now)
            else:
                job.state, job.detail = "running", ""
        elif end is not None and end.state == "cancelled":  # it has left the queue
            job.state = "cancelled"
            job.detail = f"cancelled while running ({end.words}); the launch driver recorded no end"
        elif end is not None and end.state == "timeout":
            job.state, job.detail = "lost", f"killed at the time limit before it could save ({end.words})"
        elif end is not None:
            job.state, job.exit_status = "lost", end.exit_status
            job.detail = (f"gone from the {sched} queue: the launch driver on {end.host or host} recorded no end; "
                          f"{end.how()} ({end.words})")
        else:
            job.state = "lost"
            job.detail = (f"gone from the {sched} queue: the launch driver on {host} recorded no end "
                          f"({_heartbeat_age(rec, now)})")
        return
    if live is None:  # never started, as far as the driver's records go; the queue cannot say
        return
    if end is not None and end.state == "cancelled":  # it has left the queue without a record
        job.state, job.detail = "cancelled", f"cancelled before it started ({end.words})"
    elif end is not None:
        job.state, job.exit_status = "failed", end.exit_status
        job.detail = f"the job script ended ({end.how()}) before the launch driver started ({end.words})"
    else:
        cancel = scheduler.cancel_command if scheduler else ""
        job.state = "cancelled"
        job.detail = (f"left the queue without starting, and {sched} keeps no record of it"
                      + (f" (deleted with {cancel}?)" if cancel else ""))


def _stop_words(reason: str, scheduler: Optional[Scheduler]) -> str:
    """``stop: SIGUSR2 received`` and who sends that signal."""
    who = ""
    if scheduler is not None and scheduler.warning_signal and reason.startswith(scheduler.warning_signal):
        who = f"{scheduler.name}'s walltime warning" + (f", or {scheduler.cancel_command}" if scheduler.name ==
                                                        "gridengine" else "")  # qdel of a -notify job warns too
    elif reason.startswith("SIGTERM") and scheduler is not None and scheduler.queues_jobs:
        who = f"{scheduler.cancel_command}, or the time limit"
    return f"stop: {reason}" + (f" ({who})" if who else "")


def _heartbeat_age(rec: dict, now: float) -> str:
    beat = rec.get("heartbeat")
    return f"last heartbeat {_ago(now - beat)} ago" if isinstance(beat, (int, float)) else "no heartbeat recorded"


def _stale_after(rec: dict) -> float:
    return max(STALE_AFTER_S, 4 * float(rec.get("heartbeat_s") or HEARTBEAT_S))


def _stale(rec: dict, now: float) -> bool:
    beat = rec.get("heartbeat")
    return isinstance(beat, (int, float)) and now - beat > _stale_after(rec)


def _silence(rec: dict, now: float) -> str:
    """Words for a driver whose heartbeat is stale, else ''."""
    if not _stale(rec, now):
        return ""
    host = rec.get("driver_host") or "its host"
    return f"no heartbeat from the launch driver on {host} for {_ago(now - rec['heartbeat'])} (more than " \
           f"{_ago(_stale_after(rec))}): killed, hung, or its node is down"


def _driver_gone(rec: dict) -> bool:
    """Whether the driver's process is gone, when this is its host (else: unknown, False)."""
    pid, host = rec.get("driver_pid"), rec.get("driver_host")
    if not isinstance(pid, int) or host != socket.gethostname():
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"driver" not in f.read()  # another process has the pid now
    except FileNotFoundError:
        return True
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass
    return False


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds // 60 % 60} min"


def _advise(jobs: list[Job], newest, run: RunDir, scheduler: Optional[Scheduler]) -> None:
    """For each failed, lost or cancelled job: where to look and what to do (one line)."""
    logs = str(run.logs) if scheduler is not None and scheduler.queues_jobs else \
        "the output of keizoku submit or keizoku launch"
    resume = f"resumes from step {newest.step}" if newest else "starts from the beginning (no checkpoint yet)"
    waiting = [j for j in jobs if j.state in ("pending", "running") or j.state.startswith("held")]
    for job in jobs:
        if job.state not in FAULTS:
            continue
        later = next((j for j in waiting if j.link and job.link and j.link > job.link), None)
        log = f"see {job.log or logs}; " if job.state != "cancelled" else ""
        if job.state == "error":
            job.advice = f"qstat -j {job.job_id} says why; qdel it and submit again"
        elif later is not None:
            job.advice = f"{log}job {later.job_id}, next in the chain, {resume}"
        elif job.state == "failed":
            job.advice = f"{log}fix the cause and submit again: the run {resume}"
        elif job.state == "lost":
            job.advice = f"{log}submit again: the run {resume}"
        else:
            job.advice = f"submit again if that was not meant: the run {resume}"


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
