"""``keizoku launch`` inside an allocation: from the scheduler's hosts to running training processes.

Runs once per job, on the batch host (where the job script runs). It

1. reads the allocation (``schedulers.detect_allocation``) and, before starting anything, whether the run is
   already complete (then it exits 0 at once: a spare link of a ``--chain`` costs seconds);
2. picks the rendezvous address (this host) and a port that no other job on this host holds (``port``);
3. starts the training processes the way the site supports (the plan's ``starter``, one of ``STARTERS``):

   - ``launcher: node`` — one keizoku node agent per node (``agent``: like ``torchrun --nnodes N
     --node-rank R``), started by ``srun``, ``mpirun -npernode 1``, ``pbsdsh -u``, ``qrsh -inherit`` or
     ``ssh``, or as local processes (``local``: one machine, or several agents on it for testing);
   - ``launcher: mpi`` — one process per GPU started by ``mpirun -npernode G`` or ``srun
     --ntasks-per-node G``; each maps its MPI/Slurm rank to torch's variables (``worker``);

4. relays the scheduler's pre-walltime signal (SIGUSR1/SIGUSR2/SIGTERM) to every node — by signal to the
   children that forward it (srun, mpirun, local agents) and by a stop file in the run directory
   (``RunDir.stop_file``) that every agent watches (for starters that forward nothing) — and can stop the run
   itself ``stop_margin_s`` before the walltime (PBS sends no warning of its own);
5. if a node fails, stops the others within ``failure_grace_s``; exits with the training's status
   (``rundir.ExitCode``): 0 done, 3 stopped after saving (resubmit: the next chained job resumes), anything
   else failed; ``RunDir.job_record`` keeps what ran where and how it ended: for a failure, which rank on which
   node and its exit status or signal (each node agent writes ``failure_file(...)``.nodeR.json when one of its
   ranks fails; the earliest is the cause);
6. while it runs, writes a heartbeat (``heartbeat``: the time) into the job record every ``HEARTBEAT_S`` seconds,
   with its host and pid: ``keizoku status`` calls a job whose driver went silent for ``STALE_AFTER_S`` (or
   whose pid is gone, seen from the same host) lost.

Standard library only, Python >= 3.8, and so are the modules it imports (``schedulers``, ``port``,
``keizoku.rundir``): with ``--container`` the job script runs a copy of these files on the node's own
``python3`` (``submit.LAUNCH_FILES``) — the scheduler's commands (srun, mpirun, qrsh) live outside the
container, training runs inside it.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

try:  # a package module normally; a lone copy beside the job script under --container
    from keizoku.launch.port import PortError, pick_port
    from keizoku.launch.schedulers import Allocation, AllocationError, detect_allocation, scheduler_named, signal_name
    from keizoku.rundir import ExitCode, RunDir, latest_checkpoint, safe_name, write_atomic
except ImportError:  # pragma: no cover - exercised by the container tests through copied files
    from port import PortError, pick_port  # type: ignore
    from rundir import ExitCode, RunDir, latest_checkpoint, safe_name, write_atomic  # type: ignore
    from schedulers import (  # type: ignore
        Allocation,
        AllocationError,
        detect_allocation,
        scheduler_named,
        signal_name,
    )

HEARTBEAT_S = 30  # how often the driver writes its heartbeat into the job record
STALE_AFTER_S = 120  # keizoku status: a running job whose driver has written no heartbeat for this long is lost
GRACEFUL = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)  # walltime warnings: save, then stop
ABORT = (signal.SIGINT, signal.SIGHUP)
ENDED_WELL = (ExitCode.OK, ExitCode.STOPPED)


class LaunchError(RuntimeError):
    pass


@dataclass
class LaunchPlan:
    """Everything the driver needs, as JSON: ``keizoku submit`` writes it beside the job script."""

    train_args: List[str]  # CONFIG and overrides, exactly as for `keizoku train`
    run_dir: str  # absolute: job records, stop files and the completeness check live here
    total_steps: Optional[int] = None  # at submission; the config is read again at launch when possible
    launcher: str = "node"  # node | mpi
    starter: str = "local"  # one of STARTERS
    procs_per_node: int = 0  # 0: the GPUs visible on the batch host, or 1 without GPUs
    python: List[str] = field(default_factory=lambda: [sys.executable])  # keizoku's python on a node
    mpirun: List[str] = field(default_factory=lambda: ["mpirun"])  # the command and its site flags
    env: Dict[str, str] = field(default_factory=dict)  # for the training processes (NCCL_*, ...)
    walltime_s: Optional[int] = None
    stop_margin_s: int = 0  # stop by ourselves this long before the walltime (0: rely on the scheduler)
    failure_grace_s: float = 30.0  # after a failure, how long the others get before SIGKILL
    workdir: str = ""  # cwd of the training processes (relative paths in the config)

    @classmethod
    def from_json(cls, path: str) -> "LaunchPlan":
        with open(path) as f:
            data = json.load(f)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise LaunchError(f"{path}: unknown keys {sorted(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"


def log(msg: str) -> None:
    print(f"keizoku launch: {msg}", file=sys.stderr, flush=True)


# --- completeness -----------------------------------------------------------------------------------------

def total_steps_now(plan: LaunchPlan) -> Optional[int]:
    """The run's length from its config as it is now (it may have been edited between chained jobs)."""
    try:
        from keizoku.launch.status import total_steps_for_args
    except ImportError:  # outside the container: ask keizoku inside it
        return _total_steps_from_python(plan)
    cwd = os.getcwd()
    try:
        if plan.workdir:
            os.chdir(plan.workdir)
        return total_steps_for_args(plan.train_args)
    finally:
        os.chdir(cwd)


