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

from keizoku.config import _f

SHIPPED = Path(__file__).parent / "profiles"


def _list_f(items: list[str], help: str):
    return field(default_factory=lambda: list(items), metadata={"help": help})


class ProfileError(ValueError):
    pass


@dataclass
class ContainerProfile:
    runtime: str = _f("apptainer", "Container command (apptainer, or singularity on older sites).")
    flags: list[str] = _list_f(["--nv"], "Flags for `RUNTIME exec`: --nv gives the container the GPUs.")
    binds: list[str] = _f(list, "Directories to bind (-B) besides the working and run directories, e.g. the "
                                "site's work file systems; SRC or SRC:DST.")
    python: str = _f("python", "The Python inside the image that has keizoku.")


@dataclass
class Profile:
    description: str = _f("", "What this profile is for.")
    base: Optional[str] = _f(None, "Start from this profile (name or file) and change what this file sets.")
    scheduler: Literal["gridengine", "pbs", "slurm", "local"] = _f("local", "gridengine (qsub, #$), pbs (qsub, "
                                                                            "#PBS), slurm (sbatch) or local.")
    nodes: int = _f(1, "Nodes per job (--nodes overrides).")
    walltime: Optional[str] = _f("24:00:00", "Time limit per job, HH:MM:SS (--walltime overrides).")
    required: list[str] = _f(list, "Settings that must be given before submitting (e.g. [group]).")
    group: Optional[str] = _f(None, "Accounting group: Grid Engine qsub -g, PBS -P, Slurm --account.")
    queue: Optional[str] = _f(None, "Queue or partition: PBS -q, Slurm --partition, Grid Engine -q.")
    gpus_per_node: int = _f(0, "GPUs per node: Slurm --gpus-per-node, and the training processes per node "
                               "(0: count the GPUs on the node when the job starts; 1 process without GPUs).")
    procs_per_node: int = _f(0, "Training processes per node when not one per GPU (0: gpus_per_node).")
    directives: list[str] = _f(list, "More scheduler directives, verbatim after '#$ ', '#PBS ' or '#SBATCH '; "
                                     "{nodes}, {gpus_per_node} and {walltime} are filled in.")
    submit_args: list[str] = _f(list, "More arguments for qsub/sbatch on every submission.")
    setup: list[str] = _f(list, "Shell lines the job runs before launching (module loads, venv activation).")
    env: dict[str, str] = _f(dict, "Environment for the training processes (NCCL, CUDA settings), also "
                                   "exported by the job script.")
    launcher: Literal["node", "mpi"] = _f("node", "node: one keizoku agent per node starts a process per GPU "
                                                  "(like torchrun); mpi: the starter (mpirun/srun) starts one "
                                                  "process per GPU and ranks come from its variables.")
    starter: Literal["srun", "mpirun", "pbsdsh", "qrsh", "ssh", "local"] = _f(
        "local", "How the per-node processes are started on the job's nodes.")
    mpirun: list[str] = _list_f(["mpirun"], "The mpirun command and site flags (Open MPI syntax: -npernode, "
                                               "--hostfile are added).")
    warning_signal_s: int = _f(300, "Slurm: ask for SIGUSR1 this many seconds before the time limit "
                                    "(--signal=B:USR1@N). Grid Engine always gets -notify.")
    stop_margin_s: int = _f(0, "keizoku's own stop this many seconds before the walltime (0: off); for "
                               "schedulers that warn late or not at all (PBS).")
    failure_grace_s: float = _f(60.0, "After a rank or node fails, how long the others get before SIGKILL.")
    python: Optional[str] = _f(None, "Python that runs keizoku in the job; default: the one running "
                                     "keizoku submit (or container.python with --container).")
    container: ContainerProfile = _f(ContainerProfile, "Apptainer settings for --container IMAGE.sif.")


def search_path() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get("KEIZOKU_PROFILE_PATH", "").split(":") if p]
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return dirs + [config_home / "keizoku" / "profiles"]


def available() -> dict[str, Path]:
    """Profile name -> file, user profiles shadowing shipped ones."""
    found = {p.stem: p for p in sorted(SHIPPED.glob("*.yaml"))}
    for d in reversed(search_path()):
        if d.is_dir():
            found.update({p.stem: p for p in sorted(d.glob("*.yaml"))})
    return found


