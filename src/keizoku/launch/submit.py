"""``keizoku submit``: write the job script and the launch plan into the run directory, submit a chain of
jobs, and record their ids.

Files, per submission (``SID`` = UTC time of submission), under ``RUN_DIR/submit/``: ``SID.sh`` (the job
script), ``SID.plan.json`` (what the launch driver does), and with ``--container`` ``SID.launch/`` (a copy
of the driver, run by the node's own python3 outside the image). ``RUN_DIR/jobs.jsonl`` gets one line per
job: id, chain position, the job it waits for.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from keizoku.config import KeizokuConfig
from keizoku.files import write_atomic
from keizoku.launch.driver import EXIT_OK, EXIT_PREEMPTED, Plan
from keizoku.launch.profile import Profile, walltime_seconds
from keizoku.launch.script import JobSpec, job_script, parse_job_id, submit_command

LAUNCH_FILES = ("driver.py", "allocation.py", "port.py")


class SubmitError(RuntimeError):
    pass


@dataclass
class Submission:
    script: Path
    plan: Path
    script_text: str
    commands: list[list[str]] = field(default_factory=list)  # what was (or, dry, would be) run
    job_ids: list[str] = field(default_factory=list)
    exit_status: Optional[int] = None  # local profile: the last run's


def container_python(profile: Profile, image: Path, binds: list[str]) -> list[str]:
    c = profile.container
    cmd = [c.runtime, "exec", *c.flags]
    for b in dict.fromkeys([*binds, *c.binds]):  # ordered, without repeats
        cmd += ["-B", b]
    return cmd + [str(image), c.python]


def prepare(cfg: KeizokuConfig, config_path: Path, overrides: list[str], profile: Profile, *,
            chain: int = 1, container: Optional[Path] = None, name: Optional[str] = None,
            workdir: Optional[Path] = None, command: str = "", sid: Optional[str] = None) -> tuple[Plan, JobSpec, str]:
    """The plan, job spec and script text, without writing anything."""
    from keizoku.launch.progress import total_steps

    workdir = Path(workdir or os.getcwd()).resolve()
    run_dir = (workdir / cfg.run_dir).resolve()
    config_abs = (workdir / config_path).resolve()
    sid = sid or time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    submit_dir = run_dir / "submit"
    if container is not None:
        image = (workdir / container).resolve()
        python = container_python(profile, image, [str(workdir), str(run_dir), str(config_abs.parent)])
        driver = ["python3", str(submit_dir / f"{sid}.launch" / "driver.py"), "--plan", str(submit_dir / f"{sid}.plan.json")]
    else:
        python = [profile.python or sys.executable]
        driver = [*python, "-m", "keizoku.launch.driver", "--plan", str(submit_dir / f"{sid}.plan.json")]
    plan = Plan(
        train_args=[str(config_abs), *overrides], run_dir=str(run_dir), total_steps=total_steps(cfg),
        launcher=profile.launcher, starter=profile.starter,
        procs_per_node=profile.procs_per_node or profile.gpus_per_node, python=python, mpirun=list(profile.mpirun),
        env=dict(profile.env), walltime_s=walltime_seconds(profile.walltime) if profile.walltime else None,
        stop_margin_s=profile.stop_margin_s, failure_grace_s=profile.failure_grace_s, workdir=str(workdir))
    spec = JobSpec(name=name or f"keizoku-{run_dir.name}", run_dir=run_dir, workdir=workdir,
                   plan=submit_dir / f"{sid}.plan.json", driver=driver, command=command)
    return plan, spec, job_script(profile, spec)


def submit(cfg: KeizokuConfig, config_path: Path, overrides: list[str], profile: Profile, *, chain: int = 1,
           container: Optional[Path] = None, dry_run: bool = False, name: Optional[str] = None,
           workdir: Optional[Path] = None, command: str = "", log: Callable[[str], None] = print) -> Submission:
    if chain < 1:
        raise SubmitError(f"--chain: must be at least 1, not {chain}")
    if container is not None and not dry_run and not (Path(workdir or ".") / container).exists():
        raise SubmitError(f"--container {container}: no such image")
    plan, spec, text = prepare(cfg, config_path, overrides, profile, chain=chain, container=container, name=name,
                               workdir=workdir, command=command)
    script = spec.plan.with_name(spec.plan.name.replace(".plan.json", ".sh"))
    sub = Submission(script=script, plan=spec.plan, script_text=text)
    if dry_run:
        sub.commands = [submit_command(profile, script, None if i == 0 else f"<job {i}>") for i in range(chain)]
        return sub
    write_atomic(spec.plan, plan.to_json(), 0o644)
    if container is not None:
        launch_dir = script.with_name(script.name.replace(".sh", ".launch"))
        launch_dir.mkdir(parents=True, exist_ok=True)
        for f in LAUNCH_FILES:
            shutil.copy2(Path(__file__).with_name(f), launch_dir / f)
    write_atomic(script, text, 0o755)
    (spec.run_dir / "logs").mkdir(parents=True, exist_ok=True)
    if profile.scheduler == "local":
        return _run_local(sub, profile, spec, chain, log)
    previous = None
    for link in range(1, chain + 1):
        cmd = submit_command(profile, script, previous)
        sub.commands.append(cmd)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=spec.workdir, timeout=300)
        except FileNotFoundError:
            raise SubmitError(f"{cmd[0]}: command not found (is this a {profile.scheduler} login node?)") from None
        if proc.returncode != 0:
            raise SubmitError(f"{shlex.join(cmd)} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()}"
                              + (f"; submitted so far: {', '.join(sub.job_ids)}" if sub.job_ids else ""))
        job_id = parse_job_id(profile.scheduler, proc.stdout)
        sub.job_ids.append(job_id)
        _record(spec.run_dir, {"job_id": job_id, "scheduler": profile.scheduler, "link": link, "of": chain,
                               "depends_on": previous, "submitted": time.time(), "script": str(script),
                               "plan": str(spec.plan), "nodes": profile.nodes, "walltime": profile.walltime})
        log(f"submitted job {job_id}" + (f" (link {link} of {chain}, after {previous})" if previous else
                                         f" (link 1 of {chain})" if chain > 1 else ""))
        previous = job_id
    return sub


def _run_local(sub: Submission, profile: Profile, spec: JobSpec, chain: int, log) -> Submission:
    """No scheduler: run the job script here, again after each walltime-style stop (exit 3)."""
    for link in range(1, chain + 1):
        job_id = f"local-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{link}"
        _record(spec.run_dir, {"job_id": job_id, "scheduler": "local", "link": link, "of": chain,
                               "depends_on": None, "submitted": time.time(), "script": str(sub.script),
                               "plan": str(spec.plan)})
        cmd = ["bash", str(sub.script)]
        sub.commands.append(cmd)
        sub.job_ids.append(job_id)
        log(f"running {sub.script} here (link {link} of {chain}, job {job_id})")
        status = subprocess.run(cmd, cwd=spec.workdir, env={**os.environ, "KEIZOKU_LOCAL_JOB_ID": job_id}).returncode
        sub.exit_status = status
        if status != EXIT_PREEMPTED:
            break
    if sub.exit_status not in (EXIT_OK, EXIT_PREEMPTED):
        raise SubmitError(f"the job script failed (exit {sub.exit_status}); see the output above")
    return sub


def _record(run_dir: Path, entry: dict) -> None:
    path = run_dir / "jobs.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # one short line per write: appends do not interleave
        f.write(json.dumps(entry) + "\n")