def _total_steps_from_python(plan: LaunchPlan) -> Optional[int]:
    """``python -m keizoku.launch.status total-steps`` with keizoku's python; the submitted length if that fails."""
    try:
        out = subprocess.run([*plan.python, "-m", "keizoku.launch.status", "total-steps", *plan.train_args],
                             capture_output=True, text=True, timeout=600, cwd=plan.workdir or None)
        if out.returncode == 0 and out.stdout.strip().isdigit():
            return int(out.stdout)
    except (OSError, subprocess.SubprocessError):
        pass
    return plan.total_steps


def is_complete(plan: LaunchPlan) -> Optional[str]:
    """A message when the run's newest complete checkpoint (either engine's) is at its last step, else None."""
    newest = latest_checkpoint(plan.run_dir)
    if newest is None:
        return None
    total = total_steps_now(plan)
    if total is not None and newest.step >= total:
        return f"training is complete (step {newest.step} of {total}); nothing to run"
    return None


# --- topology ---------------------------------------------------------------------------------------------

def visible_gpus(env=os.environ) -> int:
    devices = env.get("CUDA_VISIBLE_DEVICES")
    if devices is not None:
        return len([d for d in devices.split(",") if d.strip() and d.strip() != "-1"])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU ")) if out.returncode == 0 else 0


@dataclass
class Topology:
    alloc: Allocation
    nproc: int
    master_addr: str
    master_port: int

    @property
    def world(self):
        """nodes × processes; for a dry run whose processes per node are not known yet, the product as text."""
        if isinstance(self.nproc, int):
            return self.alloc.nnodes * self.nproc
        return f"{self.alloc.nnodes}x{self.nproc}"

    def describe(self, plan: LaunchPlan) -> str:
        hosts = ", ".join(self.alloc.hosts[:8]) + (" …" if self.alloc.nnodes > 8 else "")
        return (f"{self.alloc.scheduler} job {self.alloc.job_id}: {self.alloc.nnodes} node(s) [{hosts}] × "
                f"{self.nproc} process(es) = world size {self.world}; rendezvous {self.master_addr}:"
                f"{self.master_port}; launcher {plan.launcher} via {plan.starter}")


# --- commands ---------------------------------------------------------------------------------------------

