"""Job scripts and the scheduler commands that submit them.

One script serves every link of a chain: the dependency on the previous job goes on the submit command
line (``qsub -hold_jid``, ``qsub -W depend=afterany:``, ``sbatch --dependency=afterany:``), and each link
resumes from the run's newest checkpoint. The script asks for the scheduler's pre-walltime warning
(Grid Engine ``-notify``: SIGUSR2 before the ``h_rt`` kill; Slurm ``--signal=B:USR1@N``) and ends in
``exec`` of the launch driver, so the warning reaches it and the job's exit status is training's.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from keizoku import __version__
from keizoku.launch.profile import Profile, ProfileError

PREFIX = {"gridengine": "#$", "pbs": "#PBS", "slurm": "#SBATCH"}


@dataclass
class JobSpec:
    name: str
    run_dir: Path  # absolute
    workdir: Path  # absolute: the job runs here (relative paths in the config)
    plan: Path  # the driver's plan JSON
    driver: list[str]  # the command that runs the launch driver with the plan
    command: str = ""  # the keizoku submit command line, for the record


def _fill(text: str, profile: Profile) -> str:
    values = {"nodes": profile.nodes, "gpus_per_node": profile.gpus_per_node, "walltime": profile.walltime}
    try:
        return text.format_map(values)
    except (KeyError, IndexError, ValueError) as e:
        raise ProfileError(f"directive {text!r}: cannot fill in {e} (known: {', '.join(values)})") from None


def directives(profile: Profile, spec: JobSpec) -> list[str]:
    p, logs = profile, f"{spec.run_dir}/logs/"
    if p.scheduler == "gridengine":
        out = [f"-N {_ge_name(spec.name)}", "-cwd", f"-o {logs}", "-j y", "-S /bin/bash", "-notify"]
        if p.walltime:
            out.append(f"-l h_rt={p.walltime}")
        if p.queue:
            out.append(f"-q {p.queue}")
    elif p.scheduler == "pbs":
        out = [f"-N {spec.name[:15]}", f"-o {logs}", "-j oe"]
        if p.queue:
            out.append(f"-q {p.queue}")
        if p.walltime:
            out.append(f"-l walltime={p.walltime}")
        if p.group:
            out.append(f"-P {p.group}")
    elif p.scheduler == "slurm":
        per_node = 1 if p.launcher == "node" else (p.procs_per_node or p.gpus_per_node or 1)
        out = [f"--job-name={spec.name}", f"--output={logs}slurm-%j.out", f"--nodes={p.nodes}",
               f"--ntasks-per-node={per_node}"]
        if p.walltime:
            out.append(f"--time={p.walltime}")
        if p.gpus_per_node:
            out.append(f"--gpus-per-node={p.gpus_per_node}")
        if p.queue:
            out.append(f"--partition={p.queue}")
        if p.group:
            out.append(f"--account={p.group}")
        if p.warning_signal_s:
            out.append(f"--signal=B:USR1@{p.warning_signal_s}")
    else:
        return []
    return out + [_fill(d, p) for d in p.directives]


def _ge_name(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", name)  # Grid Engine job names: no '/', ':', '@', ...
    return name if name[:1].isalpha() else f"k{name}"


def job_script(profile: Profile, spec: JobSpec) -> str:
    lines = ["#!/bin/bash"]
    prefix = PREFIX.get(profile.scheduler)
    if prefix:
        lines += [f"{prefix} {d}" for d in directives(profile, spec)]
    lines += ["", f"# Written by keizoku {__version__} submit ({profile.scheduler}):",
              f"#   {spec.command}" if spec.command else "#",
              "# Each link of a chain runs this same script and resumes from the newest checkpoint;",
              "# the launch driver exits 0 at once when training is complete, 3 after a walltime save."]
    if profile.setup:
        lines += ["", *profile.setup]
    if profile.env:
        lines += [""] + [f"export {k}={shlex.quote(str(v))}" for k, v in sorted(profile.env.items())]
    lines += ["", f"cd {shlex.quote(str(spec.workdir))}", f"exec {shlex.join(spec.driver)}", ""]
    return "\n".join(lines)


def submit_command(profile: Profile, script: Path, after: Optional[str] = None) -> list[str]:
    p = profile
    if p.scheduler == "gridengine":
        cmd = ["qsub", "-terse"] + (["-g", p.group] if p.group else [])
        cmd += ["-hold_jid", after] if after else []
    elif p.scheduler == "pbs":
        cmd = ["qsub"] + (["-W", f"depend=afterany:{after}"] if after else [])
    elif p.scheduler == "slurm":
        cmd = ["sbatch", "--parsable"] + ([f"--dependency=afterany:{after}"] if after else [])
    else:
        return ["bash", str(script)]
    return cmd + list(p.submit_args) + [str(script)]


def parse_job_id(scheduler: str, stdout: str) -> str:
    """The job id a submit command printed (qsub -terse: ``123``; PBS: ``123.pbs1``; sbatch --parsable:
    ``123`` or ``123;cluster``)."""
    text = stdout.strip().splitlines()[-1].strip() if stdout.strip() else ""
    if scheduler == "slurm":
        text = text.split(";", 1)[0]
    elif scheduler == "gridengine":
        m = re.search(r"Your job (\d+)", stdout)  # without -terse
        text = m.group(1) if m else text.split(".", 1)[0]
    if not text or not re.fullmatch(r"[\w.\-\[\]]+", text):
        raise ValueError(f"cannot read a job id from the {scheduler} submit output {stdout!r}")
    return text
