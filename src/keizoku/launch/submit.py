"""``keizoku submit``: write the job script and the launch plan into the run directory, submit a chain of
jobs, and record their ids.

Files, per submission (``SID`` = UTC time of submission; ``keizoku.rundir.RunDir`` names each): ``submit/SID.sh``
(the job script), ``submit/SID.plan.json`` (what the launch driver does), and with ``--container``
``submit/SID.launch/`` (a copy of the driver and what it imports, ``LAUNCH_FILES``, run by the node's own
python3 outside the image). ``jobs.jsonl`` gets one line per job: id, chain position, the job it waits for, its
log.

A refused submission is tried again, after ``submit_retry_s`` waits (10 s, 30 s), only when the scheduler could not
be reached (``Scheduler.unreachable``: nothing was queued); otherwise, or after the last try, ``SubmitError`` says
in one line what qsub/sbatch said. If no job of the chain was queued, the job script, plan and driver copy are
removed (nothing refers to them); the links already queued keep theirs.

``keizoku submit tokenize`` (``submit_tokenize``) submits an array job of N tasks, task K tokenizing share K
(``keizoku.data.shards``), and a merge job that waits for all of them (``after_ok``: Slurm and PBS start it only if
every task succeeded; Grid Engine whatever they did, and the merge then names the shares that are not complete). Its
files go beside the parts (``PARTS`` = ``OUT/parts`` or ``PREFIX.parts``): ``submit/SID.tokenize.sh``,
``submit/SID.merge.sh``, ``logs/`` (each task's log), ``jobs.jsonl`` (the jobs, and each task's log, which
``keizoku tokenize-merge --check`` shows beside its share's state).

``keizoku submit eval`` (``submit_eval``) submits one job that runs ``keizoku eval`` (``keizoku.downstream``), as
``eval.downstream`` does for each due checkpoint of a run under a scheduler. Its files go into the run directory
(``submit/SID.eval-step_N.sh``; the scheduler's output in ``logs/``; ``eval/jobs.jsonl``: the job, apart from
``jobs.jsonl``'s training jobs that ``keizoku status`` follows), or for a Hugging Face model into its results
directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from keizoku import rundir
from keizoku.config import KeizokuConfig
from keizoku.errors import KeizokuError
from keizoku.launch import driver, port, schedulers
from keizoku.launch.driver import LaunchPlan
from keizoku.launch.profile import Profile
from keizoku.launch.schedulers import LOCAL_JOB_ID, scheduler_named
from keizoku.launch.script import JobSpec, eval_script, job_script, tokenize_scripts
from keizoku.rundir import ExitCode, RunDir, append_jsonl, write_atomic
from keizoku.schedule import run_length

# The driver and what it imports, standard library only: copied beside the job script under --container
LAUNCH_FILES = tuple(Path(m.__file__) for m in (driver, schedulers, port, rundir))


class SubmitError(KeizokuError, RuntimeError):
    def __init__(self, message: str, todo: str = "", queued_maybe: bool = False):
        super().__init__(message)
        self.todo = todo  # what to do, for a failed submit command
        self.queued_maybe = queued_maybe  # the submit command failed, yet it may have queued a job


SUBMIT_TIMEOUT_S = 300  # qsub/sbatch that has not answered by then may or may not have queued the job


@dataclass
class Submission:
    script: Path
    plan: Path
    script_text: str
    commands: list[list[str]] = field(default_factory=list)  # what was (or, dry, would be) run
    job_ids: list[str] = field(default_factory=list)
    exit_status: Optional[int] = None  # local profile: the last run's
    plan_text: str = ""  # the plan's JSON
    launch_lines: list[list[str]] = field(default_factory=list)  # dry run: what the driver would start in a job
    training_line: list[str] = field(default_factory=list)  # dry run: each training process, as torchrun sets it


def container_python(profile: Profile, image: Path, binds: list[str]) -> list[str]:
    c = profile.container
    cmd = [c.runtime, "exec", *c.flags]
    for b in dict.fromkeys([*binds, *c.binds]):  # ordered, without repeats
        cmd += ["-B", b]
    return cmd + [str(image), c.python]


def prepare_submission(cfg: KeizokuConfig, config_path: Path, overrides: list[str], profile: Profile, *,
                       container: Optional[Path] = None, name: Optional[str] = None, workdir: Optional[Path] = None,
                       command: str = "", sid: Optional[str] = None) -> tuple[LaunchPlan, JobSpec, str]:
    """The plan, job spec and script text, without writing anything."""
    workdir = Path(workdir or os.getcwd()).resolve()
    run = RunDir((workdir / cfg.run_dir).resolve())
    config_abs = (workdir / config_path).resolve()
    sid = sid or time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    plan_path = run.launch_plan(sid)
    if container is not None:
        image = (workdir / container).resolve()
        python = container_python(profile, image, [str(workdir), str(run.path), str(config_abs.parent)])
        driver_cmd = ["python3", str(run.driver_copy(sid) / "driver.py"), "--plan", str(plan_path)]
    else:
        python = [profile.python or sys.executable]
        driver_cmd = [*python, "-m", "keizoku.launch.driver", "--plan", str(plan_path)]
    walltime_s = scheduler_named(profile.scheduler).walltime_seconds(profile.walltime) if profile.walltime else None
    plan = LaunchPlan(
        train_args=[str(config_abs), *overrides], run_dir=str(run.path), total_steps=run_length(cfg).steps,
        launcher=profile.launcher, starter=profile.starter,
        procs_per_node=profile.procs_per_node or profile.gpus_per_node, python=python, mpirun=list(profile.mpirun),
        env=dict(profile.env), walltime_s=walltime_s, stop_margin_s=profile.stop_margin_s,
        failure_grace_s=profile.failure_grace_s, workdir=str(workdir))
    spec = JobSpec(name=name or f"keizoku-{run.path.name}", run_dir=run.path, workdir=workdir,
                   script=run.job_script(sid), plan=plan_path, driver=driver_cmd, command=command,
                   driver_copy=run.driver_copy(sid) if container is not None else None)
    return plan, spec, job_script(profile, spec)


def submit_jobs(cfg: KeizokuConfig, config_path: Path, overrides: list[str], profile: Profile, *, chain: int = 1,
                container: Optional[Path] = None, dry_run: bool = False, name: Optional[str] = None,
                workdir: Optional[Path] = None, command: str = "",
                log: Callable[[str], None] = print) -> Submission:
    """Write the job script and plan, then submit ``chain`` jobs, each after the previous one (or, with no
    scheduler, run the script here up to ``chain`` times)."""
    if chain < 1:
        raise SubmitError(f"--chain: must be at least 1, not {chain}")
    if container is not None and not dry_run and not (Path(workdir or ".") / container).exists():
        raise SubmitError(f"--container {container}: no such image")
    plan, spec, text = prepare_submission(cfg, config_path, overrides, profile, container=container, name=name,
                                          workdir=workdir, command=command)
    sub = Submission(script=spec.script, plan=spec.plan, script_text=text, plan_text=plan.to_json())
    scheduler = scheduler_named(profile.scheduler)
    if dry_run:
        sub.commands = [scheduler.submit_command(profile, str(spec.script), None if i == 0 else f"<job {i}>")
                        for i in range(chain)]
        here = (driver.visible_gpus() or 1) if not scheduler.queues_jobs else None  # the job runs here
        sub.launch_lines = driver.launch_lines(plan, profile.nodes, scheduler.name, here)
        nproc = plan.procs_per_node or here or "GPUS"
        world = profile.nodes * nproc if isinstance(nproc, int) else f"{profile.nodes}xGPUS"
        top = world - 1 if isinstance(world, int) else f"{world}-1"
        sub.training_line = [f"RANK=0..{top}", f"WORLD_SIZE={world}", "MASTER_ADDR=NODE0", "MASTER_PORT=PORT",
                             *plan.python, "-m", "keizoku", "train", *plan.train_args]
        return sub
    _write_files(spec, plan, text)
    if not scheduler.queues_jobs:
        return _run_here(sub, profile, spec, chain, log)
    return _queue_chain(sub, profile, spec, chain, log)


def _write_files(spec: JobSpec, plan: LaunchPlan, text: str) -> None:
    write_atomic(spec.plan, plan.to_json(), 0o644)
    if spec.driver_copy is not None:
        spec.driver_copy.mkdir(parents=True, exist_ok=True)
        for f in LAUNCH_FILES:
            shutil.copy2(f, spec.driver_copy / f.name)
    write_atomic(spec.script, text, 0o755)
    spec.logs.mkdir(parents=True, exist_ok=True)


def _queue_chain(sub: Submission, profile: Profile, spec: JobSpec, chain: int, log) -> Submission:
    """Submit ``chain`` jobs, each depending on the one before; record each in jobs.jsonl."""
    scheduler = scheduler_named(profile.scheduler)
    previous = None
    for link in range(1, chain + 1):
        cmd = scheduler.submit_command(profile, str(spec.script), previous)
        sub.commands.append(cmd)
        try:
            job_id = _submit(scheduler, profile, cmd, spec.workdir, log)
        except SubmitError as e:
            raise SubmitError(f"{e}; {_after_failure(sub, spec, chain, e)}") from None
        sub.job_ids.append(job_id)
        append_jsonl(RunDir(spec.run_dir).job_list, {
            "job_id": job_id, "scheduler": scheduler.name, "link": link, "of": chain, "depends_on": previous,
            "submitted": time.time(), "script": str(spec.script), "plan": str(spec.plan), "nodes": profile.nodes,
            "walltime": profile.walltime, "name": spec.name,
            "log": scheduler.log_path(str(spec.logs), spec.name, job_id)})
        log(f"submitted job {job_id}" + (f" (link {link} of {chain}, after {previous})" if previous else
                                         f" (link 1 of {chain})" if chain > 1 else ""))
        previous = job_id
    return sub


def _submit(scheduler: schedulers.Scheduler, profile: Profile, cmd: list[str], cwd: Path, log) -> str:
    """Run one submit command; on a refusal for want of the scheduler, again after each of ``submit_retry_s``."""
    waits = list(profile.submit_retry_s)
    tries = len(waits) + 1
    fix = ("fix what it names (the profile's queue, group, directives or submit_args; keizoku submit --dry-run "
           "shows the script) and submit again")
    for attempt in range(1, tries + 1):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=SUBMIT_TIMEOUT_S)
        except FileNotFoundError:
            raise SubmitError(f"{cmd[0]}: command not found", f"run keizoku submit where {scheduler.name}'s commands "
                              f"are (a login node)") from None
        except subprocess.TimeoutExpired:
            raise SubmitError(f"{cmd[0]} did not answer within {SUBMIT_TIMEOUT_S} s", queued_maybe=True) from None
        if proc.returncode == 0:
            try:
                return scheduler.parse_job_id(proc.stdout)
            except ValueError as e:
                raise SubmitError(str(e), queued_maybe=True) from None
        message = schedulers.one_line(proc.stderr or proc.stdout) or "(no message)"
        if not scheduler.unreachable(message):
            raise SubmitError(f"{cmd[0]} refused the job (exit {proc.returncode}): {message}", fix)
        if attempt == tries:
            waited = sum(waits)
            raise SubmitError(f"{cmd[0]} could not reach {scheduler.name} in {tries} tr{'ies' if tries > 1 else 'y'}"
                              + (f" over {waited:g} s" if waited else "") + f" (exit {proc.returncode}): {message}",
                              f"submit again once {scheduler.name} answers")
        log(f"{cmd[0]} could not reach {scheduler.name} (try {attempt} of {tries}): {message}; trying again in "
            f"{waits[attempt - 1]:g} s")
        time.sleep(waits[attempt - 1])
    raise AssertionError("not reached")


def _after_failure(sub: Submission, spec: JobSpec, chain: int, error: SubmitError) -> str:
    """What a failed submission leaves, and what to do. Nothing queued: its files are removed."""
    if error.queued_maybe:
        return (f"it may have queued the job all the same: check the queue before submitting again (a second job "
                f"would train the same run at the same time); {spec.script} is kept for it")
    if sub.job_ids:
        done = len(sub.job_ids)
        return (f"jobs {', '.join(sub.job_ids)} (links 1-{done} of {chain}) are queued and keep {spec.script}; the "
                f"other {chain - done} link(s) were not submitted: {error.todo or 'submit again'} for more links")
    for path in (spec.script, spec.plan, spec.driver_copy):
        if path is not None:
            rundir.discard(path)
    return f"nothing was queued ({spec.script.name} and its plan are removed); {error.todo or 'submit again'}"


def _run_here(sub: Submission, profile: Profile, spec: JobSpec, chain: int, log) -> Submission:
    """No scheduler: run the job script here, again after each walltime-style stop (exit 3)."""
    scheduler = scheduler_named(profile.scheduler)
    for link in range(1, chain + 1):
        job_id = f"local-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{link}"
        append_jsonl(RunDir(spec.run_dir).job_list, {
            "job_id": job_id, "scheduler": scheduler.name, "link": link, "of": chain, "depends_on": None,
            "submitted": time.time(), "script": str(sub.script), "plan": str(spec.plan)})
        cmd = scheduler.submit_command(profile, str(sub.script))
        sub.commands.append(cmd)
        sub.job_ids.append(job_id)
        log(f"running {sub.script} here (link {link} of {chain}, job {job_id})")
        status = subprocess.run(cmd, cwd=spec.workdir, env={**os.environ, LOCAL_JOB_ID: job_id}).returncode
        sub.exit_status = status
        if status != ExitCode.STOPPED:
            break
    if sub.exit_status not in (ExitCode.OK, ExitCode.STOPPED):
        raise SubmitError(f"the job script failed (exit {sub.exit_status}); see the output above")
    return sub


# --- keizoku submit tokenize: an array job of shares, and the merge ----------------------------------------------

@dataclass
class TokenizeSubmission:
    parts: Path  # PARTS: the plan, the shares' parts, submit/, logs/, jobs.jsonl
    plan: "object"  # keizoku.data.shards.Plan
    task_script: Path
    task_text: str
    merge_script: Optional[Path] = None
    merge_text: Optional[str] = None
    commands: list[list[str]] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    exit_status: Optional[int] = None  # local profile: the first failure's, else 0


def submit_tokenize(tokenize_args: list[str], opts, profile: Profile, *, tasks: int, merge: bool = True,
                    remove_parts: bool = False, container: Optional[Path] = None, dry_run: bool = False,
                    name: Optional[str] = None, workdir: Optional[Path] = None, command: str = "",
                    log: Callable[[str], None] = print) -> TokenizeSubmission:
    """Plan ``tasks`` shares of ``keizoku tokenize TOKENIZE_ARGS`` (``opts``: those arguments, parsed), write the
    array job's script and the merge job's, and submit them (or, with no scheduler, run them here in turn)."""
    from keizoku.data import shards
    from keizoku.data.inputs import discover
    from keizoku.data.tokenize import output_groups

    if tasks < 1:
        raise SubmitError(f"--tasks: must be at least 1, not {tasks}")
    if container is not None and not dry_run and not (Path(workdir or ".") / container).exists():
        raise SubmitError(f"--container {container}: no such image")
    workdir = Path(workdir or os.getcwd()).resolve()
    root = shards.parts_root(opts.output_dir, opts.output_prefix)
    inputs = discover(opts.inputs)
    output_groups(opts, inputs)  # what keizoku tokenize would refuse (two inputs of one name in --output-dir)
    plan = shards.make_plan(inputs, tasks, shards.output_of(opts.output_dir, opts.output_prefix))
    shards.pin_plan(root, plan, write=False)
    sid = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    stem = Path(opts.output_prefix).name if opts.output_prefix else Path(opts.output_dir).absolute().name
    binds = [str(workdir), str(root.parent), *(str(d) for d in _input_dirs(opts, workdir))]
    python = container_python(profile, (workdir / container).resolve(), binds) if container is not None else \
        [profile.python or sys.executable]
    output = ["--output-dir", str(opts.output_dir)] if opts.output_dir is not None else \
        ["--output-prefix", opts.output_prefix]
    spec = dict(run_dir=root, workdir=workdir, plan=root / shards.PLAN_NAME, driver=[], command=command,
                walltime_warning=False, logs_dir=root / "logs")
    task_spec = JobSpec(name=name or f"keizoku-tokenize-{stem}", script=root / "submit" / f"{sid}.tokenize.sh",
                        tasks=tasks if tasks > 1 else 0, **spec)
    merge_spec = JobSpec(name=f"keizoku-merge-{stem}", script=root / "submit" / f"{sid}.merge.sh", **spec) \
        if merge else None
    task_text, merge_text = tokenize_scripts(
        profile, task_spec, merge_spec, [*python, "-m", "keizoku", "tokenize", *tokenize_args],
        [*python, "-m", "keizoku", "tokenize-merge", *output, *["--remove-parts"] * remove_parts], root)
    sub = TokenizeSubmission(root, plan, task_spec.script, task_text, merge_spec and merge_spec.script, merge_text)
    scheduler = scheduler_named(profile.scheduler)
    if dry_run:
        sub.commands = [scheduler.submit_command(profile, str(task_spec.script))]
        if merge_spec:
            sub.commands.append(scheduler.submit_command(profile, str(merge_spec.script), "<tokenize job>",
                                                         after_ok=True))
        return sub
    for job, text in ((task_spec, task_text), (merge_spec, merge_text)):
        if job is not None:
            write_atomic(job.script, text, 0o755)
    task_spec.logs.mkdir(parents=True, exist_ok=True)
    if not scheduler.queues_jobs:
        return _tokenize_here(sub, scheduler, task_spec, merge_spec, tasks, log)
    return _queue_tokenize(sub, profile, scheduler, task_spec, merge_spec, tasks, log)


def _input_dirs(opts, workdir: Path) -> list[Path]:
    """What a container must see of the inputs and the tokenizer: each input's directory (a file's, or the
    directory given; a glob's fixed part), and a local tokenizer's."""
    import glob

    dirs = []
    for spec in [*opts.inputs, opts.tokenizer]:
        path = workdir / spec
        if glob.has_magic(spec):
            path = workdir / spec[:min(spec.index(c) for c in "*?[" if c in spec)]
        if path.exists() or spec in opts.inputs:
            dirs.append((path if path.is_dir() else path.parent).resolve())
    return list(dict.fromkeys(dirs))


def _queue_tokenize(sub: TokenizeSubmission, profile: Profile, scheduler: schedulers.Scheduler, task_spec: JobSpec,
                    merge_spec: Optional[JobSpec], tasks: int, log) -> TokenizeSubmission:
    jobs = sub.parts / "jobs.jsonl"
    cmd = scheduler.submit_command(profile, str(task_spec.script))
    sub.commands.append(cmd)
    try:
        job_id = _submit(scheduler, profile, cmd, task_spec.workdir, log)
    except SubmitError as e:
        if not e.queued_maybe:
            for path in (task_spec.script, merge_spec and merge_spec.script):
                if path is not None:
                    rundir.discard(path)
            raise SubmitError(f"{e}; nothing was queued ({task_spec.script.name} is removed); "
                              f"{e.todo or 'submit again'}") from None
        raise SubmitError(f"{e}; it may have queued the job all the same: check the queue before submitting again "
                          f"(a rerun of a share only skips what is finished)") from None
    sub.job_ids.append(job_id)
    logs = str(task_spec.logs)
    task_logs = [scheduler.log_path(logs, task_spec.name, job_id, k if task_spec.tasks else None)
                 for k in range(1, tasks + 1)]
    append_jsonl(jobs, {"job_id": job_id, "scheduler": scheduler.name, "kind": "tokenize", "tasks": tasks,
                        "submitted": time.time(), "script": str(task_spec.script), "name": task_spec.name,
                        "task_logs": task_logs})
    log(f"submitted job {job_id}: {tasks} task(s), one per share (logs: {task_logs[0]}" +
        (f" … {task_logs[-1]})" if tasks > 1 else ")"))
    if merge_spec is None:
        return sub
    cmd = scheduler.submit_command(profile, str(merge_spec.script), job_id, after_ok=True)
    sub.commands.append(cmd)
    try:
        merge_id = _submit(scheduler, profile, cmd, merge_spec.workdir, log)
    except SubmitError as e:
        raise SubmitError(f"{e}; the tokenize job {job_id} is queued, the merge job is not: once {job_id} has ended, "
                          f"run {merge_spec.script} (or keizoku tokenize-merge) yourself") from None
    sub.job_ids.append(merge_id)
    append_jsonl(jobs, {"job_id": merge_id, "scheduler": scheduler.name, "kind": "merge", "depends_on": job_id,
                        "submitted": time.time(), "script": str(merge_spec.script), "name": merge_spec.name,
                        "log": scheduler.log_path(str(merge_spec.logs), merge_spec.name, merge_id)})
    log(f"submitted job {merge_id}: the merge, after job {job_id}")
    return sub


def _tokenize_here(sub: TokenizeSubmission, scheduler: schedulers.Scheduler, task_spec: JobSpec,
                   merge_spec: Optional[JobSpec], tasks: int, log) -> TokenizeSubmission:
    """No scheduler: the tasks here, one after another, each in its log; then the merge if every task succeeded."""
    jobs, failed = sub.parts / "jobs.jsonl", []
    job_id = f"local-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    task_logs = [str(task_spec.logs / f"{job_id}.{k}.log") for k in range(1, tasks + 1)]
    append_jsonl(jobs, {"job_id": job_id, "scheduler": scheduler.name, "kind": "tokenize", "tasks": tasks,
                        "submitted": time.time(), "script": str(task_spec.script), "task_logs": task_logs})
    for k in range(1, tasks + 1):
        cmd = ["bash", str(task_spec.script)]
        sub.commands.append(cmd)
        log(f"running task {k} of {tasks} here (log: {task_logs[k - 1]})")
        with open(task_logs[k - 1], "w") as out:
            status = subprocess.run(cmd, cwd=task_spec.workdir, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, scheduler.task_variable: str(k)}).returncode
        if status != 0:
            failed.append(k)
    sub.job_ids.append(job_id)
    if failed:
        sub.exit_status = ExitCode.FAILED
        raise SubmitError(f"task(s) {', '.join(map(str, failed))} of {tasks} failed; see "
                          f"{', '.join(task_logs[k - 1] for k in failed[:3])}; the merge did not run")
    if merge_spec is not None:
        cmd = ["bash", str(merge_spec.script)]
        sub.commands.append(cmd)
        log("running the merge here")
        sub.exit_status = subprocess.run(cmd, cwd=merge_spec.workdir).returncode
        if sub.exit_status != 0:
            raise SubmitError(f"the merge failed (exit {sub.exit_status}); see the output above")
    sub.exit_status = 0
    return sub


# --- keizoku submit eval: one job of keizoku eval ---------------------------------------------------------------

@dataclass
class EvalSubmission:
    script: Path
    script_text: str
    jobs: Path  # the job records: RUN_DIR/eval/jobs.jsonl, or OUT/jobs.jsonl
    commands: list[list[str]] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    log: Optional[str] = None  # the scheduler's output of the job
    exit_status: Optional[int] = None  # local profile: the eval's


def submit_eval(eval_args: list[str], home: Path, jobs: Path, profile: Profile, *, step: Optional[int] = None,
                container: Optional[Path] = None, binds: tuple[str, ...] = (), dry_run: bool = False,
                name: Optional[str] = None, workdir: Optional[Path] = None, command: str = "",
                log: Callable[[str], None] = print) -> EvalSubmission:
    """Write the job script that runs ``keizoku eval EVAL_ARGS`` into ``home`` (the run directory, or an HF model's
    results directory) and submit it (no scheduler: run it here); the job is recorded in ``jobs``."""
    if container is not None and not dry_run and not (Path(workdir or ".") / container).exists():
        raise SubmitError(f"--container {container}: no such image")
    workdir = Path(workdir or os.getcwd()).resolve()
    home = (workdir / home).resolve()
    sid = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    tag = f"eval-step_{step:08d}" if step is not None else "eval"
    python = container_python(profile, (workdir / container).resolve(), [str(workdir), str(home), *binds]) \
        if container is not None else [profile.python or sys.executable]
    spec = JobSpec(name=name or f"keizoku-eval-{home.name}" + (f"-{step}" if step is not None else ""),
                   run_dir=home, workdir=workdir, script=home / "submit" / f"{sid}.{tag}.sh",
                   plan=jobs, driver=[], command=command, walltime_warning=False, logs_dir=home / "logs")
    text = eval_script(profile, spec, [*python, "-m", "keizoku", "eval", *eval_args])
    sub = EvalSubmission(spec.script, text, jobs)
    scheduler = scheduler_named(profile.scheduler)
    if dry_run:
        sub.commands = [scheduler.submit_command(profile, str(spec.script))]
        return sub
    write_atomic(spec.script, text, 0o755)
    spec.logs.mkdir(parents=True, exist_ok=True)
    if not scheduler.queues_jobs:
        job_id = f"local-{sid}"
        append_jsonl(jobs, {"job_id": job_id, "scheduler": scheduler.name, "kind": "eval", "step": step,
                            "submitted": time.time(), "script": str(spec.script)})
        cmd = ["bash", str(spec.script)]
        sub.commands.append(cmd)
        sub.job_ids.append(job_id)
        log(f"running {spec.script} here (job {job_id})")
        sub.exit_status = subprocess.run(cmd, cwd=workdir).returncode
        if sub.exit_status != ExitCode.OK:
            raise SubmitError(f"the eval failed (exit {sub.exit_status}); see the output above")
        return sub
    cmd = scheduler.submit_command(profile, str(spec.script))
    sub.commands.append(cmd)
    try:
        job_id = _submit(scheduler, profile, cmd, workdir, log)
    except SubmitError as e:
        if e.queued_maybe:
            raise SubmitError(f"{e}; it may have queued the job all the same: check the queue ({spec.script} is "
                              "kept for it)") from None
        rundir.discard(spec.script)
        raise SubmitError(f"{e}; nothing was queued ({spec.script.name} is removed); {e.todo or 'submit again'}") \
            from None
    sub.job_ids.append(job_id)
    sub.log = scheduler.log_path(str(spec.logs), spec.name, job_id)
    append_jsonl(jobs, {"job_id": job_id, "scheduler": scheduler.name, "kind": "eval", "step": step,
                        "submitted": time.time(), "script": str(spec.script), "name": spec.name, "log": sub.log})
    log(f"submitted job {job_id}: keizoku eval{f' of checkpoint step {step}' if step is not None else ''} (log: "
        f"{sub.log or spec.logs})")
    return sub