def failure_file(run_dir: str, job_id: str) -> str:
    """Where the node agents of a job report a failed rank: this, plus ``.nodeR.json`` (RUN_DIR/launch/)."""
    return str(RunDir(run_dir).launch / f"failure.{safe_name(job_id)}")


def agent_command(plan: LaunchPlan, topo: Topology, stop_file: str, node_rank: Optional[int] = None,
                  watch_stdin: bool = False) -> List[str]:
    cmd = [*plan.python, "-m", "keizoku.launch.agent", "--nnodes", str(topo.alloc.nnodes),
           "--nproc-per-node", str(topo.nproc), "--master-addr", topo.master_addr,
           "--master-port", str(topo.master_port), "--run-id", topo.alloc.job_id,
           "--hosts", ",".join(topo.alloc.hosts), "--stop-file", stop_file,
           "--failure-file", failure_file(plan.run_dir, topo.alloc.job_id),
           "--failure-grace", str(plan.failure_grace_s), "--workdir", plan.workdir or os.getcwd()]
    cmd += _env_args(plan)
    if node_rank is not None:
        cmd += ["--node-rank", str(node_rank)]
    if watch_stdin:
        cmd.append("--watch-stdin")
    return cmd + ["--", *plan.train_args]


def worker_command(plan: LaunchPlan, topo: Topology) -> List[str]:
    cmd = [*plan.python, "-m", "keizoku.launch.worker", "--master-addr", topo.master_addr,
           "--master-port", str(topo.master_port), "--workdir", plan.workdir or os.getcwd()]
    return cmd + _env_args(plan) + ["--", *plan.train_args]


def _env_args(plan: LaunchPlan) -> List[str]:
    return [arg for key, value in sorted(plan.env.items()) for arg in ("--env", f"{key}={value}")]


def write_hostfile(path: str, hosts: List[str], per_host: int) -> str:
    """An OpenMPI hostfile in launch order (rank 0's host first)."""
    write_atomic(path, "".join(f"{h} slots={per_host}\n" for h in hosts))
    return path


# --- starters: the processes that start the training on every node ----------------------------------------

@dataclass
class Child:
    label: str
    argv: List[str]
    relay: bool  # forwards a signal sent to it (srun, mpirun, a local agent); a remote shell client does not
    stdin_pipe: bool = False
    proc: Optional[subprocess.Popen] = None
    local_agent: bool = False  # a node agent on this host: it dies with the driver (no scheduler step holds it)

    def start(self) -> None:
        # own session: a signal to the job's process group (Grid Engine's -notify) must not kill a qrsh
        # client or srun outright; we relay it deliberately
        self.proc = subprocess.Popen(self.argv, start_new_session=True,
                                     preexec_fn=die_with_parent if self.local_agent else ignore_warnings,
                                     stdin=subprocess.PIPE if self.stdin_pipe else subprocess.DEVNULL)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _srun_children(plan: LaunchPlan, topo: Topology, stop_file: str, hostfile: str) -> List[Child]:
    n = topo.alloc.nnodes
    if plan.launcher == "mpi":
        return [Child("srun", ["srun", f"--nodes={n}", f"--ntasks={topo.world}", f"--ntasks-per-node={topo.nproc}",
                               "--kill-on-bad-exit=1", *worker_command(plan, topo)], True)]
    # --wait: after the first node agent ends, the others get this long (they normally end together; a failed
    # node's peers are stopped by their own agents or, at the latest, then)
    return [Child("srun", ["srun", f"--nodes={n}", f"--ntasks={n}", "--ntasks-per-node=1",
                           f"--wait={int(plan.failure_grace_s) + 30}", "--kill-on-bad-exit=0",
                           *agent_command(plan, topo, stop_file)], True)]


