"""Which machines this job has: Grid Engine, PBS, Slurm, or none (local).

Standard library only, Python >= 3.8: the launch driver may run on a compute node's own ``python3`` outside
the training container (see ``driver``), where keizoku's dependencies are not installed.

Inputs are the scheduler's own variables, as seen inside real jobs:

- Grid Engine (SGE, Altair GE on TSUBAME4.0): ``JOB_ID``, ``PE_HOSTFILE`` (lines ``host slots queue range``;
  one line per host and queue), ``NHOSTS``, ``NSLOTS``.
- PBS (PBS Pro on ABCI 3.0, Torque): ``PBS_JOBID``, ``PBS_NODEFILE`` (one line per MPI slot: a host repeats).
- Slurm: ``SLURM_JOB_ID``, ``SLURM_JOB_NODELIST`` (compressed: ``gpu[01-04,07],login1``), ``SLURMD_NODENAME``.

``KEIZOKU_HOSTS`` (comma- or space-separated) narrows the hosts to use, in that order; every entry must
belong to the allocation. A host may repeat, which starts several node launchers on one machine: how the
tests emulate two nodes on one host.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple


class AllocationError(RuntimeError):
    """The scheduler's variables or files are missing or malformed; the message names which."""


@dataclass
class Allocation:
    scheduler: str  # gridengine | pbs | slurm | local
    job_id: str
    hosts: List[str]  # the node list in launch order; hosts[0] runs node rank 0 (the batch host when known)
    slots: List[int] = field(default_factory=list)  # slots granted per host (GE/PBS), tasks per node (Slurm)
    batch_host: str = ""  # where the job script runs

    @property
    def nnodes(self) -> int:
        return len(self.hosts)


def short(host: str) -> str:
    return host.split(".", 1)[0]


def parse_pe_hostfile(text: str, source: str = "PE_HOSTFILE") -> List[Tuple[str, int]]:
    """``host slots queue processors`` per line; a host listed for several queues is merged, order kept."""
    merged: Dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2 or not parts[1].isdigit():
            raise AllocationError(f"{source}:{n}: expected 'host slots queue processors', got {line!r}")
        merged[parts[0]] = merged.get(parts[0], 0) + int(parts[1])
    if not merged:
        raise AllocationError(f"{source}: no hosts listed")
    return list(merged.items())


def parse_nodefile(text: str, source: str = "PBS_NODEFILE") -> List[Tuple[str, int]]:
    """One host per line, repeated once per slot (PBS, OpenMPI/MPICH machine files): hosts in first-seen
    order with their line counts. ``host slots=N`` lines (OpenMPI hostfile syntax) count N."""
    counts: Dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = 1
        for p in parts[1:]:
            if p.startswith("slots="):
                if not p[6:].isdigit():
                    raise AllocationError(f"{source}:{n}: bad slots in {line!r}")
                slots = int(p[6:])
        counts[parts[0]] = counts.get(parts[0], 0) + slots
    if not counts:
        raise AllocationError(f"{source}: no hosts listed")
    return list(counts.items())


_BRACKET = re.compile(r"\[([^\]]*)\]")


