"""Job scripts: the scheduler's directives, the profile's setup and environment, and ``exec`` of the launch driver.

One script serves every link of a chain: the dependency on the previous job goes on the submit command line
(``Scheduler.submit_command``), and each link resumes from the run's newest checkpoint. The script asks for the
scheduler's pre-walltime warning (``Scheduler.directives``: Grid Engine ``-notify``, Slurm ``--signal``) and ends
in ``exec`` of the launch driver, so the warning reaches it and the job's exit status is training's.

``keizoku submit tokenize`` writes two more kinds (``tokenize_scripts``): an array job whose task K ``exec``s
``keizoku tokenize … --shard K/N`` (K from the scheduler's ``task_variable``), and the merge job that runs after it
(``keizoku tokenize-merge``); neither asks for a walltime warning (a share resumes from its finished datasets).
``keizoku submit eval`` writes one that ``exec``s ``keizoku eval`` (``eval_script``), without a walltime warning
either (an eval that is cut short is run again whole).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from keizoku import __version__
from keizoku.launch.profile import Profile, ProfileError
from keizoku.launch.schedulers import scheduler_named
from keizoku.rundir import ExitCode, RunDir


@dataclass
class JobSpec:
    name: str
    run_dir: Path  # absolute
    workdir: Path  # absolute: the job runs here (relative paths in the config)
    script: Path  # where the job script is written
    plan: Path  # the driver's plan JSON
    driver: list[str]  # the command that runs the launch driver with the plan
    command: str = ""  # the keizoku submit command line, for the record
    driver_copy: Optional[Path] = None  # with --container: where the driver's files are copied (LAUNCH_FILES)
    tasks: int = 0  # an array job of tasks 1..tasks (0: one job)
    walltime_warning: bool = True  # ask for the scheduler's warning before the walltime (training saves then)
    logs_dir: Optional[Path] = None  # where the scheduler writes the job's output (default: RUN_DIR/logs)

    @property
    def logs(self) -> Path:
        """Where the scheduler writes the job's output."""
        return self.logs_dir or RunDir(self.run_dir).logs


def job_script(profile: Profile, spec: JobSpec) -> str:
    return _script(profile, spec, [
        "# Each link of a chain runs this same script and resumes from the newest checkpoint;",
        f"# the launch driver exits {int(ExitCode.OK)} at once when training is complete, "
        f"{int(ExitCode.STOPPED)} after a walltime save."], shlex.join(spec.driver))


def tokenize_scripts(profile: Profile, tasks: JobSpec, merge: Optional[JobSpec], tokenize: list[str],
                     merge_command: list[str], parts: Path) -> tuple[str, Optional[str]]:
    """The array job's script (task K runs ``tokenize`` with ``--shard K/N``) and the merge job's."""
    scheduler = scheduler_named(profile.scheduler)
    n = max(tasks.tasks, 1)
    share = f'"${{{scheduler.task_variable}}}/{n}"' if tasks.tasks else f"1/{n}"
    task_text = _script(profile, tasks, [
        f"# Task K of {n} tokenizes share K of the inputs ({parts}/plan.json) into {parts}/shard-K-of-{n}/;",
        "# a task run again skips the datasets its share has finished.",
        "# Then: keizoku tokenize-merge (the merge job), and keizoku tokenize-merge --check shows each share."],
        f"{shlex.join(tokenize)} --shard {share}")
    merge_text = None if merge is None else _script(profile, merge, [
        f"# Runs once the {n} task(s) of the tokenize job have ended: checks that every share is complete and",
        "# agrees, then writes each dataset as one run over all the inputs would."], shlex.join(merge_command))
    return task_text, merge_text


def eval_script(profile: Profile, spec: JobSpec, command: list[str]) -> str:
    """The eval job's script: ``command`` (keizoku eval ...) on one node."""
    return _script(profile, spec, [
        "# Scores a model or a run's checkpoint on lm-evaluation-harness tasks (keizoku eval; docs/eval.md);",
        "# a run's results go to RUN_DIR/eval/step_N/results.json and RUN_DIR/metrics.jsonl."], shlex.join(command))


def _script(profile: Profile, spec: JobSpec, notes: list[str], command: str) -> str:
    scheduler = scheduler_named(profile.scheduler)
    lines = ["#!/bin/bash"]
    if scheduler.directive_prefix:
        directives = scheduler.directives(profile, spec) + [_fill(d, profile) for d in profile.directives]
        lines += [f"{scheduler.directive_prefix} {d}" for d in directives]
    lines += ["", f"# Written by keizoku {__version__} submit ({profile.scheduler}):",
              f"#   {spec.command}" if spec.command else "#", *notes]
    if profile.setup:
        lines += ["", *profile.setup]
    if profile.env:
        lines += [""] + [f"export {k}={shlex.quote(str(v))}" for k, v in sorted(profile.env.items())]
    lines += ["", f"cd {shlex.quote(str(spec.workdir))}", f"exec {command}", ""]
    return "\n".join(lines)


def _fill(text: str, profile: Profile) -> str:
    """A profile's own directive with ``{nodes}``, ``{gpus_per_node}``, ``{walltime}`` filled in."""
    values = {"nodes": profile.nodes, "gpus_per_node": profile.gpus_per_node, "walltime": profile.walltime}
    try:
        return text.format_map(values)
    except (KeyError, IndexError, ValueError) as e:
        raise ProfileError(f"directive {text!r}: cannot fill in {e} (known: {', '.join(values)})") from None