def _mpirun_children(plan: LaunchPlan, topo: Topology, stop_file: str, hostfile: str) -> List[Child]:
    """mpirun with the hostfile ``Driver.run`` writes (``mpirun_per_node`` slots a host)."""
    mpi = plan.launcher == "mpi"
    command = worker_command(plan, topo) if mpi else agent_command(plan, topo, stop_file)
    return [Child("mpirun", [*plan.mpirun, "-np", str(topo.world if mpi else topo.alloc.nnodes), "-npernode",
                             str(mpirun_per_node(plan, topo)), "--hostfile", hostfile, *command], True)]


def mpirun_per_node(plan: LaunchPlan, topo: Topology):
    return topo.nproc if plan.launcher == "mpi" else 1


def _pbsdsh_children(plan: LaunchPlan, topo: Topology, stop_file: str, hostfile: str) -> List[Child]:
    return [Child("pbsdsh", ["pbsdsh", "-u", "--", *agent_command(plan, topo, stop_file)], False)]


def _local_children(plan: LaunchPlan, topo: Topology, stop_file: str, hostfile: str) -> List[Child]:
    return [Child(f"node {r}", agent_command(plan, topo, stop_file, node_rank=r), True, local_agent=True)
            for r in range(topo.alloc.nnodes)]


def _remote_shell_children(plan: LaunchPlan, topo: Topology, stop_file: str, hostfile: str,
                           shell: Callable[[str], List[str]]) -> List[Child]:
    """Node 0 runs here; the rest through the remote shell, whose stdin we hold: when this driver dies, the remote
    agent reads EOF and stops its workers (qrsh and ssh both forward stdin and its end)."""
    out = [Child("node 0", agent_command(plan, topo, stop_file, node_rank=0), True, local_agent=True)]
    for r, host in enumerate(topo.alloc.hosts[1:], 1):
        remote = shlex.join(agent_command(plan, topo, stop_file, node_rank=r, watch_stdin=True))
        out.append(Child(f"node {r} ({host})", [*shell(host), remote], False, stdin_pipe=True))
    return out


STARTS = {  # starter -> its children; which a scheduler allows: Scheduler.starters
    "srun": _srun_children,
    "mpirun": _mpirun_children,
    "pbsdsh": _pbsdsh_children,
    "qrsh": functools.partial(_remote_shell_children, shell=lambda host: ["qrsh", "-inherit", host]),
    "ssh": functools.partial(_remote_shell_children, shell=lambda host: ["ssh", "-o", "BatchMode=yes", host]),
    "local": _local_children,
}
STARTERS = tuple(STARTS)
MPI_STARTERS = ("srun", "mpirun")  # those that can start one process per GPU (launcher: mpi)


def launch_lines(plan: LaunchPlan, nnodes: int, scheduler: str, procs_per_node=None) -> List[List[str]]:
    """What the driver would start for this plan in a job of ``nnodes`` nodes (``keizoku submit --dry-run``), with
    what is known only in the job as words: NODE0, NODE1, … (the job's hosts, NODE0 the batch host), PORT (the
    rendezvous port), JOB_ID; ``procs_per_node`` (the plan's, else the caller's: a number or a word such as GPUS).
    Writes nothing."""
    hosts = [f"NODE{i}" for i in range(nnodes)]
    alloc = Allocation(scheduler, "JOB_ID", hosts, [1] * nnodes, hosts[0], hosts[0])
    topo = Topology(alloc, plan.procs_per_node or procs_per_node or "GPUS", hosts[0], "PORT")  # type: ignore[arg-type]
    run = RunDir(plan.run_dir)
    kids = STARTS[plan.starter](plan, topo, str(run.stop_file("JOB_ID")), str(run.hostfile("JOB_ID")))
    return [kid.argv for kid in kids]


def check_plan(plan: LaunchPlan) -> None:
    if plan.launcher not in ("node", "mpi"):
        raise LaunchError(f"launcher: {plan.launcher!r} is not node or mpi")
    if plan.starter not in STARTERS:
        raise LaunchError(f"starter: {plan.starter!r} is not one of {', '.join(STARTERS)}")
    if plan.launcher == "mpi" and plan.starter not in MPI_STARTERS:
        raise LaunchError(f"launcher: mpi needs starter srun or mpirun, not {plan.starter}")