def _find(name: str, skip: set[Path]) -> Path:
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ProfileError(f"profile {name}: no such file")
        return path
    for d in [*search_path(), SHIPPED]:
        path = d / f"{name}.yaml"
        if path.is_file() and path.resolve() not in skip:
            return path
    names = ", ".join(sorted(available()))
    raise ProfileError(f"profile {name!r} not found (known: {names}; user profiles go in "
                       f"{search_path()[-1]})")


def load(name: str, overrides: list[str] = ()) -> Profile:
    """The named profile, its bases merged under it, then ``key=value`` overrides; type-checked."""
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
    merged = OmegaConf.structured(Profile)
    for path, node in reversed(chain):
        try:
            merged = OmegaConf.merge(merged, node)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None)
            raise ProfileError(f"{path}: {key + ': ' if key else ''}{str(e).splitlines()[0]}") from None
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
        key = getattr(e, "full_key", None)
        raise ProfileError(f"profile {name}: {key + ': ' if key else ''}{str(e).splitlines()[0]}") from None
    errors = validate(profile)
    if errors:
        raise ProfileError("\n".join(f"profile {name}: {e}" for e in errors))
    return profile


def validate(p: Profile) -> list[str]:
    err = []
    if p.nodes < 1:
        err.append(f"nodes: must be at least 1, not {p.nodes}")
    if p.walltime is not None:
        try:
            limit = walltime_seconds(p.walltime)
        except ValueError as e:
            err.append(f"walltime: {e}")
        else:
            for key in ("warning_signal_s", "stop_margin_s") if p.scheduler == "slurm" else ("stop_margin_s",):
                if p.scheduler != "local" and getattr(p, key) >= limit:
                    err.append(f"{key}: {getattr(p, key)} s is not less than the walltime ({limit} s): the job "
                               f"would be told to stop as it starts")
    if p.launcher == "mpi" and p.starter not in ("srun", "mpirun"):
        err.append(f"starter: launcher mpi needs srun or mpirun, not {p.starter}")
    if p.scheduler == "local" and p.starter not in ("local", "ssh", "mpirun"):
        err.append(f"starter: {p.starter} needs a scheduler; use local, ssh or mpirun with scheduler: local")
    if p.scheduler == "local" and p.nodes > 1 and p.starter == "local":
        err.append("nodes: scheduler local with starter local runs on this machine only (nodes: 1)")
    if p.scheduler != "slurm" and p.starter == "srun":
        err.append("starter: srun needs scheduler: slurm")
    if p.scheduler != "gridengine" and p.starter == "qrsh":
        err.append("starter: qrsh needs scheduler: gridengine")
    if p.scheduler != "pbs" and p.starter == "pbsdsh":
        err.append("starter: pbsdsh needs scheduler: pbs")
    for key in p.required:
        if not hasattr(p, key):
            err.append(f"required: {key!r} is not a profile setting")
        elif getattr(p, key) in (None, "", []):
            err.append(f"{key}: required by this profile; pass --set {key}=... or set it in a user profile "
                       f"(see keizoku submit --help)")
    for key in ("gpus_per_node", "procs_per_node", "warning_signal_s", "stop_margin_s"):
        if getattr(p, key) < 0:
            err.append(f"{key}: must be >= 0, not {getattr(p, key)}")
    return err


def walltime_seconds(text: str) -> int:
    """``HH:MM:SS``, ``MM:SS`` or ``D-HH:MM:SS`` (Slurm) as seconds."""
    days, _, clock = str(text).rpartition("-")
    parts = clock.split(":")
    if not (2 <= len(parts) <= 3) or not all(p.isdigit() for p in parts) or (days and not days.isdigit()):
        raise ValueError(f"{text!r} is not HH:MM:SS (in a YAML file, quote it: an unquoted 24:00:00 is read "
                         f"as the number 86400)")
    seconds = 0
    for p in parts:
        seconds = seconds * 60 + int(p)
    return seconds + int(days or 0) * 86400


def to_yaml(p: Profile) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(p))
