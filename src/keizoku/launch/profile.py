"""Site profiles: how a cluster wants its jobs written, submitted and launched, as editable YAML.

A profile is found by name, first in the user's directories — ``$KEIZOKU_PROFILE_PATH`` (colon-separated),
then ``~/.config/keizoku/profiles/`` (``$XDG_CONFIG_HOME``) — then among the profiles shipped with keizoku
(``tsubame4``, ``abci3``, ``slurm``, ``local``); or given as a path to a YAML file. ``base: NAME`` starts
from another profile (``base: tsubame4`` + ``group: tga12345`` is a complete user profile; a user file may
share the name of the shipped profile it extends). ``--set key=value`` overrides last.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from keizoku.config import setting
from keizoku.errors import KeizokuError
from keizoku.launch.driver import MPI_STARTERS, STARTERS
from keizoku.launch.schedulers import SCHEDULERS, scheduler_named

SHIPPED = Path(__file__).parent / "profiles"
SchedulerName = Literal[tuple(SCHEDULERS)]  # type: ignore[valid-type]  # the registered schedulers
StarterName = Literal[STARTERS]  # type: ignore[valid-type]  # the driver's starters


def _list_f(items: list[str], help: str):
    return field(default_factory=lambda: list(items), metadata={"help": help})


class ProfileError(KeizokuError, ValueError):
    pass


@dataclass
class ContainerProfile:
    runtime: str = setting("apptainer", "Container command (apptainer, or singularity on older sites).")
    flags: list[str] = _list_f(["--nv"], "Flags for `RUNTIME exec`: --nv gives the container the GPUs.")
    binds: list[str] = setting(list, "Directories to bind (-B) besides the working and run directories, e.g. the "
                                     "site's work file systems; SRC or SRC:DST.")
    python: str = setting("python", "The Python inside the image that has keizoku.")


@dataclass
class Profile:
    description: str = setting("", "What this profile is for.")
    base: Optional[str] = setting(None, "Start from this profile (name or file) and change what this file sets.")
    scheduler: SchedulerName = setting("local", "gridengine (qsub, #$), pbs (qsub, #PBS), slurm (sbatch) or local "
                                                "(launch/schedulers.py).")
    nodes: int = setting(1, "Nodes per job (--nodes overrides).")
    walltime: Optional[str] = setting("24:00:00", "Time limit per job, HH:MM:SS or D-HH:MM:SS (written as HH:MM:SS "
                                                  "for Grid Engine and PBS; --walltime overrides).")
    required: list[str] = setting(list, "Settings that must be given before submitting (e.g. [group]).")
    group: Optional[str] = setting(None, "Accounting group: Grid Engine qsub -g, PBS -P, Slurm --account.")
    queue: Optional[str] = setting(None, "Queue or partition: PBS -q, Slurm --partition, Grid Engine -q.")
    gpus_per_node: int = setting(0, "GPUs per node: Slurm --gpus-per-node, and the training processes per node (0: "
                                    "count the GPUs on the node when the job starts; 1 process without GPUs).")
    procs_per_node: int = setting(0, "Training processes per node when not one per GPU (0: gpus_per_node).")
    directives: list[str] = setting(list, "More scheduler directives, verbatim after '#$ ', '#PBS ' or '#SBATCH '; "
                                          "{nodes}, {gpus_per_node} and {walltime} are filled in.")
    submit_args: list[str] = setting(list, "More arguments for qsub/sbatch on every submission.")
    submit_retry_s: list[float] = _list_f([10.0, 30.0], "When qsub/sbatch cannot reach the scheduler (connection "
                                                        "refused, controller down): seconds to wait before each "
                                                        "new try ([]: no retry).")
    setup: list[str] = setting(list, "Shell lines the job runs before launching (module loads, venv activation).")
    env: dict[str, str] = setting(dict, "Environment for the training processes (NCCL, CUDA settings), also exported "
                                        "by the job script.")
    launcher: Literal["node", "mpi"] = setting("node", "node: one keizoku agent per node starts a process per GPU "
                                                       "(like torchrun); mpi: the starter (mpirun/srun) starts one "
                                                       "process per GPU and ranks come from its variables.")
    starter: StarterName = setting("local", "How the per-node processes are started on the job's nodes: srun, mpirun, "
                                            "pbsdsh, qrsh, ssh or local.")
    mpirun: list[str] = _list_f(["mpirun"], "The mpirun command and site flags (Open MPI syntax: -npernode, "
                                               "--hostfile are added).")
    warning_signal_s: int = setting(300, "Slurm: ask for SIGUSR1 this many seconds before the time limit "
                                         "(--signal=B:USR1@N). Grid Engine always gets -notify.")
    stop_margin_s: int = setting(0, "keizoku's own stop this many seconds before the walltime (0: off); for schedulers "
                                    "that warn late or not at all (PBS).")
    failure_grace_s: float = setting(60.0, "After a rank or node fails, how long the others get before SIGKILL.")
    python: Optional[str] = setting(None, "Python that runs keizoku in the job; default: the one running keizoku "
                                          "submit (or container.python with --container).")
    container: ContainerProfile = setting(ContainerProfile, "Apptainer settings for --container IMAGE.sif.")


def profile_dirs() -> list[Path]:
    """Where user profiles are found, first first: ``$KEIZOKU_PROFILE_PATH``, then ``~/.config/keizoku/profiles``."""
    dirs = [Path(p) for p in os.environ.get("KEIZOKU_PROFILE_PATH", "").split(":") if p]
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return dirs + [config_home / "keizoku" / "profiles"]


def available_profiles() -> dict[str, Path]:
    """Profile name -> file, user profiles shadowing shipped ones."""
    found = {p.stem: p for p in sorted(SHIPPED.glob("*.yaml"))}
    for d in reversed(profile_dirs()):
        if d.is_dir():
            found.update({p.stem: p for p in sorted(d.glob("*.yaml"))})
    return found


def load_profile(name: str, overrides: list[str] = ()) -> Profile:
    """The named profile, its bases merged under it, then ``key=value`` overrides; type-checked and checked
    against its scheduler (``profile_errors``)."""
    merged = OmegaConf.structured(Profile)
    for path, node in reversed(_base_chain(name)):
        try:
            merged = OmegaConf.merge(merged, node)
        except OmegaConfBaseException as e:
            raise ProfileError(f"{path}: {_omegaconf_message(e)}") from None
    for item in overrides:
        if "=" not in item:
            raise ProfileError(f"--set {item!r}: expected key=value")
    # YAML reads an unquoted 12:00:00 as the number 43200 (base 60); keep times as written
    overrides = [re.sub(r"^([\w.]+)=(\d+(?::\d+)+)$", r'\1="\2"', item) for item in overrides]
    try:
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        profile = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ProfileError(f"profile {name}: {_omegaconf_message(e)}") from None
    errors = profile_errors(profile)
    if errors:
        raise ProfileError("\n".join(f"profile {name}: {e}" for e in errors))
    if profile.walltime is not None:  # as the scheduler takes it: D-HH:MM:SS -> HH:MM:SS for h_rt and PBS walltime
        profile.walltime = scheduler_named(profile.scheduler).walltime_value(profile.walltime)
    return profile


def _base_chain(name: str) -> list[tuple[Path, object]]:
    """The profile file and its bases (``base:``), each read once, the named one first."""
    chain, seen = [], set()
    ref = name
    while ref:
        path = _find(ref, seen)
        seen.add(path.resolve())
        try:
            node = OmegaConf.load(path)
        except (OmegaConfBaseException, OSError, ValueError) as e:
            raise ProfileError(f"{path}: {str(e).splitlines()[0]}") from None
        chain.append((path, node))
        ref = node.get("base")
        if len(chain) > 10:
            raise ProfileError(f"profile {name}: base chain too long (a loop?)")
    return chain


def _find(name: str, skip: set[Path]) -> Path:
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ProfileError(f"profile {name}: no such file")
        return path
    for d in [*profile_dirs(), SHIPPED]:
        path = d / f"{name}.yaml"
        if path.is_file() and path.resolve() not in skip:
            return path
    names = ", ".join(sorted(available_profiles()))
    raise ProfileError(f"profile {name!r} not found (known: {names}; user profiles go in "
                       f"{profile_dirs()[-1]})")


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    return f"{key + ': ' if key else ''}{str(e).splitlines()[0]}"


def profile_errors(p: Profile) -> list[str]:
    """Every problem of a merged profile, one line each (its scheduler's: ``Scheduler.profile_errors``)."""
    err = [f"nodes: must be at least 1, not {p.nodes}"] if p.nodes < 1 else []
    err += scheduler_named(p.scheduler).profile_errors(p)
    if p.launcher == "mpi" and p.starter not in MPI_STARTERS:
        err.append(f"starter: launcher mpi needs srun or mpirun, not {p.starter}")
    for key in p.required:
        if not hasattr(p, key):
            err.append(f"required: {key!r} is not a profile setting")
        elif getattr(p, key) in (None, "", []):
            err.append(f"{key}: required by this profile; pass --set {key}=... or set it in a user profile "
                       f"(see keizoku submit --help)")
    for key in ("gpus_per_node", "procs_per_node", "warning_signal_s", "stop_margin_s"):
        if getattr(p, key) < 0:
            err.append(f"{key}: must be >= 0, not {getattr(p, key)}")
    if any(s < 0 for s in p.submit_retry_s):
        err.append(f"submit_retry_s: waits must be >= 0, not {p.submit_retry_s}")
    return err