def check_allocation(plan: LaunchPlan, alloc: Allocation) -> None:
    """What the plan needs of this job: a starter its scheduler allows; srun's task 0 on the batch host."""
    problem = scheduler_named(alloc.scheduler).starter_error(plan.starter)
    if problem:
        raise LaunchError(problem)
    if plan.launcher == "mpi" and plan.starter == "srun" and alloc.hosts and alloc.hosts[0] != alloc.first_listed:
        raise LaunchError("launcher: mpi with srun needs the batch host to be the first node of the job "
                          f"(rank 0 rendezvous); here it is {alloc.batch_host}. Use launcher: node")


# --- running ------------------------------------------------------------------------------------------------

class SignalWatch:
    """What a launcher (this driver, a node agent) has been told: a walltime warning (``GRACEFUL``: save, then
    stop) or an abort (``ABORT``); the first reason of each is kept, and a waiting ``pause`` wakes at once."""

    def __init__(self):
        self.stop_reason: Optional[str] = None
        self.abort_reason: Optional[str] = None
        self._wake = threading.Event()

    def listen(self) -> None:
        for sig in GRACEFUL + ABORT:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum in ABORT:
            self.abort_reason = self.abort_reason or f"{name} received"
        else:
            self.stop_reason = self.stop_reason or f"{name} received"
        self._wake.set()

    def abort_for(self, reason: str) -> None:
        self.abort_reason = self.abort_reason or reason
        self._wake.set()

    def pause(self, seconds: float) -> None:
        self._wake.wait(seconds)
        self._wake.clear()


class Driver(SignalWatch):
    """Starts one job's children, relays stops and failures to them, and tells how the job ended."""

    def __init__(self, plan: LaunchPlan, topo: Topology, stop_file: str, hostfile: str):
        super().__init__()
        self.plan, self.topo, self.stop_file, self.hostfile = plan, topo, stop_file, hostfile
        self.kids: List[Child] = []
        self.stopping = self.aborted = False
        self.first_failure: Optional[int] = None
        self.failed_child = ""  # "node 1 (vm) killed by SIGKILL": the first child that failed, as the driver saw it

    def run(self, heartbeat: Callable[[], None] = lambda: None) -> int:
        """Start the children and watch them until all have ended, calling ``heartbeat`` every ``HEARTBEAT_S``;
        the job's exit status."""
        self.listen()
        if self.plan.starter == "mpirun":
            write_hostfile(self.hostfile, self.topo.alloc.hosts, mpirun_per_node(self.plan, self.topo))
        self.kids = STARTS[self.plan.starter](self.plan, self.topo, self.stop_file, self.hostfile)
        for kid in self.kids:
            kid.start()
        deadline = None
        if self.plan.walltime_s and self.plan.stop_margin_s:
            deadline = time.monotonic() + self.plan.walltime_s - self.plan.stop_margin_s
        beat = time.monotonic()
        while any(kid.running() for kid in self.kids):
            if time.monotonic() - beat >= HEARTBEAT_S:
                beat = time.monotonic()
                heartbeat()
            self._stop_if_asked(deadline)
            if not self.aborted and self._abort_if_failed():
                continue
            self.pause(0.2)
        return self.exit_status()

    def _stop_if_asked(self, deadline: Optional[float]) -> None:
        if self.stopping:
            return
        if deadline is not None and time.monotonic() >= deadline:
            self.stop_reason = self.stop_reason or \
                f"{self.plan.stop_margin_s} s before the walltime ({self.plan.walltime_s} s)"
        if self.stop_reason:
            self.stopping = True
            self.request_stop(self.stop_reason)

    def _abort_if_failed(self) -> bool:
        failed = [k for k in self.kids if not k.running() and k.proc.returncode not in ENDED_WELL]
        if not failed and not self.abort_reason:
            return False
        if failed:
            self.first_failure = failed[0].proc.returncode
            self.failed_child = f"{failed[0].label} {describe_exit(self.first_failure, verb=True)}"
            log(f"{failed[0].label} failed ({describe_exit(self.first_failure)})")
        self.aborted = True
        self.abort(self.abort_reason or "a node failed")
        return True

    def request_stop(self, reason: str) -> None:
        log(f"{reason}: asking every node to save a checkpoint and stop")
        try:
            write_atomic(self.stop_file, reason + "\n")
        except OSError as e:
            log(f"cannot write the stop file {self.stop_file} ({e.strerror}); relying on signals")
        for kid in self.kids:
            if kid.relay and kid.running():
                kid.proc.send_signal(signal.SIGUSR1)

    def abort(self, reason: str) -> None:
        log(f"{reason}: stopping all nodes")
        for kid in self.kids:
            if kid.running():
                kid.proc.send_signal(signal.SIGINT if kid.relay else signal.SIGTERM)
                if kid.label == "srun":  # srun ends the step on a second SIGINT within a second
                    time.sleep(0.2)
                    kid.proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + self.plan.failure_grace_s
        while time.monotonic() < deadline and any(kid.running() for kid in self.kids):
            time.sleep(0.2)
        for kid in self.kids:
            if kid.running():
                log(f"{kid.label} did not stop within {self.plan.failure_grace_s:g} s: SIGKILL")
                kill_group(kid.proc.pid, signal.SIGKILL)

    def exit_status(self) -> int:
        """0 if every child finished, 3 if they stopped after saving, else the first failure's status."""
        codes = [kid.proc.returncode for kid in self.kids]
        if all(c == ExitCode.OK for c in codes):
            return ExitCode.OK
        if all(c in ENDED_WELL for c in codes):
            return ExitCode.STOPPED
        failure = self.first_failure if self.first_failure is not None else \
            next(c for c in codes if c not in ENDED_WELL)
        return ExitCode.of_returncode(failure)


