"""One training process of an MPI-style launch: map the MPI/Slurm ranks to torch's and become ``keizoku train``.

Started by the driver (``launcher: mpi``) with the rendezvous address and port it chose, or directly by a
user's ``mpirun -npernode 4 -hostfile … keizoku launch CONFIG``. Then, without ``MASTER_ADDR`` /
``MASTER_PORT`` in the environment, every rank derives the same ones on its own: the first host of the
allocation and the job id's first port candidate (``port.first_candidate``) — not locked like the driver's,
so prefer ``keizoku launch`` outside mpirun when jobs share nodes.

The process replaces itself (exec) with ``python -m keizoku train``, so the MPI launcher's signals and exit
status are the trainer's own (SIGUSR1/SIGUSR2/SIGTERM: save and exit 3).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Mapping, Optional

from keizoku.launch.port import first_candidate
from keizoku.launch.ranks import RankError, from_env
from keizoku.launch.schedulers import detect_allocation
from keizoku.rundir import ExitCode


def torch_env(env: Mapping[str, str], master_addr: Optional[str] = None,
              master_port: Optional[int] = None) -> dict:
    """The variables to add: ranks from the launcher, rendezvous from the arguments, env or allocation."""
    ranks = from_env(env)
    if ranks is None:
        raise RankError("no MPI or Slurm task variables found (OMPI_COMM_WORLD_RANK, PMI_RANK, SLURM_PROCID "
                        "in a job step, ...): start this under mpirun or srun")
    addr = master_addr or env.get("MASTER_ADDR")
    port = master_port or (int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else None)
    if addr is None or port is None:
        alloc = detect_allocation(env)
        addr = addr or alloc.hosts[0]
        port = port or first_candidate(alloc.job_id)
    out = ranks.torch_env(addr, port)
    if ranks.local_world_size:
        out["LOCAL_WORLD_SIZE"] = str(ranks.local_world_size)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m keizoku.launch.worker")
    p.add_argument("--master-addr")
    p.add_argument("--master-port", type=int)
    p.add_argument("--workdir", default="")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("train_args", nargs="+")
    args = p.parse_args(argv)
    exec_train(args.train_args, args.master_addr, args.master_port, dict(kv.split("=", 1) for kv in args.env),
               args.workdir)
    return ExitCode.OK  # not reached


def exec_train(train_args: List[str], master_addr: Optional[str] = None, master_port: Optional[int] = None,
               extra_env: Optional[dict] = None, workdir: str = "") -> None:
    env = dict(os.environ)
    env.update(extra_env or {})
    try:
        env.update(torch_env(env, master_addr, master_port))
    except RankError as e:
        print(f"keizoku launch: error: {e}", file=sys.stderr, flush=True)
        sys.exit(ExitCode.CONFIG)
    if workdir:
        os.chdir(workdir)
    os.execve(sys.executable, [sys.executable, "-m", "keizoku", "train", *train_args], env)


if __name__ == "__main__":
    sys.exit(main())
