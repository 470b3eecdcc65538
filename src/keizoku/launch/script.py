"""Job scripts: the scheduler's directives, the profile's setup and environment, and ``exec`` of the launch driver.

One script serves every link of a chain: the dependency on the previous job goes on the submit command line
(``Scheduler.submit_command``), and each link resumes from the run's newest checkpoint. The script asks for the
scheduler's pre-walltime warning (``Scheduler.directives``: Grid Engine ``-notify``, Slurm ``--signal``) and ends
in ``exec`` of the launch driver, so the warning reaches it and the job's exit status is training's.
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

    @property
    def logs(self) -> Path:
        """Where the scheduler writes the job's output."""
        return RunDir(self.run_dir).logs


def job_script(profile: Profile, spec: JobSpec) -> str:
    scheduler = scheduler_named(profile.scheduler)
    lines = ["#!/bin/bash"]
    if scheduler.directive_prefix:
        directives = scheduler.directives(profile, spec) + [_fill(d, profile) for d in profile.directives]
        lines += [f"{scheduler.directive_prefix} {d}" for d in directives]
    lines += ["", f"# Written by keizoku {__version__} submit ({profile.scheduler}):",
              f"#   {spec.command}" if spec.command else "#",
              "# Each link of a chain runs this same script and resumes from the newest checkpoint;",
              f"# the launch driver exits {int(ExitCode.OK)} at once when training is complete, "
              f"{int(ExitCode.STOPPED)} after a walltime save."]
    if profile.setup:
        lines += ["", *profile.setup]
    if profile.env:
        lines += [""] + [f"export {k}={shlex.quote(str(v))}" for k, v in sorted(profile.env.items())]
    lines += ["", f"cd {shlex.quote(str(spec.workdir))}", f"exec {shlex.join(spec.driver)}", ""]
    return "\n".join(lines)


def _fill(text: str, profile: Profile) -> str:
    """A profile's own directive with ``{nodes}``, ``{gpus_per_node}``, ``{walltime}`` filled in."""
    values = {"nodes": profile.nodes, "gpus_per_node": profile.gpus_per_node, "walltime": profile.walltime}
    try:
        return text.format_map(values)
    except (KeyError, IndexError, ValueError) as e:
        raise ProfileError(f"directive {text!r}: cannot fill in {e} (known: {', '.join(values)})") from None