def ignore_warnings() -> None:
    """In a child before exec: a warning signal that comes before it has installed its handlers must not kill
    it (SIGUSR1/SIGUSR2's default action); the stop file or a repeated signal tells it later."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def die_with_parent() -> None:
    """In a child before exec: SIGKILL when the driver dies (Linux PR_SET_PDEATHSIG), so that a driver killed
    with -9 leaves no node agent training on (its training processes die with it in turn); and
    ``ignore_warnings``."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass
    ignore_warnings()


def describe_exit(returncode: int, verb: bool = False) -> str:
    """``killed by SIGKILL`` or ``exit status 1`` (``exited with status 1`` with ``verb``) of a Popen returncode."""
    if returncode < 0:
        return f"killed by {signal_name(-returncode)}"
    return f"exited with status {returncode}" if verb else f"exit status {returncode}"


def failure_detail(run_dir: str, job_id: str, driver: "Driver") -> Optional[dict]:
    """What failed first: the earliest rank failure a node agent reported, else the child the driver saw fail,
    else why it was aborted; None if nothing failed."""
    prefix = failure_file(run_dir, job_id)
    reports = []
    for path in glob.glob(glob.escape(prefix) + ".node*.json"):
        try:
            with open(path) as f:
                reports.append(json.load(f))
        except (OSError, ValueError):
            continue
    reports = [r for r in reports if isinstance(r, dict) and "rank" in r]
    if reports:
        first = min(reports, key=lambda r: r.get("time", 0))
        first["detail"] = f"rank {first['rank']} on {first.get('host', '?')} {first.get('how', 'failed')}"
        return first
    if driver.failed_child:
        return {"detail": driver.failed_child}
    if driver.abort_reason:
        return {"detail": f"aborted: {driver.abort_reason}"}
    return None


def _remove_failure_reports(run_dir: str, job_id: str) -> None:
    for path in glob.glob(glob.escape(failure_file(run_dir, job_id)) + ".node*.json"):
        try:
            os.unlink(path)
        except OSError:
            pass


def kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


# --- the job ------------------------------------------------------------------------------------------------

