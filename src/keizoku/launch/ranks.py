"""Ranks from the variables MPI launchers and Slurm set in each process, mapped to torch's.

For MPI-style launches — one process per GPU started by ``mpirun -npernode 4 -hostfile …`` (how TSUBAME
users start jobs) or ``srun --ntasks-per-node 8`` — where no torchrun sets ``RANK``/``LOCAL_RANK``.

| launcher | rank | size | local rank | local size |
|---|---|---|---|---|
| Open MPI (also HPC-X) | ``OMPI_COMM_WORLD_RANK`` | ``OMPI_COMM_WORLD_SIZE`` | ``OMPI_COMM_WORLD_LOCAL_RANK`` | ``OMPI_COMM_WORLD_LOCAL_SIZE`` |
| MPICH / Intel MPI (Hydra, PMI) | ``PMI_RANK`` | ``PMI_SIZE`` | ``MPI_LOCALRANKID`` | ``MPI_LOCALNRANKS`` |
| MVAPICH2 | ``MV2_COMM_WORLD_RANK`` | ``MV2_COMM_WORLD_SIZE`` | ``MV2_COMM_WORLD_LOCAL_RANK`` | ``MV2_COMM_WORLD_LOCAL_SIZE`` |
| PMIx (Open MPI 5, srun --mpi=pmix) | ``PMIX_RANK`` | ``OMPI_COMM_WORLD_SIZE``/``SLURM_NTASKS`` | (from the launcher) | |
| Slurm ``srun`` step | ``SLURM_PROCID`` | ``SLURM_NTASKS`` | ``SLURM_LOCALID`` | ``SLURM_NTASKS_PER_NODE``/``SLURM_STEP_TASKS_PER_NODE`` |

Slurm's variables count only inside a job step (``SLURM_STEP_ID`` set): the batch script itself also has
``SLURM_PROCID=0`` and ``SLURM_NTASKS`` of the whole job. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from keizoku.launch.schedulers import AllocationError, slurm_task_counts


class RankError(RuntimeError):
    pass


@dataclass(frozen=True)
class Ranks:
    source: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    def torch_env(self, master_addr: str, master_port: int) -> dict:
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
                "LOCAL_WORLD_SIZE": str(self.local_world_size), "MASTER_ADDR": master_addr,
                "MASTER_PORT": str(master_port)}


_SCHEMES = [  # (source, rank, size, local rank, local size)
    ("Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("MVAPICH2", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK",
     "MV2_COMM_WORLD_LOCAL_SIZE"),
    ("MPICH/Intel MPI (PMI)", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
]


def from_env(env: Mapping[str, str]) -> Optional[Ranks]:
    """This process's ranks if an MPI launcher or srun started it as one of several tasks, else None."""
    for source, rank, size, local, local_size in _SCHEMES:
        if rank in env and size in env:
            return _make(source, env, rank, size, local, local_size)
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        r = _make("Slurm step", env, "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", None)
        per_node = _tasks_on_this_node(env)
        return Ranks(r.source, r.rank, r.world_size, r.local_rank, per_node or r.local_world_size)
    if "PMIX_RANK" in env:
        size = "OMPI_COMM_WORLD_SIZE" if "OMPI_COMM_WORLD_SIZE" in env else "SLURM_NTASKS"
        return _make("PMIx", env, "PMIX_RANK", size, "OMPI_COMM_WORLD_LOCAL_RANK" if "OMPI_COMM_WORLD_LOCAL_RANK"
                     in env else "SLURM_LOCALID", None)
    return None


def _int(env: Mapping[str, str], key: str) -> int:
    value = env.get(key)
    if value is None or not value.strip().lstrip("-").isdigit():
        raise RankError(f"{key}={value!r}: expected an integer")
    return int(value)


def _make(source, env, rank, size, local, local_size) -> Ranks:
    r, n = _int(env, rank), _int(env, size)
    lr = _int(env, local) if local in env else None
    ls = _int(env, local_size) if local_size and local_size in env else None
    if lr is None:
        raise RankError(f"{source}: {rank} is set but not {local}; cannot tell the local rank (GPU)")
    if not (0 <= r < n and 0 <= lr < (ls or n)):
        raise RankError(f"{source}: rank {r} / size {n} / local rank {lr} / local size {ls} are inconsistent")
    return Ranks(source, r, n, lr, ls or 0)


def _tasks_on_this_node(env: Mapping[str, str]) -> int:
    """From ``SLURM_STEP_TASKS_PER_NODE`` (``2(x3),1``) and ``SLURM_NODEID``; 0 if they do not tell."""
    try:
        counts = slurm_task_counts(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "")
    except AllocationError:
        return 0
    node = env.get("SLURM_NODEID", "")
    return counts[int(node)] if node.isdigit() and int(node) < len(counts) else 0