def expand_nodelist(spec: str) -> List[str]:
    """Slurm's compressed host list (``gpu[01-03,7],login1``, also ``a[1-2]b[3-4]``), expanded in order,
    keeping zero padding, as ``scontrol show hostnames`` prints it."""
    out: List[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(spec + ","):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            item = spec[start:i].strip()
            start = i + 1
            if item:
                out.extend(_expand_one(item, spec))
    if depth != 0:
        raise AllocationError(f"SLURM_JOB_NODELIST: unbalanced brackets in {spec!r}")
    return out


def _expand_one(item: str, whole: str) -> List[str]:
    m = _BRACKET.search(item)
    if not m:
        return [item]
    head, tail = item[:m.start()], item[m.end():]
    names = []
    for part in m.group(1).split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise AllocationError(f"SLURM_JOB_NODELIST: bad range {part!r} in {whole!r}")
        width = len(lo)
        for k in range(int(lo), int(hi or lo) + 1):
            names.extend(head + str(k).zfill(width) + rest for rest in _expand_one(tail, whole) or [""])
    return names


def _read(path: Optional[str], var: str) -> str:
    if not path:
        raise AllocationError(f"{var} is not set")
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        raise AllocationError(f"{var}={path}: cannot read ({e.strerror})") from None


def detect(env: Mapping[str, str] = os.environ, hostname: Optional[str] = None) -> Allocation:
    """The allocation this process runs in, from the scheduler's variables (see the module docstring)."""
    me = hostname or socket.gethostname()
    if env.get("SLURM_JOB_ID") and env.get("SLURM_JOB_NODELIST"):
        hosts = expand_nodelist(env["SLURM_JOB_NODELIST"])
        per_node = _slurm_tasks_per_node(env.get("SLURM_TASKS_PER_NODE", ""), len(hosts))
        batch = env.get("SLURMD_NODENAME") or short(me)
        alloc = Allocation("slurm", env["SLURM_JOB_ID"], hosts, per_node, batch)
    elif env.get("PBS_JOBID") and env.get("PBS_NODEFILE"):
        pairs = parse_nodefile(_read(env["PBS_NODEFILE"], "PBS_NODEFILE"), env["PBS_NODEFILE"])
        alloc = Allocation("pbs", env["PBS_JOBID"], [h for h, _ in pairs], [s for _, s in pairs], me)
    elif env.get("JOB_ID") and env.get("PE_HOSTFILE"):
        pairs = parse_pe_hostfile(_read(env["PE_HOSTFILE"], "PE_HOSTFILE"), env["PE_HOSTFILE"])
        alloc = Allocation("gridengine", env["JOB_ID"], [h for h, _ in pairs], [s for _, s in pairs], me)
    elif env.get("JOB_ID") and env.get("SGE_ROOT"):  # a Grid Engine job without a parallel environment
        alloc = Allocation("gridengine", env["JOB_ID"], [me], [int(env.get("NSLOTS", "1") or 1)], me)
    else:
        job_id = env.get("KEIZOKU_LOCAL_JOB_ID") or f"local-{os.getpid()}"  # set by `keizoku submit --profile local`
        alloc = Allocation("local", job_id, [me], [os.cpu_count() or 1], me)
    _batch_host_first(alloc)
    chosen = env.get("KEIZOKU_HOSTS", "").replace(",", " ").split()
    if chosen:
        _restrict(alloc, chosen)
    return alloc


def _slurm_tasks_per_node(spec: str, nnodes: int) -> List[int]:
    """``2(x3),1`` -> [2, 2, 2, 1]."""
    out: List[int] = []
    for part in filter(None, spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise AllocationError(f"SLURM_TASKS_PER_NODE: cannot read {spec!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out if len(out) == nnodes else [1] * nnodes


def _batch_host_first(alloc: Allocation) -> None:
    """Node rank 0 (which hosts the rendezvous) must run where the driver holds the port: the batch host."""
    names = [short(h) for h in alloc.hosts]
    if short(alloc.batch_host) in names:
        i = names.index(short(alloc.batch_host))
        alloc.hosts = alloc.hosts[i:i + 1] + alloc.hosts[:i] + alloc.hosts[i + 1:]
        if alloc.slots:
            alloc.slots = alloc.slots[i:i + 1] + alloc.slots[:i] + alloc.slots[i + 1:]


def _restrict(alloc: Allocation, chosen: List[str]) -> None:
    if alloc.scheduler != "local":
        known = {short(h) for h in alloc.hosts}
        for h in chosen:
            if short(h) not in known:
                raise AllocationError(f"KEIZOKU_HOSTS: {h!r} is not in this job's allocation "
                                      f"({', '.join(alloc.hosts)})")
    by_name = dict(zip((short(h) for h in alloc.hosts), alloc.slots))
    alloc.hosts = list(chosen)
    alloc.slots = [by_name.get(short(h), 1) for h in chosen]