def update_job_record(run_dir: str, job_id: str, fields: dict) -> None:
    """RUN_DIR/jobs/JOB_ID.json: what ran where and how it ended (read by ``keizoku status``)."""
    path = RunDir(run_dir).job_record(job_id)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = {}
    record.update(fields)
    write_atomic(path, json.dumps(record, indent=1))


def _beat(run_dir: str, job_id: str) -> None:
    """The heartbeat: the time, into the job record (a write that fails is retried at the next beat)."""
    try:
        update_job_record(run_dir, job_id, {"heartbeat": time.time()})
    except OSError as e:
        log(f"cannot write the heartbeat into {RunDir(run_dir).job_record(job_id)} ({e.strerror})")


def launch_job(plan: LaunchPlan, env=os.environ) -> int:
    """Run the plan in this job's allocation; returns the exit status (see the module docstring)."""
    check_plan(plan)
    alloc = detect_allocation(env)
    check_allocation(plan, alloc)
    done = is_complete(plan)
    if done:
        log(done)
        now = time.time()
        update_job_record(plan.run_dir, alloc.job_id, {
            "job_id": alloc.job_id, "scheduler": alloc.scheduler, "hosts": alloc.hosts, "started": now,
            "ended": now, "exit_status": int(ExitCode.OK), "state": ExitCode.outcome(ExitCode.OK),
            "stop_reason": None, "note": done})
        return ExitCode.OK
    nproc = plan.procs_per_node or visible_gpus(env) or 1
    port, lock_fd = pick_port(alloc.job_id)  # held until the job ends
    try:
        return _run_job(plan, Topology(alloc, nproc, socket.gethostname(), port))
    finally:
        os.close(lock_fd)


def _run_job(plan: LaunchPlan, topo: Topology) -> int:
    run, job_id = RunDir(plan.run_dir), topo.alloc.job_id
    stop_file = run.stop_file(job_id)
    run.launch.mkdir(parents=True, exist_ok=True)
    if stop_file.exists():
        stop_file.unlink()
    log(topo.describe(plan))
    started = time.time()
    update_job_record(plan.run_dir, job_id, {
        "job_id": job_id, "scheduler": topo.alloc.scheduler, "hosts": topo.alloc.hosts, "procs_per_node": topo.nproc,
        "world_size": topo.world, "master": f"{topo.master_addr}:{topo.master_port}", "launcher": plan.launcher,
        "starter": plan.starter, "started": started, "state": "running", "driver_host": socket.gethostname(),
        "driver_pid": os.getpid(), "heartbeat": started, "heartbeat_s": HEARTBEAT_S})
    _remove_failure_reports(plan.run_dir, job_id)  # a job id may run again (local runs, tests)
    driver = Driver(plan, topo, str(stop_file), str(run.hostfile(job_id)))
    status = driver.run(heartbeat=lambda: _beat(plan.run_dir, job_id))
    outcome = ExitCode.outcome(status)
    ended = {"ended": time.time(), "heartbeat": time.time(), "exit_status": int(status), "state": outcome,
             "stop_reason": driver.stop_reason}
    failure = failure_detail(plan.run_dir, job_id, driver) if status not in ENDED_WELL else None
    if failure:
        ended["failure"], ended["detail"] = failure, failure["detail"]
        log(f"failed: {failure['detail']}")
    update_job_record(plan.run_dir, job_id, ended)
    if status == ExitCode.STOPPED:
        log(f"stopped after saving a checkpoint (exit {int(status)}): resubmit, or let the next chained job continue")
    else:
        log(f"{outcome} (exit {int(status)}) after {time.time() - started:.0f} s")
    return status


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="keizoku-launch-driver", description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", required=True, help="plan JSON written by keizoku submit")
    args = parser.parse_args(argv)
    try:
        return launch_job(LaunchPlan.from_json(args.plan))
    except (LaunchError, AllocationError, PortError) as e:
        log(f"error: {e}")
        return ExitCode.CONFIG


if __name__ == "__main__":
    sys.exit(main())
